"""`python -m benchmarks.evidence.run --quick` end to end through `loopus convert` / `loopus finetune` (tiny
budgets: no accuracy claim); the task's three-way split; the validation-then-test protocol."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from benchmarks.evidence.task import Codec, Sampler, make_program, program_text, split_of

DEPTHS = [str(d) for d in range(8)]
LOOPS = ["1", "2", "4", "8"]
EVIDENCE = Path(__file__).resolve().parents[2] / "benchmarks" / "evidence"


@pytest.fixture(scope="module")
def quick(tmp_path_factory, tiny_llama_dir):
    """One quick run of every part (the real-model parts on the tiny Llama); returns (out dir, JSONs)."""
    import os

    import torch

    from benchmarks.evidence.run import main

    root = tmp_path_factory.mktemp("evidence")
    before_cache, before_threads = os.environ.get("LOOPUS_DATA_CACHE"), torch.get_num_threads()
    os.environ["LOOPUS_DATA_CACHE"] = str(root / "cache")
    try:
        argv = ["--quick", "--real-model", str(tiny_llama_dir), "--cka-split", "3:5"]
        assert main([*argv, "--work", str(root / "work"), "--out", str(root / "out")]) == 0
    finally:
        torch.set_num_threads(before_threads)
        if before_cache is None:
            os.environ.pop("LOOPUS_DATA_CACHE", None)
        else:
            os.environ["LOOPUS_DATA_CACHE"] = before_cache
    out = root / "out"
    return out, {p: json.loads((out / f"{p}.json").read_text()) for p in ("chain", "damped", "real")}


def _in_unit(x: float) -> bool:
    return math.isfinite(x) and 0.0 <= x <= 1.0


def test_every_table_and_plot_is_written(quick):
    out, _ = quick
    for name in ("chain_accuracy.png", "chain_exit.png", "damped.png", "real.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, name
    tables = (out / "tables.md").read_text()
    for heading in ("## Depth task: test accuracy", "### Early exit (threshold", "### Paired by seed",
                    "## Looping without training", "## The real model"):
        assert heading in tables
    for row in ("RDS, residual gate (default)", "RDS, official gate init", "plain, equal compute, lr",
                "plain, equal tokens, lr", "pretrained base", "(not chosen)", "| rds paper | 2:7 | paper |",
                "| rds 3:5 | 3:5 | 3:5 |", "| base |", "| plain |"):
        assert row in tables, row


def test_every_arm_trains_through_loopus_finetune_and_is_measured(quick):
    _, r = quick
    chain = r["chain"]
    seeds = chain["choices"]["seeds"]
    assert len(seeds) >= 2
    names = {a["name"] for a in chain["arms"]}
    assert names == {"rds_residual", "rds_official", "plain_compute_lr0.001", "plain_compute_lr0.003",
                     "plain_tokens_lr0.001", "plain_tokens_lr0.003"}
    assert len(chain["arms"]) == len(names) * len(seeds)
    for arm in chain["arms"]:
        assert Path(arm["checkpoint"]).parent.name == "checkpoints"  # written by loopus_train.train.train
        assert arm["config"]["data"] == str(Path(chain["train_data"]["path"]).resolve())
        for split in ("val", "test"):
            loops = LOOPS if arm["mode"] == "rds" else ["1"]
            assert list(arm[split]["acc"]) == loops
            for acc in arm[split]["acc"].values():
                assert sorted(acc) == DEPTHS and all(_in_unit(v) for v in acc.values())
        if arm["mode"] == "rds":
            assert arm["trained"] == ["loop", "gate", "decoder", "head"] and arm["config"]["loop_steps"] == 4
        else:
            assert arm["trained"] == ["loop", "decoder"] and arm["config"]["loop_steps"] == 1


def test_plain_budgets_match_the_rds_compute_and_tokens(quick):
    _, r = quick
    arms = r["chain"]["arms"]
    for seed in r["chain"]["choices"]["seeds"]:
        rds = next(a for a in arms if a["name"] == "rds_residual" and a["seed"] == seed)
        for a in arms:
            if a["seed"] != seed or a["mode"] != "plain":
                continue
            if a["budget"] == "compute":
                assert abs(a["units"] - rds["units"]) <= a["units"] / a["steps"] / 2
            else:
                assert a["tokens"] == rds["tokens"] and a["steps"] == rds["steps"]


def test_no_validation_or_test_program_is_trained_on(quick):
    _, r = quick
    codec = Codec(20)
    path = Path(r["chain"]["train_data"]["path"])
    lines = path.read_text().splitlines()
    assert len(lines) == r["chain"]["train_data"]["programs"] > 0
    for line in lines:
        rec = json.loads(line)
        statements = [codec.vocab[t] for t in rec["input_ids"][1:-1]]
        assert split_of("".join(statements)) == "train"
        answers = [t for t in rec["labels"] if t != -100]
        assert len(answers) == len(statements) and all(codec.vocab[t].isdigit() for t in answers)


def test_choices_are_frozen_before_the_test_split_is_loaded(quick, tmp_path):
    from benchmarks.evidence.protocol import Protocol, TestBeforeFreeze

    _, r = quick
    chain = r["chain"]
    assert chain["order"] == ["val", "freeze", "test"]
    ch = chain["choices"]
    assert ch["gate"] in ("residual", "official") and ch["exit"]["strategy"] == "threshold"
    assert set(ch["plain_lr"]) == {"compute", "tokens"} and "frozen_at" in ch
    protocol = Protocol(tmp_path, 16, [0, 1], 4, Codec(20), 2)
    protocol.val_sets()
    with pytest.raises(TestBeforeFreeze):
        protocol.test_sets()
    protocol.freeze({"gate": "residual"})
    assert set(protocol.test_sets()) == {0, 1} and (tmp_path / "choices.json").exists()


def test_summary_cells_are_seed_means_with_intervals(quick):
    _, r = quick
    su = r["chain"]["summary"]
    chosen = [row for row in su["rows"] if row["chosen"]]
    assert len(chosen) == 3  # the looped model at its best K and the two plain baselines
    seeds = len(r["chain"]["choices"]["seeds"])
    for row in su["rows"]:
        for cell in row["acc"].values():
            assert cell["lo"] <= cell["mean"] <= cell["hi"] and cell["n"] == seeds
    assert set(su["paired"]) == {"plain_compute", "plain_tokens", "own K=1"}
    assert su["endpoint"]["depths"] == ["6", "7"] and "plain_compute" in su["endpoint"]
    e = su["exit"]
    assert all(1.0 <= e["loops"][d]["mean"] <= 8.0 for d in DEPTHS)
    for arm in r["chain"]["arms"]:
        if arm["mode"] == "rds":
            check = arm["val"]["exit_check"]
            assert check["toolkit_mean_loops"] == pytest.approx(check["offline_mean_loops"])


def test_no_stage_api_training_loop_is_left():
    for path in EVIDENCE.rglob("*.py"):
        text = path.read_text()
        assert ".backward(" not in text or path.name == "pretrain.py", path  # pretraining is not fine-tuning


def test_t_interval_and_pairing():
    from benchmarks.evidence.stats import mean_ci, paired

    c = mean_ci([1.0, 2.0, 3.0])
    assert c["mean"] == 2.0 and c["hi"] - 2.0 == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    d = paired({1: 0.5, 2: 0.7, 3: 0.9}, {1: 0.4, 2: 0.6, 3: 0.8})
    assert d["mean"] == pytest.approx(0.1) and d["hi"] - d["lo"] == pytest.approx(0.0, abs=1e-9)


def test_another_budget_writes_elsewhere():
    from benchmarks.evidence.run import parse_args
    from benchmarks.evidence.settings import RESULTS_DIR, settings_for

    assert settings_for(parse_args([])).out == RESULTS_DIR
    assert settings_for(parse_args(["--real-updates", "32"])).out == RESULTS_DIR  # the recorded budget
    for argv in (["--quick"], ["--real-updates", "8"], ["--seed", "1"]):
        assert settings_for(parse_args(argv)).out != RESULTS_DIR, argv
    assert settings_for(parse_args(["--quick", "--out", "x"])).out == Path("x")


def test_damped_loop_at_a_1_k_1_is_the_base(quick):
    _, r = quick
    damped = r["damped"]
    assert len(damped["splits"]) == 2 and "3:5" in damped["splits"] and "settings" in damped
    for s in damped["splits"].values():
        for per in s["ppl"].values():
            assert all(math.isfinite(v) and v > 1.0 for v in per.values())
        assert s["ppl"]["1.0"]["1"] == pytest.approx(damped["base_ppl"], rel=1e-5)


def test_real_model_rows_record_tokens_and_wall_time(quick):
    _, r = quick
    rows = r["real"]["rows"]
    assert list(rows) == ["rds auto", "rds paper", "rds 3:5", "base", "plain"]
    for name, row in rows.items():
        assert all(math.isfinite(v) and v > 1.0 for v in row["ppl"].values()), name
        if name != "base":
            t = row["train"]
            assert t["tokens"] == 2 * 1 * 32 and t["train_wall_s"] >= 0
    assert rows["plain"]["train"]["loop_steps"] == 1 and "encoder" in rows["plain"]["train"]["parts"]


def test_programs_have_the_asked_depth_and_two_deep_chains():
    rng = random.Random(0)
    codec = Codec(20)
    for depth in range(8):
        st, vals, deps = make_program(rng, 16, depth, codec.names, deep=2)
        assert max(deps) == depth and deps.count(depth) >= 2 and len(st) == 16
        value = {}
        for (x, y), v in zip(st, vals, strict=True):  # every value follows its chain back to a digit
            value[x] = int(y) if y.isdigit() else value[y]
            assert value[x] == v


def test_samplers_draw_from_their_split_only():
    codec = Codec(20)
    for split in ("train", "val", "test"):
        sampler = Sampler(1, 16, split, codec, deep=2)
        for depth in (0, 3, 6):
            for _ in range(30):
                assert split_of(program_text(sampler.program(depth)[0])) == split


def test_record_labels_are_the_answers_shifted_one_place():
    codec = Codec(20)
    st, vals, deps = make_program(random.Random(3), 16, 4, codec.names, deep=2)
    ids, labels, hops = codec.record(st, vals, deps)
    assert len(ids) == len(labels) == len(hops) == 18 and labels[:2] == [-100, -100]
    assert [codec.vocab[t] for t in labels[2:]] == [str(v) for v in vals[:-1]] + [str(vals[-1])]
    assert hops[2:] == deps

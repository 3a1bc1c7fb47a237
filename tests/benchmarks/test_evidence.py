"""`python -m benchmarks.evidence.run --quick` end to end (tiny budgets: no accuracy claim); the task."""

from __future__ import annotations

import json
import math
import random

import pytest

from benchmarks.evidence.task import Codec, Sampler, is_held_out, make_program, program_text

DEPTHS = [str(d) for d in range(8)]
LOOPS = ["1", "2", "4", "8"]


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
    for heading in ("## Depth task", "### Early exit, RDS, identity gate", "### Early exit, RDS, official",
                    "## Looping without training", "## The real model"):
        assert heading in tables
    for row in ("RDS, identity gate (1:5)", "RDS, official gate init (1:5)", "plain fine-tune, same compute",
                "pretrained base", "| rds paper | 2:7 | paper |", "| rds 3:5 | 3:5 | 3:5 |", "| base |",
                "| plain |"):
        assert row in tables, row


def test_depth_task_rows_are_complete_and_in_range(quick):
    _, r = quick
    chain = r["chain"]
    for key in ("chance", "majority", "base_acc"):
        assert sorted(chain[key]) == DEPTHS and all(_in_unit(v) for v in chain[key].values())
    for key in ("before", "rds_identity", "rds_official"):
        assert list(chain[key]["acc"]) == LOOPS, key
        for acc in chain[key]["acc"].values():
            assert sorted(acc) == DEPTHS and all(_in_unit(v) for v in acc.values())
    assert list(chain["plain"]["acc"]) == ["1"]
    # converting with the identity gate changes nothing at one loop
    assert chain["before"]["acc"]["1"] == chain["base_acc"]


def test_plain_fine_tune_spends_the_rds_compute(quick):
    _, r = quick
    rds, plain = r["chain"]["rds_identity"]["train"], r["chain"]["plain"]["train"]
    per_update = plain["units"] / plain["updates"]
    assert abs(plain["units"] - rds["units"]) <= per_update / 2
    assert plain["trained"] == ["loop", "decoder"] and rds["trained"] == ["loop", "gate", "decoder", "head"]


def test_early_exit_curve_is_in_range_and_matches_the_model(quick):
    _, r = quick
    for key in ("rds_identity", "rds_official"):
        row = r["chain"][key]
        for e in row["exit"]:
            assert all(1.0 <= e["loops"][d] <= 8.0 for d in DEPTHS)
            assert all(_in_unit(e["acc"][d]) for d in DEPTHS)
            assert 0.0 <= e["saved"] <= 7 / 8
        check = row["exit_check"]
        assert check["toolkit_mean_loops"] == pytest.approx(check["offline_mean_loops"])


def test_damped_loop_at_a_1_k_1_is_the_base(quick):
    _, r = quick
    damped = r["damped"]
    assert len(damped["splits"]) == 2 and "3:5" in damped["splits"]
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


def test_training_never_sees_a_held_out_program():
    codec = Codec(20)
    train, held = Sampler(1, 16, False, codec, deep=2), Sampler(2, 16, True, codec, deep=2)
    for depth in (0, 3, 6):
        for _ in range(50):
            assert not is_held_out(program_text(train.program(depth)[0]))
            assert is_held_out(program_text(held.program(depth)[0]))

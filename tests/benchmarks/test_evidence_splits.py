"""`python -m benchmarks.evidence.splits --quick` on the tiny Llama: plan, CLI runs, statistics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.evidence import splits, splitstats


@pytest.fixture(scope="module")
def quick(tmp_path_factory, tiny_llama_dir):
    """One quick study (3+ splits x 2 seeds x 2 updates); returns (work dir, splits.json)."""
    import os

    import torch

    root = tmp_path_factory.mktemp("splits")
    before_cache, before_threads = os.environ.get("LOOPUS_DATA_CACHE"), torch.get_num_threads()
    os.environ["LOOPUS_DATA_CACHE"] = str(root / "cache")
    try:
        argv = ["--quick", "--model", str(tiny_llama_dir), "--work", str(root / "work"),
                "--out", str(root / "out")]
        assert splits.main(argv) == 0
    finally:
        torch.set_num_threads(before_threads)
        if before_cache is None:
            os.environ.pop("LOOPUS_DATA_CACHE", None)
        else:
            os.environ["LOOPUS_DATA_CACHE"] = before_cache
    return root / "work", json.loads((root / "out" / "splits.json").read_text())


def test_quick_study_trains_every_planned_split_through_the_cli(quick):
    work, result = quick
    plan = [p["split"] for p in result["plan"]]
    assert len(plan) == len(set(plan)) >= splits.QUICK.num_splits
    assert "analysis pick" in result["plan"][0]["why"]
    assert result["partial"] is False and result["runs_done"] == 2 * len(plan)
    for run in result["runs"]:
        assert run["commands"]["finetune"][0] == "finetune" and "--resume" not in run["commands"]["finetune"]
        assert set(run["ppl"]) == {"1", "2", "4"} and all(v > 1 for v in run["ppl"].values())
        train = splits.run_dir(work, run["split"], run["seed"]) / "train"
        assert (train / "metrics.jsonl").is_file() and not list(train.rglob("*.safetensors"))
    assert result["seeds_averaged"] == [0, 1]
    for k in ("1", "2", "4"):
        stat = result["spearman"][k]["repeat_delta_nll"]
        assert -1 <= stat["rho"] <= 1 and stat["low"] <= stat["high"]


def test_a_second_launch_reuses_the_plan_and_the_runs(quick, tiny_llama_dir):
    work, result = quick
    again = splits.main(["--quick", "--report-only", "--model", str(tiny_llama_dir), "--work", str(work),
                         "--out", str(work / "again")])
    assert again == 0
    second = json.loads((work / "again" / "splits.json").read_text())
    assert second["plan"] == result["plan"] and second["runs"] == result["runs"]
    table = splitstats.tables(second)
    assert all(f"| {p['split']} |" in table for p in result["plan"]) and "repeat_delta_nll" in table


def test_spearman_and_its_interval_on_known_orders():
    x = np.arange(8.0)
    up = splitstats.rank_test(x, x**2)
    assert up["rho"] == pytest.approx(1.0) and up["high"] == pytest.approx(1.0) and up["p_permutation"] < 0.01
    down = splitstats.rank_test(x, -x)
    assert down["rho"] == pytest.approx(-1.0)
    assert np.isnan(splitstats.spearman(x, np.ones(8)))


def test_partial_runs_average_only_the_seeds_every_split_finished():
    plan = [{"split": "1:3", "why": []}, {"split": "2:4", "why": []}]
    runs = [{"split": "1:3", "seed": 0}, {"split": "2:4", "seed": 0}, {"split": "1:3", "seed": 1}]
    assert splitstats.seeds_used(plan, runs, (0, 1)) == [0]
    assert splitstats.seeds_used(plan, runs[:1], (0, 1)) == [0]


def test_shards_split_the_runs_between_them_and_keep_a_split_in_one(quick, tiny_llama_dir, monkeypatch):
    work, result = quick
    seen: list[list[tuple[str, int]]] = []
    for i in range(2):
        calls: list[tuple[str, int]] = []
        monkeypatch.setattr(splits, "one_run", lambda s, sp, seed, w, calls=calls: calls.append((sp, seed)))
        out = work / f"shard{i}"
        argv = ["--quick", "--shard", f"{i}/2", "--model", str(tiny_llama_dir), "--work", str(work)]
        assert splits.main([*argv, "--out", str(out)]) == 0
        assert not (out / "splits.json").exists()  # a shard writes no summary
        seen.append(calls)
    every = {(r["split"], r["seed"]) for r in result["runs"]}
    assert set(seen[0]).isdisjoint(seen[1]) and set(seen[0]) | set(seen[1]) == every
    assert not {s for s, _ in seen[0]} & {s for s, _ in seen[1]}  # no split in both shards
    with pytest.raises(SystemExit):
        splits.parse_args(["--shard", "2/2"])

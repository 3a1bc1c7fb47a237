"""benchmarks/evidence/gpu/depth.py at toy size on the CPU: the GPU experiment's code path end to end."""

from __future__ import annotations

import json

from benchmarks.evidence.gpu.depth import GpuSettings, chain_item, items, split_of


def test_the_gpu_depth_experiment_runs_at_toy_size(tiny_llama_dir, tmp_path, monkeypatch):
    from benchmarks.evidence.gpu.depth import main

    monkeypatch.setenv("LOOPUS_DATA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["--model", str(tiny_llama_dir), "--split", "2:6", "--out", str(out), "--toy"]) == 0
    r = json.loads((out / "depth.json").read_text())
    assert r["order"] == ["val", "freeze", "test"] and (out / "choices.json").exists()
    assert sorted(r["probe"]) == [str(d) for d in range(7)]
    assert r["phase0"]["config"]["loop_steps"] == 1 and r["phase0"]["config"]["train_parts"] == [
        "encoder", "loop", "decoder"]
    names = {a["name"] for a in r["arms"]}
    assert names == {"rds_residual", "rds_official", "plain_compute_lr0.0001", "plain_tokens_lr0.0001"}
    for arm in r["arms"]:
        assert arm["s_per_update_median"] > 0
        assert sorted(arm["test"]["acc"]["1"]) == [str(d) for d in range(7)]
    for line in (out / "train.jsonl").open():  # training records: training split, depths 0-3, answer only
        rec = json.loads(line)
        assert sum(t != -100 for t in rec["labels"]) == 1 and rec["labels"][-1] == rec["input_ids"][-1]


def test_chain_items_answer_the_query_and_split_by_prompt():
    import random

    rng = random.Random(0)
    for depth in range(7):
        prompt, answer = chain_item(depth, rng, 16, 4)
        values = {}
        for st in prompt[: prompt.rindex(".")].split(", "):
            x, y = st.split("=")
            values[x] = int(y) if y.isdigit() else values[y]
        assert values[prompt[prompt.rindex(" ") + 1 : -1]] == answer
    s = GpuSettings(model="m", split="1:2", out=None)
    for split in ("train", "val", "test"):
        assert all(split_of(p) == split for p, _ in items(split, 3, 20, 0, s))

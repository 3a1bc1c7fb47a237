"""The gate at every evaluation of a training run: metrics.jsonl and the terminal summary."""

from __future__ import annotations

from tests.train.conftest import read_metrics, tiny_args


def test_every_eval_reports_the_gate_per_pass(tiny_llama_dir, train_text, tmp_path, cli):
    """The tiny model converted with the residual gate (Abar exactly 1 at conversion): each eval record has
    the mean / spread of Abar for passes 1..--loop-steps, printed too, and after a few updates Abar is no
    longer 1 everywhere (the gate trains from the first update)."""
    from loopus_convert import convert_model

    looped = convert_model(str(tiny_llama_dir), tmp_path / "looped", split="2:6", gate_init="residual").out
    out = tmp_path / "run"
    args = tiny_args(looped, train_text, out, steps=10, save_every=10, eval_every=5, eval_blocks=4)
    code, stdout, stderr = cli(*args)
    assert code == 0, stderr
    evals = read_metrics(out, "eval")
    assert [e["step"] for e in evals] == [5, 10]
    for record in evals:
        passes = record["gate"]["passes"]
        assert [p["pass"] for p in passes] == [1, 2, 3, 4]  # --loop-steps 4
        assert all(0.0 <= p["min"] <= p["mean"] <= p["max"] <= 2.0 and p["std"] >= 0.0 for p in passes)
    last = evals[-1]["gate"]["passes"]
    assert all(p["std"] > 0.0 and p["min"] < 1.0 for p in last)
    assert stdout.count("gate Abar per pass") == 2

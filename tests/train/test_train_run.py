"""Whole runs: learning, the logged schedule, eval, non-finite loss, the embedded default model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from loopus_core.errors import LoopusError
from loopus_train.config import PARTS, TrainConfig
from loopus_train.state import list_checkpoints
from loopus_train.train import train
from tests.train.conftest import read_metrics, tiny_args


def test_training_lowers_held_out_loss_and_eval_reads_the_result(looped_tiny, train_text, tmp_path, cli):
    from transformers import AutoTokenizer

    from loopus_convert import load_looped
    from loopus_convert.measure import loss_per_loops
    from loopus_train.data import load_blocks

    out = tmp_path / "run"
    code, stdout, stderr = cli(
        *tiny_args(
            looped_tiny,
            train_text,
            out,
            steps=30,
            save_every=30,
            eval_every=15,
            eval_blocks=8,
            eval_thresholds="0.5,0.9",
        )
    )
    assert code == 0, stderr
    assert "held-out ppl" in stdout and "trained checkpoint:" in stdout
    held = load_blocks(
        AutoTokenizer.from_pretrained(looped_tiny), str(train_text), block_size=32, held_out=0.05, seed=0
    ).held_out[:8]
    before = loss_per_loops(load_looped(looped_tiny), held, [4])["loops"]["4"]["loss"]
    evals = read_metrics(out, "eval")
    assert [e["step"] for e in evals] == [15, 30]
    after = evals[-1]["loops"]["4"]["loss"]  # 4 = the trained loop count
    assert after < before - 0.3, (before, after)
    assert set(evals[-1]["loops"]) == {"1", "4"}
    assert 0.0 <= evals[-1]["calibration"]["ece"] <= 1.0 and 0.0 <= evals[-1]["calibration"]["brier"] <= 1.0
    exits = evals[-1]["early_exit"]["thresholds"]
    assert set(exits) == {"full", "0.5", "0.9"} and all(1 <= e["mean_loops"] <= 4 for e in exits.values())
    train_records = read_metrics(out)
    assert all(r["tokens_per_s"] > 0 and math.isfinite(r["loss"]) for r in train_records)

    # `loopus eval` on the run directory uses the run's held-out split and agrees with the run's own eval
    code, stdout, stderr = cli(
        "eval",
        out,
        "--loops",
        "1,4",
        "--exit-threshold",
        "0.5,0.9",
        "--max-blocks",
        8,
        "--max-loops",
        4,
        "--device",
        "cpu",
        "--json",
        tmp_path / "eval.json",
    )
    assert code == 0, stderr
    assert "perplexity" in stdout and "mean loops" in stdout
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["loops"]["4"]["loss"] == pytest.approx(after, rel=1e-5)
    assert result["early_exit"]["thresholds"]["0.9"]["mean_loops"] == pytest.approx(
        exits["0.9"]["mean_loops"]
    )

    # the trained checkpoint loads through the Auto classes and generates
    from transformers import AutoModelForCausalLM

    ckpt = list_checkpoints(out)[-1][1]
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    assert model.config.num_loops == 4  # the trained loop count becomes the checkpoint's default
    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = tok("The quick brown", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=5, do_sample=False, num_loops=4)
    assert generated.shape == (1, ids.shape[1] + 5)


def _expected_lr(update, lr, min_lr, warmup, total):
    if update < warmup:
        return lr * (update + 1) / warmup
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * (update - warmup) / (total - warmup)))


@pytest.mark.parametrize(
    "setting",
    [
        dict(grad_accum=1, loop_steps=4, supervised=2, passes_per_step=1),
        dict(  # and the encoder trains too
            grad_accum=3, loop_steps=6, supervised=5, passes_per_step=2, train_parts=tuple(PARTS)
        ),
    ],
)
def test_logged_learning_rate_is_warmup_then_cosine_over_optimizer_updates(
    looped_tiny, train_text, tmp_path, setting
):
    cfg = TrainConfig(
        checkpoint=str(looped_tiny),
        out=str(tmp_path / "run"),
        data=str(train_text),
        block_size=32,
        batch_size=2,
        steps=7,
        lr=2e-3,
        min_lr=2e-4,
        warmup=3,
        save_every=100,
        eval_every=100,
        eval_loops=(1,),
        eval_thresholds=(),
        eval_blocks=1,
        device="cpu",
        **setting,
    )
    train(cfg)
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(1, 8))  # one record per optimizer update
    for r in records:
        assert r["lr"] == pytest.approx(_expected_lr(r["step"] - 1, 2e-3, 2e-4, 3, 7), rel=1e-12)
        assert r["tokens"] == r["step"] * 2 * setting["grad_accum"] * 32
    assert records[-1]["lr"] > 2e-4  # the last update is not past the end of the cosine


def test_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(
    looped_tiny, train_text, tmp_path, monkeypatch
):
    import loopus_train.rds as train_module

    real = train_module.head_ce  # what RDS scores every term with since it scores supervised rows only
    poison = {"on": False}

    def poisoned(model, states, targets, want_hits=True):  # NaN once the step-2 checkpoint is written
        ce, correct = real(model, states, targets, want_hits)
        return (ce * float("nan"), correct) if poison["on"] else (ce, correct)

    def on_event(event):
        if event["event"] == "checkpoint" and event["step"] == 2:
            poison["on"] = True

    monkeypatch.setattr(train_module, "head_ce", poisoned)
    cfg = TrainConfig(
        checkpoint=str(looped_tiny),
        out=str(tmp_path / "run"),
        data=str(train_text),
        block_size=32,
        batch_size=2,
        steps=6,
        loop_steps=3,
        supervised=2,
        save_every=2,
        eval_every=100,
        eval_loops=(1,),
        eval_thresholds=(),
        device="cpu",
    )
    with pytest.raises(LoopusError, match=r"loss became nan at step 3.*step-00000002"):
        train(cfg, callback=on_event)
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [2]
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2]


@pytest.mark.slow
def test_default_model_short_run_saves_a_checkpoint_that_loads_and_generates(
    default_model_dir, default_analysis, tmp_path, train_text, cli
):
    from transformers import AutoTokenizer

    from loopus_convert import convert_model, load_looped

    looped = tmp_path / "smol-looped"  # at the split the analysis of the default model recommends
    convert_model(str(default_model_dir), looped, split="auto", analysis=default_analysis[3])
    start, end = (int(x) for x in default_analysis[1]["split"].split(":"))
    out = tmp_path / "run"
    code, stdout, stderr = cli(
        "finetune",
        looped,
        "--data",
        train_text,
        "--out",
        out,
        "--block-size",
        64,
        "--held-out",  # the split is by document: 5% of these 64 short documents is too few tokens
        0.25,
        "--batch-size",
        2,
        "--steps",
        2,
        "--loop-steps",
        3,
        "--supervised",
        2,
        "--eval-every",
        100,
        "--eval-loops",
        "1,3",
        "--eval-thresholds",
        "0.9",
        "--eval-blocks",
        2,
        "--device",
        "cpu",
        "--gradient-checkpointing",
    )
    assert code == 0, stderr
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    ckpt = list_checkpoints(out)[-1][1]
    model = load_looped(ckpt)
    assert (model.config.split_start, model.config.split_end) == (start, end)
    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=4, do_sample=False, num_loops=2)
    assert generated.shape[1] == ids.shape[1] + 4


def test_without_data_it_trains_on_the_built_in_corpus_also_under_bf16_autocast(looped_tiny, tmp_path, cli):
    out = tmp_path / "run"
    args = tiny_args(looped_tiny, "unused", out, steps=2, save_every=2, precision="bf16")
    args = args[:2] + args[4:]  # drop --data
    code, stdout, stderr = cli(*args)
    assert code == 0, stderr
    assert "train /" in stdout
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)
    assert json.loads((out / "run.json").read_text())["config"]["data"] is None

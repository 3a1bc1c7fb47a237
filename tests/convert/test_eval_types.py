"""``loopus eval``'s one home: EvalConfig holds each default once; the typed results write the old JSON."""

from __future__ import annotations

import json

import typer

from loopus.cli import app
from loopus_convert.eval_types import EXIT_THRESHOLDS, EvalConfig, PerplexityResult
from loopus_convert.harness import RunOptions
from loopus_train.config import DEFAULTS, TrainConfig
from loopus_train.evaluate import training_eval_config


def _eval_defaults() -> dict:
    command = typer.main.get_command(app).commands["eval"]
    return {param.name: param.default for param in command.params}


def test_the_cli_harness_and_trainer_read_the_defaults_of_eval_config():
    config, cli = EvalConfig(), _eval_defaults()
    assert cli["loops"] == ",".join(map(str, config.loops))
    for name in ("max_blocks", "batch_size", "device", "precision"):
        assert cli[name] == getattr(config, name), name
    options = RunOptions()
    assert (options.batch_size, options.device, options.precision) == (
        config.batch_size, config.device, config.precision
    )
    assert DEFAULTS.eval_batch_size == config.batch_size and DEFAULTS.eval_thresholds == EXIT_THRESHOLDS
    assert config.text_thresholds() == EXIT_THRESHOLDS and config.task_thresholds() == ()


def test_training_evaluates_within_the_trained_depth():
    cfg = TrainConfig(checkpoint="x", out="y", loop_steps=3)
    config = training_eval_config(cfg)
    assert config.loops == tuple(cfg.resolved_eval_loops()) and config.max_loops == 3
    assert config.text_thresholds() == cfg.eval_thresholds and config.batch_size == cfg.eval_batch_size


def test_the_typed_result_writes_the_measurements_json_in_order():
    source = {"checkpoint": "/c", "data": "built-in", "blocks": 2, "documents": 1, "block_size": 16}
    per_loops = {
        "loops": {"1": {"loss": 2.0, "ppl": 7.389, "accuracy": 0.5}},
        "calibration": {"ece": 0.1, "brier": 0.2, "mean_confidence": 0.5, "mean_correct": 0.4},
        "tokens": 30,
    }
    exits = {
        "max_loops": 2,
        "thresholds": {
            "full": {"loss": 2.0, "ppl": 7.4, "mean_loops": 2.0, "max_loops_used": 2, "ppl_change": 0.0},
            "0.6": {"loss": 2.1, "ppl": 8.1, "mean_loops": 1.5, "max_loops_used": 2, "ppl_change": 0.09},
        },
    }
    kv = {
        "prompt_tokens": 8,
        "decoded_tokens": 16,
        "strategies": {
            "full": {"1": {"loss": 2.0, "ppl": 7.4, "agreement": 1.0, "cache_bytes": 64, "vs_base": 1.0}}
        },
    }
    result = PerplexityResult.of(source, per_loops, exits, kv)
    expected = {**source, **per_loops, "early_exit": exits, "kv_strategies": kv}
    assert json.dumps(result.to_json()) == json.dumps(expected)  # same keys, same order
    assert result.early_exit.thresholds["0.6"].mean_loops == 1.5 and result.kv_strategies.prompt_tokens == 8
    bare = PerplexityResult.of(source, per_loops, None, None).to_json()
    assert bare["early_exit"] is None and bare["kv_strategies"] is None

"""`loopus finetune` takes every option default from the one TrainConfig instance (no copy to keep honest)."""

from __future__ import annotations

import dataclasses

import typer

from loopus_train.config import DEFAULTS, TrainConfig


def test_every_option_default_is_the_trainconfig_default():
    from loopus.cli import app

    command = typer.main.get_command(app).commands["finetune"]
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    checked = 0
    for param in command.params:
        if param.name not in defaults or param.name in ("checkpoint", "out", "data", "eval_loops"):
            continue
        actual = defaults[param.name]
        if param.name in ("train_parts", "log_to"):
            assert param.default == ",".join(actual)
        elif param.name == "eval_thresholds":
            assert tuple(float(x) for x in param.default.split(",")) == actual
        else:
            assert param.default == actual, param.name
        checked += 1
    assert checked >= 25
    assert DEFAULTS == TrainConfig(checkpoint="", out="")

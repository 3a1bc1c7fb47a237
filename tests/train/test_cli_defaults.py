"""The defaults that `loopus finetune --help` states are the TrainConfig defaults (one copy of each)."""

from __future__ import annotations

import dataclasses
import re

import typer

from loopus_convert.train import TrainConfig


def test_help_states_the_trainconfig_defaults():
    from loopus.cli import app

    command = typer.main.get_command(app).commands["finetune"]
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    checked = 0
    for param in command.params:
        match = re.search(r"\[([^\]]+)\]\.?$", getattr(param, "help", None) or "")
        if not match or param.name not in defaults or "..." in match.group(1):
            continue
        stated, actual = match.group(1), defaults[param.name]
        if isinstance(actual, tuple):
            assert tuple(float(x) for x in stated.split(",")) == actual, param.name
        else:
            assert type(actual)(stated) == actual, param.name
        checked += 1
    assert checked >= 20
    assert command.params[[p.name for p in command.params].index("train_parts")].default == ",".join(
        TrainConfig(checkpoint="", out="").train_parts
    )

"""Issue 23, the fine-tuning command's own lines: a path that looks like rich markup is printed as text
(item 6) and ``--lr`` is range-checked before anything is loaded (item 12)."""

from __future__ import annotations

import pytest

from loopus_train.config import MAX_LR, TrainConfig
from tests.convert.test_cli import _one_line_error
from tests.train.conftest import tiny_args


def test_item06_markup_in_out_does_not_kill_a_finetune(cli, looped_tiny, train_text, tmp_path):
    """Old: rich's MarkupError on the "saved" line after the first checkpoint (``[/]`` closes nothing)."""
    out = tmp_path / "x[/]" / "[bold]run"
    code, stdout, stderr = cli(*tiny_args(looped_tiny, train_text, out, steps=2, save_every=1, keep=1))
    assert code == 0, stderr
    saved = sorted((out / "checkpoints").glob("step-*"))[-1]
    assert f"step 2: saved {saved}" in stdout
    assert f"trained checkpoint: {saved}" in stdout
    assert (saved / "config.json").is_file()


@pytest.mark.parametrize("lr", ["1e300", "1.5", "0", "-1e-4", "inf"])
def test_item12_lr_out_of_range_is_refused_before_loading(cli, looped_tiny, train_text, tmp_path, lr):
    """Old: 1e300 was accepted, and overflowed after the model and the data were loaded."""
    out = tmp_path / "run"
    code, stdout, stderr = cli(*tiny_args(looped_tiny, train_text, out, lr=lr, min_lr=0))
    _one_line_error(code, stdout, stderr, f"--lr {float(lr)!r}", f"(0, {MAX_LR:g}]")
    assert not out.exists()


def test_item12_lr_bounds(tmp_path):
    TrainConfig(checkpoint="c", out="o", lr=MAX_LR).validate()  # the bound itself is allowed
    TrainConfig(checkpoint="c", out="o", lr=1e-8, min_lr=0.0).validate()

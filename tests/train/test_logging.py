"""--log-to: TensorBoard gets every metric of metrics.jsonl; a backend that is not installed, or unknown, is a
one-line error before anything is written."""

from __future__ import annotations

import math
import sys

import pytest

from loopus_train.trackers import flatten
from tests.train.conftest import read_metrics, tiny_args
from tests.train.test_errors import _one_line_error


def test_flatten_names_scalars_by_their_path_and_drops_the_rest():
    record = {"loss": 1.5, "loops": {"4": {"ppl": 3.0, "loss": math.inf}}, "steps": [1, 2], "ok": True}
    assert flatten(record, "eval") == {"eval/loss": 1.5, "eval/loops/4/ppl": 3.0}


def test_tensorboard_receives_the_metrics_of_metrics_jsonl(cli, looped_tiny, train_text, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    code, _, stderr = cli(
        *tiny_args(looped_tiny, train_text, out, steps=3, save_every=3, log_to="tensorboard")
    )
    assert code == 0, stderr
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    losses = [(e.step, e.value) for e in events.Scalars("train/loss")]
    expected = [(r["step"], r["loss"]) for r in read_metrics(out)]
    assert [s for s, _ in losses] == [s for s, _ in expected] == [1, 2, 3]
    assert [v for _, v in losses] == pytest.approx([v for _, v in expected], rel=1e-6)
    (evaluation,) = read_metrics(out, "eval")
    assert events.Scalars("eval/loops/4/loss")[0].value == pytest.approx(
        evaluation["loops"]["4"]["loss"], rel=1e-6
    )
    assert {"train/lr", "train/grad_norm", "eval/calibration/ece"} <= set(events.Tags()["scalars"])


def test_a_backend_that_is_not_installed_is_a_one_line_error(
    cli, looped_tiny, train_text, tmp_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed here either way; the test must not depend
    _one_line_error(
        cli(*tiny_args(looped_tiny, train_text, tmp_path / "out", log_to="tensorboard,wandb")),
        "--log-to wandb",
        "not installed",
        "pip install",
    )
    assert not (tmp_path / "out").exists()


def test_an_unknown_backend_is_a_one_line_error(cli, looped_tiny, train_text, tmp_path):
    _one_line_error(
        cli(*tiny_args(looped_tiny, train_text, tmp_path / "out", log_to="mlflow")),
        "mlflow is not a logging backend",
        "tensorboard,wandb",
    )

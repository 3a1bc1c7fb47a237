"""Exact resume after SIGKILL, a kill in a checkpoint write, torchrun (2 ranks) = 1 process."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from loopus_train.state import list_checkpoints
from tests.train.conftest import read_metrics, run_subprocess, tiny_args


@pytest.fixture(scope="module")
def reference(looped_tiny, train_text, tmp_path_factory):
    """An uninterrupted 8-step run (in a subprocess, like the interrupted ones)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    done = run_subprocess(tiny_args(looped_tiny, train_text, out))
    assert done.returncode == 0, done.stderr
    return out


def _final_weights(out):
    return load_file(str(list_checkpoints(out)[-1][1] / "model.safetensors"))


def _assert_same_run(ours, reference, from_step):
    mine = {r["step"]: r for r in read_metrics(ours)}
    ref = {r["step"]: r for r in read_metrics(reference)}
    assert sorted(mine) == sorted(ref) == list(range(1, 9))
    for step in range(from_step, 9):
        assert mine[step]["supervised_steps"] == ref[step]["supervised_steps"]
        assert mine[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-6, abs=1e-7), step
        assert mine[step]["lr"] == ref[step]["lr"]
    a, b = _final_weights(ours), _final_weights(reference)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_sigkill_after_a_checkpoint_then_resume_matches_an_uninterrupted_run(
    looped_tiny, train_text, reference, tmp_path
):
    out = tmp_path / "run"
    killed = run_subprocess(tiny_args(looped_tiny, train_text, out), {"LOOPUS_TEST_KILL": "after-save:4"})
    assert killed.returncode == -9  # SIGKILL, no clean exit
    assert [step for step, _ in list_checkpoints(out)] == [2, 4]
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]
    resumed = run_subprocess(tiny_args(looped_tiny, train_text, out, resume=True))
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_run(out, reference, from_step=5)
    assert [step for step, _ in list_checkpoints(out)] == [4, 6, 8]  # --keep 3


def test_kill_during_a_checkpoint_write_keeps_the_previous_one(looped_tiny, train_text, reference, tmp_path):
    from loopus_convert import load_looped

    out = tmp_path / "run"
    killed = run_subprocess(tiny_args(looped_tiny, train_text, out), {"LOOPUS_TEST_KILL": "mid-save:4"})
    assert killed.returncode == -9
    assert [step for step, _ in list_checkpoints(out)] == [2]  # step 4 never became a checkpoint
    assert any(p.name.startswith(".tmp-step-00000004") for p in (out / "checkpoints").iterdir())
    model = load_looped(list_checkpoints(out)[0][1])  # the previous checkpoint loads
    assert model.config.model_type == "loopus"
    resumed = run_subprocess(tiny_args(looped_tiny, train_text, out, resume=True))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at step 2 from" in resumed.stdout
    assert not any(p.name.startswith(".tmp") for p in (out / "checkpoints").iterdir())
    _assert_same_run(out, reference, from_step=3)


def test_two_ranks_under_torchrun_match_one_process(looped_tiny, train_text, reference, tmp_path):
    out = tmp_path / "ddp"
    done = run_subprocess(tiny_args(looped_tiny, train_text, out), torchrun=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on 2 process(es)" in done.stdout
    mine, ref = read_metrics(out), read_metrics(reference)
    assert [r["step"] for r in mine] == [r["step"] for r in ref]
    for a, b in zip(mine, ref, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    # the weights agree to well within how far training moved them (Adam magnifies last-bit differences
    # of near-zero gradients into lr-sized steps on some elements, so bitwise equality is not expected)
    a, b = _final_weights(out), _final_weights(reference)
    start = load_file(str(looped_tiny / "model.safetensors"))
    gap = sum(float((a[k] - b[k]).norm() ** 2) for k in a) ** 0.5
    moved = sum(float((b[k] - start[k]).norm() ** 2) for k in b) ** 0.5
    assert moved > 0.1 and gap < 0.01 * moved, (gap, moved)

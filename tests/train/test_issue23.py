"""The trainer's items of issue 23: a LoRA run pins its base checkpoint (item 3), a signal inside the
optimizer-state save is a clean exit (7), the final evaluation is proportionate and shows progress (25), the
tied-embedding warning says what is trained (26), and a checkpoint's size is its arithmetic (25's README
figures)."""

from __future__ import annotations

import signal

import pytest

from tests.train.conftest import start_blocked, tiny_args

OPTIMIZER_WRITE = "torch.distributed.checkpoint.filesystem:_write_files_from_queue:2"  # checkpoint 4's dcp


# ------------------------------------------------------------------- 7: a signal inside dcp's save


@pytest.mark.parametrize(
    ("signum", "status", "word"), [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")]
)
def test_item07_a_signal_in_the_optimizer_state_save_is_a_clean_exit(
    looped_tiny, train_text, tmp_path, signum, status, word
):
    """dcp wraps every exception of a save step (KeyboardInterrupt too) in a CheckpointException: the
    trainer unwraps the interrupt, so the CLI's clean exit applies."""
    out = tmp_path / "run"
    process = start_blocked(tiny_args(looped_tiny, train_text, out), OPTIMIZER_WRITE, tmp_path / "ready")
    root = out / "checkpoints"
    assert any(p.name.startswith(".tmp-step-00000004-") for p in root.iterdir())  # really inside the save
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == status, stderr
    assert "Traceback" not in stderr and "CheckpointException" not in stderr, stderr
    assert f"{word}; nothing half-written was left behind" in stderr
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002"]

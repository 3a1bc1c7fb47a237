"""One test per defect of issue 13 in the trainer (the probe log: shared/reading/qa-probes.md).

Item 13: ``--resume`` survives damage it can (a half-written metrics line, an incomplete newest checkpoint,
a stray ``checkpoints/step-latest``); 14: a run that failed before its first checkpoint can be started
over; 6: an unwritable ``--out`` is one line before the model and the data are loaded. The items under
real signals and a second writer (5, 10, 16) are in ``test_resume.py``; item 3 (eval at another block
size reads held-out documents only) is ``test_data.py::test_eval_at_another_block_size_*``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loopus_train.rundir import resolve_checkpoint, truncate_metrics
from loopus_train.state import RNG_FILE, STATE_JSON, list_checkpoints, newest_checkpoint
from tests.train.conftest import REPO, read_metrics, tiny_args
from tests.train.test_errors import _one_line_error


@pytest.fixture(scope="module")
def short_run(looped_tiny, train_text, tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4 (in-process)."""
    from typer.testing import CliRunner

    from loopus.cli import app

    out = tmp_path_factory.mktemp("short") / "run"
    args = tiny_args(looped_tiny, train_text, out, steps=4)
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    assert [step for step, _ in list_checkpoints(out)] == [2, 4]
    return out


# ------------------------------------------------------------------- 13: damage --resume can survive


def test_item13_a_half_written_last_metrics_line_is_dropped_with_a_warning(tmp_path, caplog):
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"kind": "train", "step": s, "loss": 1.0} for s in (1, 2, 3)]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "train", "st')
    with caplog.at_level(logging.WARNING, logger="loopus_train"):
        truncate_metrics(metrics, 2)
    assert [json.loads(line) for line in metrics.read_text().splitlines()] == rows[:2]
    assert "dropping line(s) 4, which are not JSON records" in caplog.text
    assert list(tmp_path.iterdir()) == [metrics]  # no temporary file left


def _damage_state(path: Path) -> None:
    (path / STATE_JSON).unlink()


def _damage_optimizer(path: Path) -> None:
    (path / "optimizer" / ".metadata").unlink()


def _damage_rng(path: Path) -> None:
    (path / RNG_FILE.format(rank=0)).unlink()


def _damage_weights(path: Path) -> None:
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a truncated copy


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_damage_state, f"no {STATE_JSON}"),
        (_damage_optimizer, "optimizer/.metadata is missing"),
        (_damage_rng, "rng-rank-00000.json is missing"),
        (_damage_weights, "model.safetensors has 1000 bytes"),
    ],
)
def test_item13_an_incomplete_newest_checkpoint_is_passed_over_and_said(
    short_run, tmp_path, caplog, damage, reason
):
    out = Path(shutil.copytree(short_run, tmp_path / "run"))
    damage(out / "checkpoints" / "step-00000004")
    with caplog.at_level(logging.WARNING, logger="loopus_train"):
        assert newest_checkpoint(out) == out / "checkpoints" / "step-00000002"
    assert f"checkpoint step-00000004 is incomplete ({reason}" in caplog.text
    assert "using the previous complete one" in caplog.text
    assert [step for step, _ in list_checkpoints(out)] == [2]
    assert resolve_checkpoint(out) == out / "checkpoints" / "step-00000002"  # `loopus eval RUN` too


def test_item13_a_stray_step_latest_is_not_a_checkpoint(short_run, tmp_path):
    out = Path(shutil.copytree(short_run, tmp_path / "run"))
    shutil.copytree(out / "checkpoints" / "step-00000004", out / "checkpoints" / "step-latest")
    assert [step for step, _ in list_checkpoints(out)] == [2, 4]
    assert resolve_checkpoint(out) == out / "checkpoints" / "step-00000004"


def test_item13_resume_of_a_run_with_only_incomplete_checkpoints_is_one_line(
    cli, short_run, looped_tiny, train_text, tmp_path
):
    out = Path(shutil.copytree(short_run, tmp_path / "run"))
    for step in (2, 4):
        _damage_rng(out / "checkpoints" / f"step-{step:08d}")
    args = tiny_args(looped_tiny, train_text, out, steps=4)
    for extra in ((), ("--resume",)):
        _one_line_error(cli(*args, *extra), "holds only incomplete checkpoints", "step-00000004")
    assert (out / "checkpoints" / "step-00000002" / "model.safetensors").is_file()  # nothing deleted


# --------------------------------------------------- 14: a run that failed before its first checkpoint


def test_item14_a_run_that_stopped_before_its_first_checkpoint_can_be_started_over(
    cli, looped_tiny, train_text, tmp_path, monkeypatch
):
    import loopus_train.train as trainer

    out = tmp_path / "run"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C (or a crash) before the first checkpoint

    with monkeypatch.context() as patch:
        patch.setattr(trainer, "save_checkpoint", interrupted)
        code, _, stderr = cli(*tiny_args(looped_tiny, train_text, out, steps=2, lr=1e-2))
    assert code == 130, stderr
    assert (out / "run.json").is_file() and list_checkpoints(out) == []
    _one_line_error(
        cli(*tiny_args(looped_tiny, train_text, out, steps=2, resume=True)),
        "saved no checkpoint yet",
        "start it again without --resume",
    )
    code, _, stderr = cli(*tiny_args(looped_tiny, train_text, out, steps=2))  # other settings: lr 1e-3
    assert code == 0, stderr
    said = " ".join(stderr.split())  # the log line wraps where the terminal's width and the path decide
    assert "holds a run that saved no checkpoint (with other lr); starting it over" in said
    assert json.loads((out / "run.json").read_text())["config"]["lr"] == 1e-3
    assert [r["step"] for r in read_metrics(out)] == [1, 2]  # the records of the new run only
    assert [step for step, _ in list_checkpoints(out)] == [2]


# ------------------------------------------------- 6: an unwritable --out, before the model is loaded


@pytest.fixture
def nothing_loaded(monkeypatch):
    """The model and the data must not be loaded: the --out checks come first."""
    import loopus_train.train as trainer

    def must_not_run(*args, **kwargs):
        raise AssertionError("the model or the data was loaded before --out was checked")

    monkeypatch.setattr(trainer, "load_with_tokenizer", must_not_run)
    monkeypatch.setattr(trainer, "load_blocks", must_not_run)


def test_item06_out_under_a_file_or_on_a_special_file_system_is_one_line_before_loading(
    cli, nothing_loaded, looped_tiny, train_text, tmp_path
):
    blocker = tmp_path / "a.txt"
    blocker.write_text("x")
    _one_line_error(
        cli(*tiny_args(looped_tiny, train_text, blocker / "run")), f"{blocker} is a file, not a directory"
    )
    _one_line_error(cli(*tiny_args(looped_tiny, train_text, blocker)), "exists and is not a directory")
    if os.path.ismount("/proc"):
        _one_line_error(cli(*tiny_args(looped_tiny, train_text, "/proc/loopus-run")), "cannot be written")
    assert blocker.read_text() == "x" and sorted(tmp_path.iterdir()) == [blocker]


READ_ONLY_SCRIPT = r"""
import sys
import loopus_train.train as trainer
def must_not_run(*args, **kwargs):
    raise AssertionError("the model or the data was loaded before --out was checked")
trainer.load_with_tokenizer = trainer.load_blocks = must_not_run
from loopus.cli import main
sys.argv = ["loopus", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("where", ["ro", "ro/run"])
def test_item06_out_on_a_read_only_file_system_is_one_line_before_loading(
    looped_tiny, train_text, tmp_path, where
):
    """A real read-only mount, in a private mount namespace (skipped where that cannot be made)."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1)")
    mount = tmp_path / "ro"
    mount.mkdir()
    args = " ".join(f"'{a}'" for a in tiny_args(looped_tiny, train_text, tmp_path / where))
    script = (
        f"mount -t tmpfs -o ro,size=1m none {mount} && cd {REPO} && HF_HUB_OFFLINE=1 PYTHONPATH={REPO} "
        f"{sys.executable} -c '{READ_ONLY_SCRIPT}' {args}"
    )
    done = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    if done.returncode != 0 and "mount" in done.stderr:
        pytest.skip(f"cannot mount a read-only file system here: {done.stderr.strip()[:200]}")
    _one_line_error((done.returncode, done.stdout, done.stderr), "cannot be written (Read-only file system)")


# ------------------------------------------------ 5: what a killed checkpoint write left, on the next run


def test_item05_the_next_run_restores_or_removes_what_killed_checkpoint_writes_left(short_run, tmp_path):
    from loopus_train.rundir import recover_checkpoints

    out = Path(shutil.copytree(short_run, tmp_path / "run"))
    root = out / "checkpoints"
    # a replace of step 4 killed between moving the old one aside and moving the new one in
    (root / "step-00000004").rename(root / ".old-step-00000004-0123456789ab")
    left = [".tmp-step-00000006-0123456789ab", ".tmp-step-00000021-25144", ".tmp-step-00000002-ba9876543210"]
    for name in left:  # unfinished writes (the second: a name of an older loopus)
        (root / name).mkdir()
        (root / name / "model.safetensors").write_bytes(b"\0" * 64)
    (root / ".lock-step-00000006").write_text("12345\n")  # SIGKILL leaves the lock file
    recover_checkpoints(out)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000004"]
    assert [step for step, _ in list_checkpoints(out)] == [2, 4]  # the moved-aside one is back, complete

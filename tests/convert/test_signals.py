"""SIGTERM and SIGKILL in the middle of `loopus convert --force` / `loopus analyze`, and a second writer of
the same output while the first one runs (issue 13, items 1, 5 and 10; acceptance 2, convert part).

The processes run through :mod:`tests.signal_driver`, which stops them at one call inside the weights write.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MID_WRITE = "loopus_convert.convert:_copy_range:10"  # the 10th of the tiny model's ~75 tensors


def _env(**extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        **extra,
    }


def _command(point: str | None, *args) -> list[str]:
    if point is None:
        return [sys.executable, "-m", "loopus", *map(str, args)]
    return [sys.executable, str(REPO / "tests" / "signal_driver.py"), point, *map(str, args)]


def _run(point: str | None, *args, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        _command(point, *args), cwd=REPO, env=_env(**env), capture_output=True, text=True, timeout=300
    )


def _start_blocked(tmp_path: Path, point: str, *args) -> subprocess.Popen:
    """Start ``loopus ARGS`` through the driver and return once it waits at ``point`` (mid-write)."""
    ready = tmp_path / "ready"
    ready.unlink(missing_ok=True)
    process = subprocess.Popen(
        _command(f"{point}:block", *args), cwd=REPO, env=_env(LOOPUS_TEST_READY=str(ready)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 300
    while not ready.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the driver never reached the blocking point"
        time.sleep(0.2)
    return process


def _snapshot(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def _siblings(out: Path) -> list[str]:
    """Everything next to ``out`` that is ours but not ``out`` itself (temporary, old, lock)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name and out.name in p.name)


@pytest.fixture
def previous(tiny_llama_dir, tmp_path) -> tuple[Path, dict[str, str]]:
    """A previous looped checkpoint (split 2:6) at tmp/ck, and the hash of each of its files."""
    from loopus_convert import convert_model

    out = convert_model(str(tiny_llama_dir), tmp_path / "ck", split="2:6").out
    return out, _snapshot(out)


def test_sigterm_mid_write_keeps_the_previous_checkpoint_and_leaves_nothing(
    tiny_llama_dir, tmp_path, previous
):
    out, before = previous
    args = ("convert", tiny_llama_dir, "--split", "3:7", "--out", out, "--force")
    process = _start_blocked(tmp_path, MID_WRITE, *args)
    partial = [p for p in out.parent.iterdir() if p.name.startswith(f".tmp-{out.name}-")]
    assert len(partial) == 1 and (partial[0] / "model.safetensors").stat().st_size > 0  # really mid-write
    # item 10: a second writer of the same --out stops at once, naming the first one
    second = _run(None, *args)
    assert second.returncode == 2, second.stderr
    assert f"being written by another loopus process (pid {process.pid})" in second.stderr
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr  # 143: what a shell reports for SIGTERM
    assert "terminated; nothing half-written was left behind" in stderr and "Traceback" not in stderr
    assert _snapshot(out) == before  # the previous checkpoint, byte for byte
    assert _siblings(out) == []  # no temporary directory, no lock file


def test_sigkill_mid_write_is_cleaned_by_the_next_run(tiny_llama_dir, tmp_path, previous):
    out, before = previous
    args = ("convert", tiny_llama_dir, "--split", "3:7", "--out", out, "--force")
    killed = _run(f"{MID_WRITE}:kill", *args)
    assert killed.returncode == -signal.SIGKILL
    assert _snapshot(out) == before
    assert [name for name in _siblings(out) if name.startswith(".tmp-")]  # what SIGKILL leaves
    again = _run(None, *args)
    assert again.returncode == 0, again.stderr
    assert _siblings(out) == []  # the next run removed the partial output
    assert '"split_start": 3' in (out / "config.json").read_text()


def test_sigterm_sent_to_itself_mid_write_of_a_new_output(tiny_llama_dir, tmp_path):
    out = tmp_path / "new" / "ck"
    terminated = _run(f"{MID_WRITE}:term", "convert", tiny_llama_dir, "--split", "2:6", "--out", out)
    assert terminated.returncode == 143, terminated.stderr
    assert not (tmp_path / "new").exists()  # nor the parent directory it created


def test_sigterm_during_analyze_leaves_nothing(tiny_llama_dir, tmp_path):
    out = tmp_path / "report"
    fast = ("--tokens", "512", "--seq-len", "32", "--device", "cpu", "--no-probes")
    terminated = _run("loopus_analyze.analyze:measure:1:term", "analyze", tiny_llama_dir, "--out", out, *fast)
    assert terminated.returncode == 143, terminated.stderr
    assert "terminated; nothing half-written" in terminated.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []

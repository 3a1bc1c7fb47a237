"""The one output-directory helper (``loopus_core.outputs``): atomic replace that survives a kill at any
point, recovery of what a killed writer left, the lock, and output checks made before the work (issue 13,
items 1, 5, 6 and 10)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loopus_core import outputs
from loopus_core.errors import LoopusError
from loopus_core.outputs import (
    atomic_directory,
    check_output,
    check_output_file,
    output_lock,
    prepare_output,
    write_text_atomic,
)

REPO = Path(__file__).resolve().parents[2]

# Writes version "new" over a directory holding version "old" and SIGKILLs itself at one point.
KILL_SCRIPT = r"""
import os, shutil, signal, sys
from pathlib import Path
from loopus_core import outputs

target, point = Path(sys.argv[1]), sys.argv[2]
kill = lambda: os.kill(os.getpid(), signal.SIGKILL)
real_exchange, real_replace, real_rmtree = outputs._exchange, os.replace, shutil.rmtree
replaces = []

def exchange(a, b):
    if point.startswith("fallback"):
        return False
    done = real_exchange(a, b)
    if point == "after-exchange":
        kill()
    return done

def replace(a, b):
    replaces.append(b)
    if point == "fallback-between" and len(replaces) == 2:  # old moved aside, new not in place
        kill()
    if point == "fallback-after" and len(replaces) == 3:  # new in place, old not renamed for removal
        kill()
    real_replace(a, b)

def rmtree(path, *args, **kwargs):
    if point == "removing-old":  # half of the old directory removed
        (Path(path) / "version").unlink()
        kill()
    real_rmtree(path, *args, **kwargs)

outputs._exchange, outputs.os.replace, outputs.shutil.rmtree = exchange, replace, rmtree
with outputs.atomic_directory(target, existing="replace") as tmp:
    (tmp / "version").write_text("new")
    (tmp / "new-only").write_text("x")
    if point == "writing":
        kill()
"""


def _old_directory(path: Path) -> Path:
    path.mkdir()
    (path / "version").write_text("old")
    (path / "old-only").write_text("x")
    return path


def _version(path: Path) -> str | None:
    """"old" or "new" when ``path`` is that complete directory, None when it is missing; fails on a mix."""
    if not path.exists():
        return None
    names = sorted(p.name for p in path.iterdir())
    version = (path / "version").read_text()
    assert names == sorted(["version", f"{version}-only"]), names
    return version


def _ours(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name != target.name)


@pytest.mark.parametrize(
    "point, right_after, after_recovery",
    [
        ("writing", "old", "old"),
        ("after-exchange", "new", "new"),
        ("removing-old", "new", "new"),
        ("fallback-between", None, "old"),  # no exchange: the next writer moves the old one back
        ("fallback-after", "new", "new"),
    ],
)
def test_a_kill_at_any_point_of_a_replace_leaves_the_old_or_the_new_directory(
    tmp_path, point, right_after, after_recovery
):
    target = _old_directory(tmp_path / "out")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(target), point], env=env, timeout=300,
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert _version(target) == right_after
    with output_lock(target):  # what the next writer of the target does first
        prepare_output(target, "replace")
    assert _version(target) == after_recovery
    assert _ours(target) == []  # temporary, old and lock files all gone


def test_replace_exchanges_the_directories(tmp_path):
    target = _old_directory(tmp_path / "out")
    with atomic_directory(target, existing="replace") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".tmp-out-")
        (tmp / "version").write_text("new")
        (tmp / "new-only").write_text("x")
        assert _version(target) == "old"  # untouched until the block completes
    assert _version(target) == "new" and _ours(target) == []


def test_stale_partials_of_this_target_only_are_removed(tmp_path):
    target = _old_directory(tmp_path / "out")
    stale = [".tmp-out-0123456789ab", ".old-out-ba9876543210", ".out.partial-abcd1234", ".out.tmp-x_y0z9k2"]
    for name in stale:
        (tmp_path / name).mkdir()
        (tmp_path / name / "weights").write_bytes(b"\0" * 1024)
    others = [".tmp-out-2-0123456789ab", ".tmp-outer-0123456789ab", ".tmp-out-notours", "notes.txt"]
    for name in others:  # another target's temporary directories and the user's files stay
        (tmp_path / name).write_text("keep")
    with atomic_directory(target, existing="replace") as tmp:
        (tmp / "version").write_text("new")
        (tmp / "new-only").write_text("x")
    assert _ours(target) == sorted(others)


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path):
    target = tmp_path / "out"
    release = tmp_path / "release"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time, pathlib\n"
         "from loopus_core.outputs import output_lock\n"
         "with output_lock(sys.argv[1]):\n"
         "    print('locked', flush=True)\n"
         "    while not pathlib.Path(sys.argv[2]).exists(): time.sleep(0.05)\n", str(target), str(release)],
        env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        held = f"being written by another loopus process \\(pid {holder.pid}\\)"
        with pytest.raises(LoopusError, match=held), atomic_directory(target):
            pass
        assert not target.exists()
    finally:
        release.touch()
        holder.wait(timeout=60)
    with atomic_directory(target) as tmp:  # released: the next writer goes ahead
        (tmp / "f").write_text("x")
    assert (target / "f").is_file() and _ours(target) == ["release"]


def test_the_lock_is_reentrant_and_removes_what_it_created(tmp_path):
    import threading

    target = tmp_path / "a" / "b" / "out"
    refused: list[str] = []

    def other_thread() -> None:
        try:
            with output_lock(target):
                refused.append("not refused")
        except LoopusError as exc:
            refused.append(str(exc))

    with output_lock(target):
        assert (tmp_path / "a" / "b" / ".lock-out").is_file()
        with atomic_directory(target) as tmp:  # the same thread may write what it locked
            (tmp / "f").write_text("x")
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join(timeout=60)
    assert len(refused) == 1 and "being written by another loopus process" in refused[0]
    assert sorted(p.name for p in target.parent.iterdir()) == ["out"]
    with pytest.raises(KeyboardInterrupt), output_lock(tmp_path / "c" / "d"):
        raise KeyboardInterrupt
    assert not (tmp_path / "c").exists()


def test_force_never_replaces_an_input_or_what_the_caller_refuses(tmp_path):
    out = tmp_path / "sb"
    (out / "models" / "llama").mkdir(parents=True)
    with pytest.raises(LoopusError, match="holds the input"):
        check_output(out, "replace", inputs=[out / "models" / "llama"])
    with pytest.raises(LoopusError, match="holds the input"):
        check_output(out, "replace", inputs=[out])
    with pytest.raises(LoopusError, match="sb is not ours; choose another directory"):
        check_output(out, "replace", replaceable=lambda d: "is not ours")
    empty = tmp_path / "empty"
    empty.mkdir()
    check_output(empty, "replace", replaceable=lambda d: "is not ours")  # an empty directory may go


@pytest.mark.parametrize("where", ["/proc/loopus-test/out", "/sys/loopus-test-out"])
def test_a_special_file_system_is_a_one_line_error_before_the_work(where):
    if not os.path.ismount("/" + where.split("/")[1]):
        pytest.skip(f"no {where.split('/')[1]} file system here")
    with pytest.raises(LoopusError, match="cannot be written"):
        with atomic_directory(where):
            raise AssertionError("the work must not start")
    with pytest.raises(LoopusError, match="cannot be written"):
        check_output_file(where + ".json", "--json")


def test_output_files_are_checked_and_written_whole(tmp_path):
    with pytest.raises(LoopusError, match="is a directory"):
        check_output_file(tmp_path, "--json")
    with pytest.raises(LoopusError, match="not a regular file"):
        check_output_file("/dev/null", "--json")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(LoopusError, match="is a file, not a directory"):
        check_output_file(blocker / "sub" / "e.json", "--json")
    target = write_text_atomic(tmp_path / "new" / "e.json", '{"a": 1}', "--json")
    assert target.read_text() == '{"a": 1}' and sorted(p.name for p in target.parent.iterdir()) == ["e.json"]


def test_without_an_exchange_the_replace_still_works(tmp_path, monkeypatch):
    monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)  # a file system without RENAME_EXCHANGE
    target = _old_directory(tmp_path / "out")
    with atomic_directory(target, existing="replace") as tmp:
        (tmp / "version").write_text("new")
        (tmp / "new-only").write_text("x")
    assert _version(target) == "new" and _ours(target) == []


READ_ONLY_SCRIPT = r"""
import json, sys
from loopus_core.errors import LoopusError
from loopus_core.outputs import atomic_directory, check_output_file
results = []
for check in (lambda: atomic_directory(sys.argv[1] + "/ck").__enter__(),
              lambda: check_output_file(sys.argv[1] + "/e.json", "--json")):
    try:
        check()
        results.append("written")
    except LoopusError as exc:
        results.append(str(exc))
print(json.dumps(results))
"""


def test_a_read_only_file_system_is_a_one_line_error(tmp_path):
    """A real read-only mount, in a private mount namespace (skipped where that cannot be made)."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1)")
    mount = tmp_path / "ro"
    mount.mkdir()
    script = (f"mount -t tmpfs -o ro,size=1m none {mount} && "
              f"PYTHONPATH={REPO} {sys.executable} -c '{READ_ONLY_SCRIPT}' {mount}")
    done = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    if done.returncode != 0 and "mount" in done.stderr:
        pytest.skip(f"cannot mount a read-only file system here: {done.stderr.strip()[:200]}")
    assert done.returncode == 0, done.stderr
    import json

    for message in json.loads(done.stdout):
        assert "cannot be written (Read-only file system)" in message, message


def test_lock_waits_for_the_holder_when_asked(tmp_path):
    """``wait=True`` (the model cache) blocks until the other process is done instead of failing."""
    import threading

    target = tmp_path / "cache"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\n"
         "from loopus_core.outputs import output_lock\n"
         "with output_lock(sys.argv[1]):\n"
         "    print('locked', flush=True)\n"
         "    sys.stdin.readline()\n", str(target)],
        env={**os.environ, "PYTHONPATH": str(REPO)}, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    events: list[str] = []

    def waiter() -> None:
        with output_lock(target, wait=True):
            events.append("acquired")

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.5)
    assert events == [] and thread.is_alive()  # still waiting (a non-waiting lock would have failed)
    holder.stdin.write("go\n")
    holder.stdin.flush()
    holder.wait(timeout=60)
    thread.join(timeout=60)
    assert events == ["acquired"]


def test_remove_directory_never_leaves_a_half_deleted_directory(tmp_path, monkeypatch):
    """A checkpoint pruned by the trainer: renamed away first, and an interrupt finishes the deletion."""
    from loopus_core.outputs import remove_directory

    for name in ("a", "b"):
        (tmp_path / name / "sub").mkdir(parents=True)
        (tmp_path / name / "sub" / "weights").write_bytes(b"\0" * 1024)
    remove_directory(tmp_path / "a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    real_rmtree, calls = shutil.rmtree, []

    def interrupted(path, *args, **kwargs):
        calls.append(Path(path).name)
        if len(calls) == 1:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the deletion
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(outputs.shutil, "rmtree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        remove_directory(tmp_path / "b")
    assert calls[0].startswith(".tmp-b-") and list(tmp_path.iterdir()) == []  # finished, then re-raised

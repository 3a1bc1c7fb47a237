"""The outputs the toolkit writes: locks, atomic directories and files, replacement.

Every output directory of the toolkit (an analysis report, a looped checkpoint, a training checkpoint, the
cached default model) is written through :func:`atomic_directory`:

1. the writer takes the target's lock (:func:`output_lock`: ``flock`` on ``.lock-NAME`` next to it), so a
   second loopus process writing the same target stops with a one-line error instead of racing;
2. under the lock, what a killed writer left is recovered or removed (:func:`recover_stale`), and the
   target is checked (:func:`check_output`: a file in the way, an unwritable parent, ``--force`` over a
   directory it must not replace);
3. the files go into ``.tmp-NAME-<hex>`` next to the target, which takes the target's place only when
   everything was written: a new target is a rename; a replaced one is an atomic exchange of the two
   directories (``renameat2(RENAME_EXCHANGE)``), or where the file system cannot exchange, the old one is
   moved to ``.old-NAME-<hex>`` first and moved back by the next writer if the process died in between.
   A kill at any moment therefore leaves the old or the new directory at the target, never a mix.

An error, Ctrl-C or SIGTERM (which the CLI turns into an interrupt) removes the temporary directory and
any parent directory the call created; SIGKILL leaves ``.tmp-NAME-*``, removed by the next writer of the
same target. Output files (``eval --json``) get the same treatment from :func:`check_output_file` and
:func:`write_text_atomic`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import logging
import os
import re
import secrets
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from loopus_core.errors import LoopusError

log = logging.getLogger(__name__)

EXISTING = ("error", "replace", "merge")
_SUFFIX = r"[0-9a-f]{12}"  # of our temporary names; without '-' so that NAME-<hex> is never another NAME's
_LEGACY = r"\.{name}\.(?:partial|tmp)-[a-z0-9_]{{8}}"  # temporary names of loopus before the lock (mkdtemp)
_LOCAL = threading.local()  # .held: the output locks this thread holds, and how often each was entered


@contextlib.contextmanager
def output_lock(target: str | Path, label: str = "--out", *, wait: bool = False) -> Iterator[Path]:
    """Hold the write lock of ``target`` for the block: ``flock`` on the file ``.lock-NAME`` next to it.

    The missing parent directories are created first (and removed again on exit if they stayed empty, as
    is the lock file). Another process holding the lock is a one-line LoopusError naming its pid (with
    ``wait``: block until it is released). Reentrant within a thread, so a command can lock its output
    for the whole run and write it with :func:`atomic_directory` inside (another thread of the same process
    is refused like another process). A parent that cannot be created or written is a one-line
    LoopusError; a file system without locks (some network mounts) goes on without one. Yields the
    absolute target path.
    """
    target = _absolute(target)
    _check_parent_writable(target, label)
    held = _LOCAL.__dict__.setdefault("held", {})
    created: list[Path] = []
    try:
        _make_parents(target.parent, created)
        key = target.parent.resolve() / target.name
        if key in held:
            fd = None
        else:
            fd = _acquire(_lock_path(target), target, label, wait)
    except BaseException as exc:
        _remove_created(created)
        if isinstance(exc, OSError):
            raise _unwritable(target, label, exc) from None
        raise
    held[key] = held.get(key, 0) + 1
    try:
        yield target
    finally:
        held[key] -= 1
        if fd is not None:
            del held[key]
            with contextlib.suppress(OSError):
                _lock_path(target).unlink()  # while still holding it; a waiter then sees another inode
            os.close(fd)
        _remove_created(created)


@contextlib.contextmanager
def atomic_directory(
    target: str | Path,
    *,
    existing: str = "error",
    label: str = "--out",
    fsync: bool = False,
    replaceable: Callable[[Path], str | None] | None = None,
    inputs: Iterable[str | Path] = (),
) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``target``; it becomes ``target`` when the block completes.

    ``existing`` says what happens when ``target`` already exists: ``error`` (a LoopusError before anything
    is written), ``replace`` (an atomic exchange, see the module docstring; ``replaceable`` and ``inputs``
    limit what may be replaced, :func:`check_output`) or ``merge`` (each top-level entry written replaces
    the one of the same name; other files stay). The target's lock is held throughout
    (:func:`output_lock`); stale temporary directories of the target are removed first. Problems with the
    target are one-line LoopusErrors naming ``label``, raised before the caller's work starts. On any
    exception or interrupt the temporary directory and the parent directories this call created are
    removed. The new directory gets the permissions the umask gives. ``fsync`` flushes every file before
    the rename and the rename itself (for checkpoints).
    """
    if existing not in EXISTING:
        raise ValueError(f"existing={existing!r} is not one of {EXISTING}")
    with output_lock(target, label) as target:
        prepare_output(target, existing, label, replaceable=replaceable, inputs=inputs)
        try:
            tmp = _fresh_path(target, ".tmp-")
            tmp.mkdir()
        except OSError as exc:
            raise _unwritable(target, label, exc) from None
        try:
            yield tmp
            if fsync:
                _fsync_tree(tmp)
            _commit(tmp, target, existing, label)
            if fsync:
                _fsync_path(target.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def prepare_output(target: str | Path, existing: str = "error", label: str = "--out", **checks) -> None:
    """:func:`recover_stale`, then :func:`check_output` (``checks``: its ``replaceable`` and ``inputs``):
    what a writer does once it holds the target's lock."""
    recover_stale(target)
    check_output(target, existing, label, **checks)


def check_output(
    target: str | Path,
    existing: str = "error",
    label: str = "--out",
    *,
    replaceable: Callable[[Path], str | None] | None = None,
    inputs: Iterable[str | Path] = (),
) -> None:
    """The one-line errors :func:`atomic_directory` raises for ``target``, for checking before long work.

    A file in the way; an existing directory with ``existing="error"``; with ``"replace"``, a directory
    that holds one of ``inputs`` (or is one), or a non-empty one for which ``replaceable(dir)`` gives a
    reason (the rest of the sentence after the path) not to replace it; a parent below a file, or one that
    cannot be written (read-only file system, no permission); with ``"merge"``, an existing directory that
    cannot be written.
    """
    target = _absolute(target)
    if target.exists() and not target.is_dir():
        raise LoopusError(f"{label} {target} exists and is not a directory; pass a directory path")
    if target.is_dir() and existing == "error":
        raise LoopusError(f"{label} {target} already exists; pass --force to replace it")
    if target.is_dir() and existing == "replace":
        _check_replaceable(target, label, replaceable, inputs)
    _check_parent_writable(target, label)
    if target.is_dir() and existing == "merge":
        _check_writable(target, target, label)  # merged into: the directory itself is written


def recover_stale(target: str | Path) -> None:
    """Put back or remove what a killed writer of ``target`` left next to it (call it holding the lock).

    ``.old-NAME-<hex>`` is the previous directory, moved aside by a replace that was killed before the new
    one took its place: when ``target`` is missing, the newest one is moved back. Every other one, every
    ``.tmp-NAME-<hex>`` (an unfinished write, or an old directory being removed) and the temporary
    directories of loopus versions before the lock (``.NAME.partial-*``, ``.NAME.tmp-*``) are deleted.
    """
    target = _absolute(target)
    if not target.parent.is_dir():
        return
    name = re.escape(target.name)
    old_name = re.compile(rf"\.old-{name}-{_SUFFIX}")
    stale_name = re.compile(rf"\.tmp-{name}-{_SUFFIX}|{_LEGACY.format(name=name)}")
    entries = list(target.parent.iterdir())
    old = sorted((p for p in entries if old_name.fullmatch(p.name)), key=lambda p: p.lstat().st_mtime)
    if old and not os.path.lexists(target):
        log.warning("restoring %s, moved aside by a replace that was interrupted", target)
        os.replace(old.pop(), target)
    for stale in old + [p for p in entries if stale_name.fullmatch(p.name)]:
        log.info("removing %s, left by an interrupted write of %s", stale.name, target.name)
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def remove_directory(path: str | Path) -> None:
    """Delete the directory ``path`` without ever leaving a half-deleted one there: it is renamed to
    ``.tmp-NAME-<hex>`` first (what :func:`recover_stale` removes if a kill stops the deletion); an
    interrupt during the deletion finishes it before it propagates."""
    path = _absolute(path)
    doomed = _fresh_path(path, ".tmp-")
    os.replace(path, doomed)
    try:
        shutil.rmtree(doomed, ignore_errors=True)
    except BaseException:  # an interrupt: finish the deletion first
        shutil.rmtree(doomed, ignore_errors=True)
        raise


def check_output_file(path: str | Path, label: str) -> Path:
    """One-line errors, before the work, for an output file that cannot be written: a directory or a
    special file in the way, a parent below a file, a read-only or special file system (tried by creating
    and removing a temporary file where it will go). Returns the absolute path."""
    path = _absolute(path)
    if path.is_dir():
        raise LoopusError(f"{label} {path} is a directory; pass a file path")
    if path.exists() and not path.is_file():
        raise LoopusError(f"{label} {path} is not a regular file; pass a file path")
    ancestor = _nearest_existing(path.parent)
    if not ancestor.is_dir():
        raise LoopusError(f"{label} {path} cannot be created: {ancestor} is a file, not a directory")
    probe = _fresh_path(ancestor / path.name, ".tmp-")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        probe.unlink()
    except OSError as exc:
        raise _unwritable(path, label, exc) from None
    return path


def write_text_atomic(path: str | Path, text: str, label: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file next to it and a rename (never half a file);
    missing parent directories are created; a failure is a one-line LoopusError. Returns the path."""
    path = check_output_file(path, label)
    tmp = _fresh_path(path, ".tmp-")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _unwritable(path, label, exc) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _absolute(path: str | Path) -> Path:
    return Path(os.path.abspath(Path(path).expanduser()))


def _fresh_path(target: Path, prefix: str) -> Path:
    """``PREFIX + NAME-<12 hex digits>`` next to ``target``: the names :func:`recover_stale` knows."""
    return target.with_name(f"{prefix}{target.name}-{secrets.token_hex(6)}")


def _lock_path(target: Path) -> Path:
    return target.with_name(f".lock-{target.name}")


def _acquire(lock: Path, target: Path, label: str, wait: bool) -> int | None:
    """An open descriptor of ``lock`` holding its exclusive flock (see :func:`output_lock`)."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise LoopusError(
                f"{label} {target} is being written by another loopus process{holder}; wait for it to "
                "finish or choose another directory"
            ) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            log.debug("%s: the file system has no locks (%s); writing without one", lock, exc.strerror)
            return fd
        try:
            current = os.stat(lock)
        except FileNotFoundError:
            current = None
        held = os.fstat(fd)
        if current is not None and (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)  # the previous holder removed this lock file while we waited: take the new one


def _lock_holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        os.lseek(fd, 0, os.SEEK_SET)
        return f" (pid {int(os.read(fd, 32).decode().strip())})"
    return ""


def _unwritable(target: Path, label: str, exc: OSError) -> LoopusError:
    reason = exc.strerror or type(exc).__name__
    return LoopusError(f"{label} {target} cannot be written ({reason}); choose another directory")


def _nearest_existing(directory: Path) -> Path:
    while not os.path.lexists(directory):
        directory = directory.parent
    return directory


def _check_parent_writable(target: Path, label: str) -> None:
    ancestor = _nearest_existing(target.parent)
    if not ancestor.is_dir():
        raise LoopusError(f"{label} {target} cannot be created: {ancestor} is a file, not a directory")
    _check_writable(ancestor, target, label)


def _check_writable(directory: Path, target: Path, label: str) -> None:
    if not os.access(directory, os.W_OK | os.X_OK):
        read_only = bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
        reason = "Read-only file system" if read_only else "Permission denied"
        raise LoopusError(f"{label} {target} cannot be written ({reason}); choose another directory")


def _check_replaceable(
    target: Path, label: str, replaceable: Callable[[Path], str | None] | None, inputs: Iterable[str | Path]
) -> None:
    """``--force`` never deletes an input, nor a non-empty directory ``replaceable`` refuses."""
    real = target.resolve()
    for item in inputs:
        source = _absolute(item).resolve()
        if source == real or real in source.parents:
            raise LoopusError(
                f"{label} {target} holds the input {item}; --force would delete it: choose another directory"
            )
    if replaceable is not None and any(target.iterdir()):
        reason = replaceable(target)
        if reason:
            raise LoopusError(f"{label} {target} {reason}; choose another directory")


def _make_parents(directory: Path, created: list[Path]) -> None:
    missing = []
    while not os.path.lexists(directory):
        missing.append(directory)
        directory = directory.parent
    if not directory.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"{directory} is a file, not a directory")
    for path in reversed(missing):
        path.mkdir()
        created.append(path)


def _remove_created(created: list[Path]) -> None:
    for directory in reversed(created):
        with contextlib.suppress(OSError):
            directory.rmdir()
    created.clear()


def _commit(tmp: Path, target: Path, existing: str, label: str) -> None:
    """Move the finished temporary directory into place according to ``existing``."""
    if not os.path.lexists(target):
        os.replace(tmp, target)
    elif existing == "merge":
        for entry in tmp.iterdir():
            destination = target / entry.name
            if destination.is_dir() and not destination.is_symlink():
                shutil.rmtree(destination)
            os.replace(entry, destination)
        shutil.rmtree(tmp, ignore_errors=True)
    elif existing == "replace":
        _swap(tmp, target)
        shutil.rmtree(tmp, ignore_errors=True)  # now the old directory
    else:  # it appeared while we wrote, although we hold its lock: not written by loopus; keep it
        raise LoopusError(f"{label} {target} appeared while it was being written; nothing was replaced")


def _swap(new: Path, target: Path) -> None:
    """Exchange the directories ``new`` and ``target``: afterwards ``target`` is the new one and ``new``
    names the old one. One atomic ``renameat2(RENAME_EXCHANGE)`` where the kernel and file system have it;
    else ``target`` is moved to ``.old-NAME-<hex>`` first (put back at once on an exception, and by
    :func:`recover_stale` after a kill)."""
    if _exchange(new, target):
        return
    old = _fresh_path(target, ".old-")
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    os.replace(old, new)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


@functools.cache
def _renameat2():
    """The C library's ``renameat2``, or None (not Linux, or a C library without it)."""
    try:
        func = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two existing paths; False where the system or the file system cannot."""
    func = _renameat2()
    if func is None:
        return False
    if func(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _fsync_tree(path: Path) -> None:
    """Flush every file below ``path`` and the directory itself to disk."""
    for file in path.rglob("*"):
        if file.is_file():
            with file.open("rb") as fh:
                os.fsync(fh.fileno())
    _fsync_path(path)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

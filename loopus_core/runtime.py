"""Where and how the work runs: device, dtype, autocast, and atomic output directories.

Every output directory of the toolkit (an analysis report, a looped checkpoint, a training checkpoint, the
cached default model) is written through :func:`atomic_directory`: the files go into a temporary directory
next to the target, which is renamed into place only when everything was written; an error or Ctrl-C
removes it again, together with any parent directory the call created.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from loopus_core.errors import LoopusError

log = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
PRECISIONS = ("auto", "fp32", "bf16")
EXISTING = ("error", "replace", "merge", "discard")


def resolve_dtype(name: str) -> torch.dtype:
    """``float32`` / ``bfloat16`` / ``float16`` (and the short forms fp32, bf16, fp16) to a torch dtype."""
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise LoopusError(f"--dtype {name!r} is not one of float32, bfloat16, float16") from None


def resolve_device(name: str) -> torch.device:
    """``cpu`` / ``cuda`` / ``cuda:N`` / ``auto`` (cuda when available) to a torch device."""
    name = name.lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise LoopusError(f"--device {name} asked for, but no CUDA device is available; use --device cpu")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise LoopusError(f"--device {name!r} is not one of cpu, cuda, cuda:N, auto")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast for ``bf16``, and for ``auto`` on a GPU that supports it; None means plain fp32."""
    if precision not in PRECISIONS:
        raise LoopusError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device``'s type, or a no-op when ``dtype`` is None (fp32)."""
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build modules in ``dtype`` inside the block (``torch.set_default_dtype``), restored afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@contextlib.contextmanager
def atomic_directory(
    target: str | Path, *, existing: str = "error", label: str = "--out", fsync: bool = False
) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``target``; it becomes ``target`` when the block completes.

    ``existing`` says what happens when ``target`` already exists: ``error`` (a LoopusError before anything
    is written), ``replace`` (the old directory is moved aside and removed once the new one is in place),
    ``merge`` (each top-level entry written replaces the one of the same name; other files stay) or
    ``discard`` (the existing directory wins, e.g. written by a concurrent process; the new one is dropped).
    Problems with the target (a file in the way, no permission) are one-line LoopusErrors naming ``label``
    and raised before the caller's work starts. On any exception or interrupt the temporary directory and
    the parent directories this call created are removed. The new directory gets the permissions the umask
    gives (``mkdtemp`` makes it 0700). ``fsync`` flushes every file before the rename (for checkpoints).
    """
    if existing not in EXISTING:
        raise ValueError(f"existing={existing!r} is not one of {EXISTING}")
    target = Path(target).expanduser().absolute()
    check_output(target, existing, label)
    created: list[Path] = []
    tmp: Path | None = None
    try:
        _make_parents(target.parent, created)
        tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix(target), dir=target.parent))
        tmp.chmod(0o777 & ~_umask())
    except OSError as exc:
        _remove_created(created)
        raise LoopusError(
            f"{label} {target} cannot be written ({exc.strerror}); choose another directory"
        ) from None
    try:
        yield tmp
        if fsync:
            _fsync_tree(tmp)
        _commit(tmp, target, existing)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_created(created)
        raise


def check_output(target: str | Path, existing: str = "error", label: str = "--out") -> None:
    """The one-line errors :func:`atomic_directory` would raise for ``target``, checked before long work."""
    target = Path(target).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise LoopusError(f"{label} {target} exists and is not a directory; pass a directory path")
    if target.is_dir() and existing == "error":
        raise LoopusError(f"{label} {target} already exists; pass --force to replace it")
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise LoopusError(f"{label} {target} cannot be created: {parent} is a file, not a directory")


def _make_parents(directory: Path, created: list[Path]) -> None:
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        path.mkdir()
        created.append(path)


def _remove_created(created: list[Path]) -> None:
    for directory in reversed(created):
        with contextlib.suppress(OSError):
            directory.rmdir()
    created.clear()


def _commit(tmp: Path, target: Path, existing: str) -> None:
    """Move the finished temporary directory into place according to ``existing``."""
    if not target.exists():
        os.replace(tmp, target)
    elif existing == "merge":
        for entry in tmp.iterdir():
            destination = target / entry.name
            if destination.is_dir() and not destination.is_symlink():
                shutil.rmtree(destination)
            os.replace(entry, destination)
        shutil.rmtree(tmp, ignore_errors=True)
    elif existing == "discard":
        log.debug("%s appeared while writing; keeping it", target)
        shutil.rmtree(tmp, ignore_errors=True)
    else:  # replace (or error, if the target appeared meanwhile: a concurrent writer; the newer one wins)
        old = Path(tempfile.mkdtemp(prefix=f".old-{target.name}-", dir=target.parent))
        os.replace(target, old / target.name)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)


def temporary_prefix(target: Path) -> str:
    """The name prefix of :func:`atomic_directory`'s temporary directory for ``target``: ``.tmp-NAME-``."""
    return f".tmp-{target.name}-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_tree(path: Path) -> None:
    """Flush every file below ``path`` and the directory itself to disk."""
    for file in path.rglob("*"):
        if file.is_file():
            with file.open("rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

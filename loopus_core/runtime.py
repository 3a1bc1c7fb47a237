"""Where and how the work runs: the device, the dtype, bf16 autocast.

The outputs the work writes (locks, atomic directories and files) live in :mod:`loopus_core.outputs`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from loopus_core.errors import LoopusError

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
PRECISIONS = ("auto", "fp32", "bf16")


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

"""JSON in and out. Written strictly (analysis.json, ``eval --json``): never ``NaN`` or ``Infinity``, which
are not JSON and which strict readers (``jq``, browsers' ``JSON.parse``) reject. Read through
:func:`read_json`: a file that cannot be read or parsed is one line saying so."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from loopus_core.errors import LoopusError, first_line


def jsonable(value):
    """Plain JSON types: arrays as lists, numpy scalars as Python numbers, non-finite floats as null."""
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


def dumps_strict(value, **kwargs) -> str:
    """``json.dumps`` of ``jsonable(value)`` with ``allow_nan=False`` (a non-finite float is null)."""
    return json.dumps(jsonable(value), allow_nan=False, **kwargs)


def read_json(path: str | Path, what: str = "", fix: str = ""):
    """The JSON value in the file ``path``. A file that cannot be read (missing, a directory, no
    permission, not UTF-8) or does not parse is a one-line LoopusError: ``[WHAT ]PATH is not readable JSON
    (the reason)[; FIX]``, where ``what`` is the flag that named the file and ``fix`` what to do about it."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError) as exc:
        message = f"{f'{what} ' if what else ''}{path} is not readable JSON ({first_line(exc)})"
        raise LoopusError(f"{message}; {fix}" if fix else message) from None

"""Strict JSON for the files the toolkit writes (analysis.json, ``eval --json``): never ``NaN`` or
``Infinity``, which are not JSON and which strict readers (``jq``, browsers' ``JSON.parse``) reject."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


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

"""Small HTML pieces of the report: escaping, numbers with intervals, tables, arrays read back from JSON.

Every string that came from the user passes through :func:`e`; table cells are pre-escaped HTML.
"""

from __future__ import annotations

import html
import math

import numpy as np

from loopus_core.split import parse_pair


def e(value) -> str:
    """HTML-escaped text of anything."""
    return html.escape(str(value), quote=True)


def num(value, digits: int = 3, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "&ndash;"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def pct(value) -> str:
    return "&ndash;" if value is None else f"{100 * value:.0f}%"


def interval(est: dict | None, digits: int = 3, signed: bool = True) -> str:
    """``value [low, high]`` of an estimate dict, or a dash."""
    if not est or est.get("value") is None:
        return "&ndash;"
    return (f'{num(est["value"], digits, signed)} <span class="muted">[{num(est["low"], digits, signed)}, '
            f'{num(est["high"], digits, signed)}]</span>')


def table(header: list[str], rows: list[list[str]], *, left: int = 1, highlight: set[int] = frozenset(),
          table_id: str | None = None) -> str:
    """A table from pre-escaped cell HTML; the first ``left`` columns are left-aligned, rows in
    ``highlight`` (indices) are marked."""
    head = "".join(f'<th class="{"l" if i < left else ""}">{h}</th>' for i, h in enumerate(header))
    body = []
    for r, row in enumerate(rows):
        cells = "".join(f'<td class="{"l" if i < left else ""}">{c}</td>' for i, c in enumerate(row))
        body.append(f'<tr class="{"best" if r in highlight else ""}">{cells}</tr>')
    ident = f' id="{e(table_id)}"' if table_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def layers_text(lo: int, hi: int) -> str:
    """Layers lo..hi-1 as text."""
    if hi <= lo:
        return "none"
    return f"{lo}" if hi - lo == 1 else f"{lo}&ndash;{hi - 1}"


def split_tuple(text: str) -> tuple[int, int]:
    pair = parse_pair(text)
    if pair is None:
        raise ValueError(f"not an A:B split: {text!r}")
    return pair


def array(value) -> np.ndarray | None:
    """A float array from JSON lists (null -> NaN)."""
    if value is None:
        return None
    raw = np.array(value, dtype=object)
    return np.array([np.nan if v is None else v for v in raw.ravel()], dtype=np.float64).reshape(raw.shape)

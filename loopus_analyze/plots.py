"""The report's figures: matplotlib on an Agg canvas (no pyplot state), embedded as base64 PNG.

Each function returns the ``<figure>`` HTML of one plot. Axes follow one convention: per-state plots put
state s (the output of layer s-1) on x, per-layer plots layer i (state i -> i+1), maps put A (the first
loop layer) on x and B (the first decoder layer) on y.
"""

from __future__ import annotations

import base64
import html
import io

import numpy as np


def _figure(width: float = 5.6, height: float = 3.6):
    from matplotlib.figure import Figure  # lazy: matplotlib is slow to import

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def png(fig, alt: str, caption: str = "") -> str:
    """A ``<figure>`` with the figure as an inline base64 PNG."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">{cap}</figure>'


def state_heatmap(matrix: np.ndarray, title: str, split: tuple[int, int] | None, *, vmin=None, vmax=None,
                  cmap: str = "viridis", caption: str = "") -> str:
    """A state x state matrix with the encoder / loop / decoder states boxed."""
    from matplotlib.patches import Rectangle

    fig = _figure(5.2, 4.4)
    ax = fig.subplots()
    image = ax.imshow(matrix, origin="lower", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.85)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("state")
    ax.set_ylabel("state")
    if split is not None:
        a, b = split
        n = matrix.shape[0]
        for lo, hi, color in ((0, a - 1, "white"), (a, b, "red"), (b + 1, n - 1, "white")):
            if hi >= lo:
                ax.add_patch(Rectangle((lo - 0.5, lo - 0.5), hi - lo + 1, hi - lo + 1, fill=False,
                                       edgecolor=color, linewidth=1.6))
    return png(fig, title, caption)


def split_map(grid: np.ndarray, title: str, marks: dict[str, tuple[int, int]], *, label: str,
              caption: str = "", symmetric: bool = False) -> str:
    """A value per split over (A, B) (``grid[A, B]``, NaN where invalid) with named splits marked."""
    return png(split_map_figure(grid, title, marks, label=label, symmetric=symmetric), title, caption)


def split_map_figure(grid: np.ndarray, title: str, marks: dict[str, tuple[int, int]], *, label: str,
                     symmetric: bool = False):
    """The figure of :func:`split_map`. The legend sits below the axes, outside the data, so that its
    markers cannot be read as points of the map."""
    fig = _figure(5.6, 5.0)
    ax = fig.subplots()
    values = np.ma.masked_invalid(grid.T)
    finite = grid[np.isfinite(grid)]
    vmax = float(np.percentile(np.abs(finite), 98)) if finite.size else 1.0
    kwargs = {"vmin": -vmax, "vmax": vmax, "cmap": "RdBu_r"} if symmetric else {"cmap": "magma_r"}
    image = ax.imshow(values, origin="lower", interpolation="nearest", **kwargs)
    fig.colorbar(image, ax=ax, shrink=0.85, label=label)
    styles = [("*", "cyan", 16), ("o", "none", 14), ("s", "none", 12), ("D", "none", 10)]
    for (name, (a, b)), (marker, face, size) in zip(marks.items(), styles, strict=False):
        ax.plot([a], [b], marker=marker, color=face, mec="black" if face != "none" else "lime", ms=size,
                mew=2, ls="none", label=f"{name} ({a}:{b})")
    ax.set_xlabel("A (first loop layer)")
    ax.set_ylabel("B (first decoder layer)")
    ax.set_title(title, fontsize=10)
    if marks:
        fig.legend(fontsize=7, loc="outside lower center", ncols=min(len(marks), 3), markerscale=0.6)
    return fig


def estimates(rows: list[tuple[float, dict]], title: str, *, xlabel: str, ylabel: str, highlight=None,
              line: float | None = None, caption: str = "", series: list[tuple[str, list]] = ()) -> str:
    """Point estimates with 90% intervals (``{"value", "low", "high"}``) over x; ``highlight`` an x to mark,
    ``line`` a horizontal reference (e.g. the budget), ``series`` extra plain lines."""
    fig = _figure()
    ax = fig.subplots()
    xs = np.array([x for x, _ in rows], dtype=float)
    ys = np.array([e["value"] for _, e in rows])
    err = np.array([[e["value"] - e["low"] for _, e in rows], [e["high"] - e["value"] for _, e in rows]])
    ax.errorbar(xs, ys, yerr=np.clip(err, 0, None), fmt="o-", ms=4, capsize=3, lw=1.2, label="report text")
    for name, points in series:
        ax.plot([x for x, _ in points], [y for _, y in points], "x--", lw=1, ms=5, label=name)
    if highlight is not None:
        ax.axvline(highlight, color="tab:red", lw=1, ls="--", label="recommended")
    if line is not None:
        ax.axhline(line, color="gray", lw=1, ls=":", label="budget")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return png(fig, title, caption)


def pass_curves(curves: list[tuple[str, list[dict]]], title: str, *, ylabel: str, caption: str = "") -> str:
    """One curve per block over the number of passes 1..K, each point with its 90% interval."""
    fig = _figure()
    ax = fig.subplots()
    for name, points in curves:
        xs = np.arange(1, len(points) + 1)
        ys = np.array([p["value"] for p in points])
        err = np.array([[p["value"] - p["low"] for p in points], [p["high"] - p["value"] for p in points]])
        ax.errorbar(xs, ys, yerr=np.clip(err, 0, None), fmt="o-", ms=4, capsize=3, lw=1.2, label=name)
    ax.set_xticks(range(1, max(len(p) for _, p in curves) + 1) if curves else [])
    ax.set_xlabel("passes of the block (1 = the base model)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return png(fig, title, caption)


def _shade(ax, split: tuple[int, int] | None, per_layer: bool) -> None:
    """Shade the loop: layers A..B-1 on a per-layer axis, states A..B on a per-state axis."""
    if split is None:
        return
    lo, hi = (split[0] - 0.5, split[1] - 0.5) if per_layer else (split[0] - 0.5, split[1] + 0.5)
    ax.axvspan(lo, hi, color="tab:red", alpha=0.10, lw=0)
    for x in ((lo, hi) if per_layer else split):
        ax.axvline(x, color="tab:red", lw=0.8, ls="--")


def lines(series: list[tuple[str, np.ndarray]], title: str, *, per_layer: bool, split: tuple[int, int] | None,
          ylabel: str = "", caption: str = "", logy: bool = False) -> str:
    """Curves over states or layers with the loop shaded."""
    fig = _figure()
    ax = fig.subplots()
    for name, values in series:
        values = np.asarray(values, dtype=np.float64)
        ax.plot(np.arange(len(values)), values, marker="o", ms=3, lw=1.4, label=name)
    _shade(ax, split, per_layer)
    ax.set_xlabel("layer i (state i -> i+1)" if per_layer else "state s (output of layer s-1)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if logy:
        finite = np.concatenate([np.asarray(v, dtype=np.float64) for _, v in series])
        finite = finite[np.isfinite(finite)]
        if finite.size and (finite > 0).all():
            ax.set_yscale("log")
        else:  # zeros present: linear near 0, no negative decades for non-negative data
            ax.set_yscale("symlog", linthresh=1e-3)
            if finite.size and (finite >= 0).all():
                ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    return png(fig, title, caption)

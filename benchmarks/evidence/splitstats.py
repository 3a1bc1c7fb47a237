"""The split study's numbers (``splits.py``): zero-shot views per split, Spearman correlations, the plot.

For every trained split, the *zero-shot views* come from the one ``analysis.json``: the repeat cost (held-out
NLL change when the block runs twice, nats per token, and its KL, both from the selection text's map of every
split), the block CKA of each similarity view (mean debiased CKA among the loop states A..B, the quantity
the analysis correlates with the repeat cost) and the block drift of each view (mean angular distance from
state s to s+1 over the block's layers). The *outcome* at each K is the held-out NLL after training, averaged
over the seeds that finished for every split (each seed's runs share its held-out documents), reported as the
perplexity exp(mean NLL).

For each K and view: Spearman's rho between the view and the outcome over splits, a 95% percentile interval
from a bootstrap over splits (resampled with replacement; resamples where either side is constant are
dropped and counted), and a two-sided permutation p-value. Better training is a *lower* perplexity, so a view
that predicts it well has rho > 0 for repeat cost and drift, rho < 0 for CKA.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

RESAMPLES = 2000
PERMUTATIONS = 10000
VIEWS = ("repeat_delta_nll", "repeat_kl", "cka_raw", "cka_normed", "cka_no_massive", "drift_raw",
         "drift_normed", "drift_no_massive")


def zero_shot_views(record: dict, split: str) -> dict[str, float | None]:
    """Every view of VIEWS for ``split`` ("A:B") from one ``analysis.json`` record (None: not measured)."""
    from loopus_analyze.similarity import block_similarity

    a, b = (int(x) for x in split.split(":"))
    repeat = record["repeat_map"]["repeat"]
    meas = record["measurements"]
    views = meas.get("views") or {}
    pair = np.array([[a, b]])
    cka = {"raw": meas.get("cka_debiased")} | {k: v.get("cka") for k, v in views.items()}
    drift = {"raw": meas.get("drift")} | {k: v.get("drift") for k, v in views.items()}
    out: dict[str, float | None] = {"repeat_delta_nll": repeat["delta_nll"][a][b],
                                    "repeat_kl": repeat["kl"][a][b]}
    for name, matrix in cka.items():
        out[f"cka_{name}"] = (None if matrix is None
                              else float(block_similarity(np.array(matrix, float), pair)[0]))
    for name, per_layer in drift.items():
        out[f"drift_{name}"] = (None if per_layer is None
                                else float(np.mean(np.array(per_layer, float)[a:b])))
    return out


def spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray | float:
    """Spearman's rho (average ranks for ties) of x and y along the last axis; nan where either is constant.

    Rows of 2-D inputs are separate samples: rho = Pearson correlation of the rows' ranks."""
    from scipy.stats import rankdata

    rx, ry = rankdata(x, axis=-1), rankdata(y, axis=-1)
    rx = rx - rx.mean(axis=-1, keepdims=True)
    ry = ry - ry.mean(axis=-1, keepdims=True)
    norm = np.sqrt((rx**2).sum(axis=-1) * (ry**2).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.where(norm > 0, (rx * ry).sum(axis=-1) / np.where(norm > 0, norm, 1.0), np.nan)
    return float(rho) if rho.ndim == 0 else rho


def rank_test(x: np.ndarray, y: np.ndarray, seed: int = 0) -> dict:
    """rho, its 95% bootstrap interval over the points, the dropped resamples and a permutation p-value."""
    rng = np.random.default_rng(seed)
    rho = spearman(x, y)
    idx = rng.integers(0, len(x), size=(RESAMPLES, len(x)))
    boots = spearman(x[idx], y[idx])
    kept = boots[np.isfinite(boots)]
    shuffled = rng.permuted(np.tile(y, (PERMUTATIONS, 1)), axis=1)
    perm = spearman(np.broadcast_to(x, shuffled.shape), shuffled)
    p = None
    if math.isfinite(rho):
        p = float((np.sum(np.abs(perm) >= abs(rho) - 1e-12) + 1) / (PERMUTATIONS + 1))
    low, high = (np.percentile(kept, [2.5, 97.5]).tolist() if len(kept) else [None, None])
    return {"rho": rho if math.isfinite(rho) else None, "low": low, "high": high,
            "dropped_resamples": int(RESAMPLES - len(kept)), "p_permutation": p}


def seeds_used(plan: list[dict], runs: list[dict], seeds: tuple[int, ...]) -> list[int]:
    """The seeds every planned split finished (none finished: the first seed, on the splits that did)."""
    done = {(r["split"], r["seed"]) for r in runs}
    full = [seed for seed in seeds if all((p["split"], seed) in done for p in plan)]
    return full or [seeds[0]]


def per_split(plan: list[dict], runs: list[dict], seeds: list[int], loops: tuple[int, ...]) -> list[dict]:
    """Per split finished at every seed of ``seeds``: NLL per K averaged over them, and each seed's ppl."""
    rows = []
    for item in plan:
        mine = [r for r in runs if r["split"] == item["split"] and r["seed"] in seeds]
        if len(mine) < len(seeds):
            continue
        nll = {str(k): float(np.mean([r["loss"][str(k)] for r in mine])) for k in loops}
        rows.append({**item, "nll": nll, "ppl": {k: math.exp(v) for k, v in nll.items()},
                     "ppl_per_seed": {str(r["seed"]): r["ppl"] for r in mine}})
    return rows


def summarise(record: dict, plan: list[dict], runs: list[dict], s) -> dict:
    """The study's JSON body: every run, per-split means, views, and rho per (K, view) with intervals."""
    seeds = seeds_used(plan, runs, tuple(s.seeds))
    rows = per_split(plan, runs, seeds, s.eval_loops)
    views = {item["split"]: zero_shot_views(record, item["split"]) for item in plan}
    for row in rows:
        row["views"] = views[row["split"]]
    correlations: dict[str, dict] = {}
    for k in map(str, s.eval_loops):
        y = np.array([row["nll"][k] for row in rows])
        correlations[k] = {}
        for view in VIEWS:
            xs = [row["views"].get(view) for row in rows]
            if len(rows) >= 3 and all(v is not None for v in xs):
                correlations[k][view] = rank_test(np.array(xs, float), y)
    best = {k: min(rows, key=lambda r: r["nll"][k])["split"] for k in map(str, s.eval_loops)} if rows else {}
    expected = len(plan) * len(s.seeds)
    return {
        "partial": len(runs) < expected,
        "runs_done": len(runs),
        "runs_planned": expected,
        "seeds_averaged": seeds,
        "analysis": {"split": record["split"], "confidence": record.get("confidence"),
                     "base_nll_selection": record["repeat_map"].get("base_nll"),
                     "map_tokens": record["repeat_map"].get("tokens")},
        "views": views,
        "per_split": rows,
        "best_split_per_k": best,
        "spearman": correlations,
        "runs": runs,
    }


def plot(result: dict, path: Path) -> None:
    """Repeat cost (x) against held-out perplexity after training (y, log), one panel per K."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    rows = result["per_split"]
    loops = list(result["spearman"]) or ["1"]
    fig, axes = plt.subplots(1, len(loops), figsize=(4.2 * len(loops), 3.8), squeeze=False)
    for ax, k in zip(axes[0], loops, strict=True):
        for row in rows:
            x = row["views"]["repeat_delta_nll"]
            seeds = [v[k] for v in row["ppl_per_seed"].values()]
            pick = "analysis pick" in row["why"]
            ax.scatter([x] * len(seeds), seeds, s=10, color="0.6")
            ax.scatter([x], [row["ppl"][k]], s=40, color="C3" if pick else "C0", zorder=3)
            ax.annotate(row["split"], (x, row["ppl"][k]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        stat = result["spearman"].get(k, {}).get("repeat_delta_nll")
        title = f"K = {k}"
        if stat and stat["rho"] is not None:
            title += f": rho {stat['rho']:.2f} [{stat['low']:.2f}, {stat['high']:.2f}]"
        ax.set_title(title, fontsize=9)
        ax.set_yscale("log")
        for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis(FormatStrFormatter("%.1f"))
        ax.set_xlabel("zero-shot repeat cost (nats/token)")
    axes[0][0].set_ylabel("held-out perplexity after training")
    note = " (partial: {runs_done}/{runs_planned} runs)".format(**result) if result["partial"] else ""
    seeds = result["seeds_averaged"]
    fig.suptitle(f"Split study, seeds {seeds} averaged{note}; red = analysis pick", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def tables(result: dict) -> str:
    """Markdown tables of a ``splits.json``: every planned split, then rho per view and K."""
    loops = [str(k) for k in result["settings"]["eval_loops"]]
    done = {r["split"]: r for r in result["per_split"]}
    runs: dict[str, list] = {}
    for run in result["runs"]:
        runs.setdefault(run["split"], []).append(run)
    lines = [f"| split | why | repeat cost, nats (KL) | CKA raw / normed / no-massive | seeds done | "
             f"ppl K = {' / '.join(loops)} |", "|---|---|---|---|---|---|"]
    for item in result["plan"]:
        row, mine = done.get(item["split"]), runs.get(item["split"], [])
        views = result["views"][item["split"]]
        ppl = " / ".join(f"{row['ppl'][k]:.2f}" for k in loops) if row else "not trained yet"
        cka = " / ".join(_num(views.get(f"cka_{v}"), 2) for v in ("raw", "normed", "no_massive"))
        lines.append(f"| {item['split']} | {', '.join(item['why'])} | {_num(views.get('repeat_delta_nll'))} "
                     f"({_num(views.get('repeat_kl'))}) | {cka} | {len(mine)} | {ppl} |")
    lines += ["", "| view | " + " | ".join(f"rho at K = {k} [95%], p" for k in loops) + " |",
              "|---" * (len(loops) + 1) + "|"]
    for view in VIEWS:
        cells = []
        for k in loops:
            stat = result["spearman"].get(k, {}).get(view)
            cells.append("-" if not stat or stat["rho"] is None else f"{stat['rho']:+.2f} "
                         f"[{stat['low']:+.2f}, {stat['high']:+.2f}], {stat['p_permutation']:.2f}")
        lines.append(f"| {view} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m benchmarks.evidence.splitstats results/splits.json: the tables
    import json
    import sys

    print(tables(json.loads(Path(sys.argv[1]).read_text())))

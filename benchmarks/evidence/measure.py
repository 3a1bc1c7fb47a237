"""Accuracy per depth x K and the early-exit curve of a looped chain model on held-out programs.

Accuracy at depth d = the fraction of the deepest statements (hop depth == d) answered right, pooled over the
programs of max depth d of one split. The sets are trainer records (:meth:`Codec.record`): the logits at t
score ``labels[t + 1]``, whose hop depth is ``hops[t + 1]``. Early exit (the toolkit's ``threshold``
strategy): stop after the first pass k with ``sigmoid(q_k) > tau``, at most ``passes``. It is computed
offline from one trace of every pass (q_k and the answers at pass k), and checked against the model's own
``exit_strategy="threshold"`` forward.
"""

from __future__ import annotations

import torch


def _scored(s: dict, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, mask) of a set's depth-``d`` answers, aligned with ``logits[:, :-1]``."""
    return s["labels"][:, 1:], s["hops"][:, 1:] == d


@torch.no_grad()
def depth_accuracy(model, sets: dict, loops: int | None = None) -> dict[int, float]:
    """Accuracy per depth; ``loops`` None for a plain causal LM, else the looped model's ``num_loops``."""
    out = {}
    for d, s in sets.items():
        kwargs = {} if loops is None else {"num_loops": loops}
        pred = model(input_ids=s["input_ids"], **kwargs).logits[:, :-1].argmax(-1)
        target, m = _scored(s, d)
        out[d] = int(((pred == target) & m).sum()) / max(1, int(m.sum()))
    return out


def evaluate(model, sets: dict, loops: tuple[int, ...], taus: tuple[float, ...] = ()) -> dict:
    """Accuracy per depth at each K of ``loops``; with ``taus``, the early-exit curve (at most max(loops)
    passes) and its check against the model's own threshold exit at the middle tau on the deepest set."""
    out: dict = {"acc": {k: depth_accuracy(model, sets, k) for k in loops}}
    if taus:
        passes = max(loops)
        traces = {d: exit_trace(model, st, d, passes) for d, st in sets.items()}
        out["exit"] = exit_curve(traces, list(taus), passes)
        tau, deepest = taus[len(taus) // 2], max(sets)
        out["exit_check"] = {
            "tau": tau,
            "depth": deepest,
            "toolkit_mean_loops": toolkit_exit_loops(model, sets[deepest], tau, passes),
            "offline_mean_loops": next(r for r in out["exit"] if r["tau"] == tau)["loops"][deepest],
        }
    return out


@torch.no_grad()
def exit_trace(model, s: dict, d: int, passes: int) -> dict[str, torch.Tensor]:
    """Per program and pass k = 1..passes: right (B, P) depth-d answers right, q (B, P) sigmoid confidence,
    and count (B,) the program's depth-d statements."""
    ctx = model.prepare(s["input_ids"])
    h = model.encode(ctx)
    target, m = _scored(s, d)
    right, qs = [], []
    for _ in range(passes):
        h = model.loop_step(h, ctx)
        qs.append(torch.sigmoid(model.confidence_logit(h, ctx).float()))
        pred = model.decode(h, ctx)[:, :-1].argmax(-1)
        right.append(((pred == target) & m).sum(1))
    return {"right": torch.stack(right, 1), "q": torch.stack(qs, 1), "count": m.sum(1)}


def exit_point(trace: dict[str, torch.Tensor], tau: float) -> torch.Tensor:
    """0-based pass at which each program stops: the first with q > tau, else the last."""
    over = trace["q"] > tau
    over[:, -1] = True
    return over.float().argmax(1)


def exit_curve(traces: dict[int, dict], taus: list[float], passes: int) -> list[dict]:
    """Per tau: accuracy and mean loops per depth, mean loops over depths, and the fraction of the
    ``passes``-loop budget saved."""
    rows = []
    for tau in taus:
        acc, loops = {}, {}
        for d, t in traces.items():
            k = exit_point(t, tau)
            acc[d] = float(t["right"].gather(1, k[:, None]).sum()) / max(1, int(t["count"].sum()))
            loops[d] = float((k + 1).float().mean())
        mean = sum(loops.values()) / len(loops)
        rows.append({"tau": tau, "acc": acc, "loops": loops, "mean_loops": mean, "saved": 1 - mean / passes})
    return rows


@torch.no_grad()
def toolkit_exit_loops(model, s: dict, tau: float, passes: int) -> float:
    """Mean loops of the model's own threshold exit on one set (the check of :func:`exit_curve`)."""
    out = model(input_ids=s["input_ids"], exit_strategy="threshold", exit_threshold=tau, max_loops=passes)
    return float(out.loops_used.float().mean())

"""Held-out evaluation of a looped model: perplexity per loop count, confidence calibration, early exit.

* :func:`loss_per_loops` runs the loop once up to the largest requested count and decodes the state after
  each requested count K: next-token CE and perplexity per K, token accuracy, and the calibration of the
  confidence head against its training target (the sequence's fraction of correct next-token predictions):

      ECE   = sum_b (n_b / N) * |mean_b sigmoid(q) - mean_b correct|   over 10 equal-width bins of sigmoid(q)
      Brier = mean (sigmoid(q) - correct)^2

* :func:`early_exit_stats` runs the model's own early-exit forward (``exit_strategy="threshold"``) at each
  threshold: CE, perplexity, their change against always running ``max_loops``, and the mean loops used.

``loopus eval`` (perplexity on text) runs these through :func:`loopus_train.evaluate.evaluate_checkpoint`,
which knows where a training run's held-out documents are.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from loopus_core.checks import MAX_LOOPS, check_float, check_int, check_ints
from loopus_core.progress import Progress, ensure
from loopus_core.runtime import autocast

log = logging.getLogger(__name__)

ECE_BINS = 10


def _ppl(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def next_token_ce(
    logits: torch.Tensor, input_ids: torch.Tensor, reduction: str = "mean"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy (fp32) of ``logits`` (B, T, V) against ``input_ids`` (B, T), ``mean`` or
    ``sum`` over the B * (T - 1) predictions, and each sequence's fraction of correct argmax predictions
    (B,): the confidence head's training target."""
    shifted = logits[:, :-1].float()  # (B, T-1, V)
    targets = input_ids[:, 1:]
    ce = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), reduction=reduction)
    correct = (shifted.detach().argmax(-1) == targets).float().mean(dim=1)
    return ce, correct


def calibration(confidence: torch.Tensor, target: torch.Tensor, bins: int = ECE_BINS) -> dict:
    """ECE and Brier score of probabilities ``confidence`` against soft targets ``target`` (both (N,))."""
    confidence = confidence.double()
    target = target.double()
    which = torch.clamp((confidence * bins).long(), max=bins - 1)
    ece = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            ece += float(mask.double().mean() * (confidence[mask].mean() - target[mask].mean()).abs())
    return {
        "ece": ece,
        "brier": float(((confidence - target) ** 2).mean()),
        "mean_confidence": float(confidence.mean()),
        "mean_correct": float(target.mean()),
    }


def check_eval_settings(
    loops: Sequence[int], thresholds: Sequence[float], max_loops: int | None
) -> int:
    """One-line errors for the loop counts, the early-exit thresholds and the early-exit loop limit, before
    any work; returns the limit (``None``: the largest loop count; 0 is an error, not "the default")."""
    counts = check_ints(loops, "--loops", 1, MAX_LOOPS)
    limit = max(counts) if max_loops is None else max_loops
    _check_exit_settings(limit, thresholds)
    return limit


def _check_exit_settings(max_loops: int, thresholds: Sequence[float]) -> None:
    check_int(max_loops, "--max-loops", 1, MAX_LOOPS)
    for t in thresholds:
        check_float(t, "--exit-threshold", 0.0, 1.0, low_open=True, high_open=True)


@torch.no_grad()
def loss_per_loops(
    model: nn.Module,
    blocks: torch.Tensor,
    loops: Sequence[int],
    *,
    batch_size: int = 8,
    autocast_dtype: torch.dtype | None = None,
    progress: Progress | None = None,
) -> dict:
    """Held-out CE / perplexity / accuracy after each loop count in ``loops``, and the head's calibration.

    ``blocks`` (N, T) long. Returns ``{"loops": {"K": {"loss", "ppl", "accuracy"}}, "calibration": {...},
    "tokens": n}``; calibration pools every (sequence, K) pair.
    """
    counts = sorted(set(check_ints(loops, "--loops", 1, MAX_LOOPS)))
    device = next(model.parameters()).device
    ce_sums = dict.fromkeys(counts, 0.0)
    correct_sums = dict.fromkeys(counts, 0.0)
    confidences: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    batches = range(0, len(blocks), batch_size)
    with ensure(progress).task(f"loss at {len(counts)} loop counts", total=len(batches)) as advance:
        for start in batches:
            input_ids = blocks[start : start + batch_size].to(device)
            with autocast(device, autocast_dtype):
                ctx = model.prepare(input_ids)
                h = model.encode(ctx)  # (B, T, D)
                for k in range(1, counts[-1] + 1):
                    h = model.loop_step(h, ctx)
                    if k in ce_sums:
                        ce, correct = next_token_ce(model.decode(h, ctx), input_ids, "sum")
                        ce_sums[k] += float(ce)
                        correct_sums[k] += float(correct.sum())
                        confidences.append(torch.sigmoid(model.confidence_logit(h, ctx).float()).cpu())
                        targets.append(correct.cpu())
            advance(1)
    tokens = blocks.shape[0] * (blocks.shape[1] - 1)
    per = {
        str(k): {
            "loss": ce_sums[k] / tokens,
            "ppl": _ppl(ce_sums[k] / tokens),
            "accuracy": correct_sums[k] / blocks.shape[0],
        }
        for k in counts
    }
    return {
        "loops": per,
        "calibration": calibration(torch.cat(confidences), torch.cat(targets)),
        "tokens": tokens,
    }


@torch.no_grad()
def early_exit_stats(
    model: nn.Module,
    blocks: torch.Tensor,
    thresholds: Sequence[float],
    *,
    max_loops: int,
    batch_size: int = 8,
    autocast_dtype: torch.dtype | None = None,
    progress: Progress | None = None,
) -> dict:
    """Per threshold: CE, perplexity, their change against ``max_loops`` without exit, and mean loops used.

    Runs the model's own forward with ``exit_strategy="threshold"`` (sequences leave the loop once
    sigmoid(q) > threshold), so what is measured is what inference does.
    """
    _check_exit_settings(max_loops, thresholds)
    device = next(model.parameters()).device
    tokens = blocks.shape[0] * (blocks.shape[1] - 1)
    settings: list[tuple[str, float | None]] = [("none", None)] + [
        ("threshold", float(t)) for t in thresholds
    ]
    results: dict[str, dict] = {}
    batches = range(0, len(blocks), batch_size)
    with ensure(progress).task("early exit", total=len(batches) * len(settings)) as advance:
        for strategy, threshold in settings:
            ce_sum, loops_used = 0.0, []
            for start in batches:
                input_ids = blocks[start : start + batch_size].to(device)
                with autocast(device, autocast_dtype):
                    out = model(
                        input_ids,
                        num_loops=max_loops,
                        max_loops=max_loops,
                        exit_strategy=strategy,
                        exit_threshold=threshold,
                    )
                ce, _ = next_token_ce(out.logits, input_ids, "sum")
                ce_sum += float(ce)
                used = (
                    out.loops_used if out.loops_used is not None else torch.full((len(input_ids),), max_loops)
                )
                loops_used.append(used.float().cpu())
                advance(1)
            used = torch.cat(loops_used)
            key = "full" if threshold is None else f"{threshold:g}"
            results[key] = {
                "loss": ce_sum / tokens,
                "ppl": _ppl(ce_sum / tokens),
                "mean_loops": float(used.mean()),
                "max_loops_used": int(used.max()),
            }
    base = results["full"]
    for key, entry in results.items():
        entry["ppl_change"] = entry["ppl"] / base["ppl"] - 1.0 if key != "full" else 0.0
    return {"max_loops": max_loops, "thresholds": results}

"""Held-out evaluation of a looped model: perplexity per loop count, confidence calibration, early exit.

* :func:`loss_per_loops` runs the loop once up to the largest requested count and decodes the state after
  each requested count K: next-token CE and perplexity per K, token accuracy, and the calibration of the
  confidence head against its training target (the sequence's fraction of correct next-token predictions):

      ECE   = sum_b (n_b / N) * |mean_b sigmoid(q) - mean_b correct|   over 10 equal-width bins of sigmoid(q)
      Brier = mean (sigmoid(q) - correct)^2

* :func:`early_exit_stats` runs the model's own early-exit forward (``exit_strategy="threshold"``) at each
  threshold: CE, perplexity, their change against always running ``max_loops``, and the mean loops used.

:func:`evaluate_checkpoint` is what ``loopus eval`` calls.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from loopus_analyze.errors import LoopusError
from loopus_analyze.progress import Progress, ensure

log = logging.getLogger(__name__)

ECE_BINS = 10


def _ppl(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def _token_ce_sum(logits: torch.Tensor, input_ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Summed next-token CE over the batch (fp32) and each sequence's fraction of correct predictions."""
    shifted = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    ce = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), reduction="sum")
    correct = (shifted.argmax(-1) == targets).float().mean(dim=1)
    return float(ce), correct


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
    counts = sorted(set(int(k) for k in loops))
    if not counts or counts[0] < 1:
        raise LoopusError("--loops must list loop counts of at least 1 (e.g. 1,2,4,8)")
    device = next(model.parameters()).device
    ce_sums = dict.fromkeys(counts, 0.0)
    correct_sums = dict.fromkeys(counts, 0.0)
    confidences: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    batches = range(0, len(blocks), batch_size)
    with ensure(progress).task(f"loss at {len(counts)} loop counts", total=len(batches)) as advance:
        for start in batches:
            input_ids = blocks[start : start + batch_size].to(device)
            with _autocast(device, autocast_dtype):
                ctx = model.prepare(input_ids)
                h = model.encode(ctx)  # (B, T, D)
                for k in range(1, counts[-1] + 1):
                    h = model.loop_step(h, ctx)
                    if k in ce_sums:
                        ce, correct = _token_ce_sum(model.decode(h, ctx), input_ids)
                        ce_sums[k] += ce
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
    if max_loops < 1:
        raise LoopusError(f"--max-loops {max_loops} must be at least 1")
    for t in thresholds:
        if not 0.0 < t < 1.0:
            raise LoopusError(f"--exit-threshold {t} must lie strictly between 0 and 1")
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
                with _autocast(device, autocast_dtype):
                    out = model(
                        input_ids,
                        num_loops=max_loops,
                        max_loops=max_loops,
                        exit_strategy=strategy,
                        exit_threshold=threshold,
                    )
                ce, _ = _token_ce_sum(out.logits, input_ids)
                ce_sum += ce
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


def eval_blocks(
    checkpoint: Path, tokenizer, data: str | None, *, block_size: int | None, max_blocks: int
) -> tuple[torch.Tensor, str]:
    """The blocks to evaluate on and where they came from.

    With ``data``: all blocks of that text. Without: the held-out split of the training run that wrote
    ``checkpoint`` (same data, block size and seed), or else the built-in corpus.
    """
    from loopus_convert.data import load_blocks, pack_blocks, read_texts
    from loopus_convert.train import STATE_JSON

    state_file = checkpoint / STATE_JSON
    if data is None and state_file.is_file():
        run = json.loads(state_file.read_text())["config"]
        size = block_size or run["block_size"]
        split = load_blocks(
            tokenizer, run["data"], block_size=size, held_out=run["held_out"], seed=run["seed"]
        )
        return split.held_out[:max_blocks], f"the training run's held-out split ({run['data'] or 'built-in'})"
    size = block_size or 256
    blocks = pack_blocks(tokenizer, read_texts(data), size)
    source = data or "the built-in corpus"
    if len(blocks) < 1:
        raise LoopusError(f"--data {source} gives no block of {size} tokens; add text or lower --block-size")
    return blocks[:max_blocks], str(source)


def evaluate_checkpoint(
    checkpoint: str | Path,
    *,
    data: str | None = None,
    loops: Sequence[int] = (1, 2, 4, 8),
    thresholds: Sequence[float] = (0.6, 0.8, 0.9),
    max_loops: int | None = None,
    block_size: int | None = None,
    max_blocks: int = 64,
    batch_size: int = 8,
    device: str = "auto",
    precision: str = "auto",
    progress: Progress | None = None,
) -> dict:
    """Load a looped checkpoint (or a run directory's newest one) and evaluate it on held-out text.

    Returns ``{"checkpoint", "data", "blocks", "block_size", "loops": {...}, "calibration": {...},
    "early_exit": {...}}``; ``max_loops`` (default: the largest of ``loops``) bounds the early-exit loop.
    """

    from loopus_analyze.models import resolve_device
    from loopus_convert.train import autocast_dtype, load_with_tokenizer, resolve_checkpoint

    if max_blocks < 1 or batch_size < 1:
        raise LoopusError("--max-blocks and --batch-size must be at least 1")
    if block_size is not None and block_size < 2:
        raise LoopusError(f"--block-size {block_size} is too small; use at least 2 tokens")
    path = resolve_checkpoint(checkpoint)
    dev = resolve_device(device)
    model, tokenizer = load_with_tokenizer(path, dev)
    model.eval()
    blocks, source = eval_blocks(path, tokenizer, data, block_size=block_size, max_blocks=max_blocks)
    amp = autocast_dtype(precision, dev)
    per_loops = loss_per_loops(
        model, blocks, loops, batch_size=batch_size, autocast_dtype=amp, progress=progress
    )
    exits = (
        early_exit_stats(
            model,
            blocks,
            thresholds,
            max_loops=max_loops or max(loops),
            batch_size=batch_size,
            autocast_dtype=amp,
            progress=progress,
        )
        if thresholds
        else None
    )
    log.info("evaluated %s on %d blocks of %d tokens from %s", path, len(blocks), blocks.shape[1], source)
    return {
        "checkpoint": str(path),
        "data": source,
        "blocks": int(len(blocks)),
        "block_size": int(blocks.shape[1]),
        **per_loops,
        "early_exit": exits,
    }

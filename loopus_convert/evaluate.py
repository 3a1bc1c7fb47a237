"""Held-out evaluation of a looped model: perplexity per loop count, confidence calibration, early exit.

* :func:`loss_per_loops` runs the loop once up to the largest requested count and decodes the state after
  each requested count K: next-token CE and perplexity per K, token accuracy, and the calibration of the
  confidence head against its training target (the sequence's fraction of correct next-token predictions):

      ECE   = sum_b (n_b / N) * |mean_b sigmoid(q) - mean_b correct|   over 10 equal-width bins of sigmoid(q)
      Brier = mean (sigmoid(q) - correct)^2

* :func:`gate_report` reads the selective gate at every loop pass: the effective ``Abar`` (the weight the
  gate puts on the loop block's output ``u``; ``h_new = Abar * u + (1 - Abar) * h_old``), its mean and spread
  over every (token, channel) of the blocks, per pass.

* :func:`early_exit_stats` runs the model's own early-exit forward (``exit_strategy="threshold"``) at each
  threshold: CE, perplexity, their change against always running ``max_loops``, and the mean loops used.

* :func:`kv_strategy_stats` decodes the blocks token by token through the cache of each KV strategy at each
  K: CE, perplexity and top-token agreement with ``full``, and the cache's bytes against the base model's.

``loopus eval`` (perplexity on text) runs these through :func:`loopus_train.evaluate.evaluate_checkpoint`,
which knows where a training run's held-out documents are.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from loopus_convert.configuration_loopus import ExitSettings
from loopus_convert.modeling_loopus import LoopusCache
from loopus_core.checks import MAX_LOOPS, check_float, check_int, check_ints
from loopus_core.errors import LoopusError, first_line
from loopus_core.progress import Progress, ensure
from loopus_core.runtime import autocast

log = logging.getLogger(__name__)

ECE_BINS = 10
IGNORE_INDEX = -100  # the label of an unsupervised position (Hugging Face's ``labels`` convention)


def _ppl(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def next_token_ce(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    reduction: str = "mean",
    labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy (fp32) of ``logits`` (B, T, V), ``mean`` or ``sum`` over the supervised
    predictions, and each sequence's fraction of correct argmax predictions among them (B,): the confidence
    head's training target.

    The logits at position t are scored against ``labels[:, t + 1]`` (``labels`` (B, T) in the Hugging Face
    convention, :data:`IGNORE_INDEX` where unsupervised; None: ``input_ids``, all B * (T - 1) predictions).
    A sequence without a supervised position has the target 0 (see :func:`supervised_targets`).
    """
    shifted = logits[:, :-1].float()  # (B, T-1, V)
    targets = (input_ids if labels is None else labels)[:, 1:]
    ce = F.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]),
        targets.reshape(-1),
        reduction=reduction,
        ignore_index=IGNORE_INDEX,
    )
    hits = shifted.detach().argmax(-1) == targets
    if labels is None:
        return ce, hits.float().mean(dim=1)
    mask = targets != IGNORE_INDEX
    return ce, (hits & mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def supervised_targets(input_ids: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """(B,) the number of supervised predictions of each sequence (T - 1 each without ``labels``)."""
    if labels is None:
        return torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device)
    return (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)


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


def check_eval_settings(loops: Sequence[int], thresholds: Sequence[float], max_loops: int | None) -> int:
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
    labels: torch.Tensor | None = None,
) -> dict:
    """Held-out CE / perplexity / accuracy after each loop count in ``loops``, and the head's calibration.

    ``blocks`` (N, T) long; ``labels`` (N, T) or None as in :func:`next_token_ce`: only supervised
    predictions count (``tokens``: their number), accuracy is the mean over sequences of their fraction of
    correct predictions, and calibration pools every (sequence with a supervised position, K) pair. Returns
    ``{"loops": {"K": {"loss", "ppl", "accuracy"}}, "calibration": {...}, "tokens": n}``.
    """
    counts = sorted(set(check_ints(loops, "--loops", 1, MAX_LOOPS)))
    device = next(model.parameters()).device
    ce_sums = dict.fromkeys(counts, 0.0)
    correct_sums = dict.fromkeys(counts, 0.0)
    confidences: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    tokens = rows = 0
    batches = range(0, len(blocks), batch_size)
    with ensure(progress).task(f"loss at {len(counts)} loop counts", total=len(batches)) as advance:
        for start in batches:
            input_ids = blocks[start : start + batch_size].to(device)
            batch_labels = None if labels is None else labels[start : start + batch_size].to(device)
            supervised = supervised_targets(input_ids, batch_labels) > 0  # (B,)
            tokens += int(supervised_targets(input_ids, batch_labels).sum())
            rows += int(supervised.sum())
            with autocast(device, autocast_dtype):
                ctx = model.prepare(input_ids)
                h = model.encode(ctx)  # (B, T, D)
                for k in range(1, counts[-1] + 1):
                    h = model.loop_step(h, ctx)
                    if k in ce_sums:
                        ce, correct = next_token_ce(model.decode(h, ctx), input_ids, "sum", batch_labels)
                        ce_sums[k] += float(ce)
                        correct_sums[k] += float(correct[supervised].sum())
                        q = torch.sigmoid(model.confidence_logit(h, ctx).float())
                        confidences.append(q[supervised].cpu())
                        targets.append(correct[supervised].cpu())
            advance(1)
    per = {
        str(k): {
            "loss": ce_sums[k] / max(tokens, 1),
            "ppl": _ppl(ce_sums[k] / max(tokens, 1)),
            "accuracy": correct_sums[k] / max(rows, 1),
        }
        for k in counts
    }
    return {
        "loops": per,
        "calibration": calibration(torch.cat(confidences), torch.cat(targets)),
        "tokens": tokens,
    }


class _PassMoments:
    """Running float64 count, sum, sum of squares, min and max of one pass's Abar."""

    def __init__(self) -> None:
        self.count, self.total, self.squares = 0, 0.0, 0.0
        self.low, self.high = math.inf, -math.inf

    def add(self, values: torch.Tensor) -> None:
        values = values.detach().double()
        self.count += values.numel()
        self.total += float(values.sum())
        self.squares += float((values * values).sum())
        self.low = min(self.low, float(values.min()))
        self.high = max(self.high, float(values.max()))

    def summary(self, index: int) -> dict:
        mean = self.total / self.count
        var = max(0.0, self.squares / self.count - mean * mean)
        return {"pass": index, "mean": mean, "std": math.sqrt(var), "min": self.low, "max": self.high}


@torch.no_grad()
def gate_report(
    model: nn.Module,
    blocks: torch.Tensor,
    passes: int,
    *,
    batch_size: int = 8,
    autocast_dtype: torch.dtype | None = None,
) -> dict:
    """The selective gate's effective ``Abar`` at loop passes 1..``passes`` on ``blocks`` (N, T) long.

    At pass ``k`` the gate mixes the block's output ``u`` with its input ``h_old``: ``h_new = Abar * u +
    (1 - Abar) * h_old``, ``Abar`` (B, T, D) = ``model.gate.mix_weight(u - h_old)``, read with a forward hook
    on the gate while the model runs ``prepare -> encode -> loop_step x passes`` (what is reported is what the
    model computes). Per pass, over every (token, channel) of the blocks (all positions): ``mean``, ``std``
    (``sqrt(E[a^2] - E[a]^2)``, float64 sums), ``min`` and ``max``. Abar == 1 everywhere is the identity
    (the block's output passes unchanged); smaller values damp the pass. Returns ``{"passes": [{"pass",
    "mean", "std", "min", "max"}, ...], "tokens": n}``.
    """
    check_int(passes, "gate report passes", 1, MAX_LOOPS)
    device = next(model.parameters()).device
    moments = [_PassMoments() for _ in range(passes)]
    seen: list[torch.Tensor] = []

    def record(gate: nn.Module, args: tuple, output: torch.Tensor) -> None:
        u, h_old = args[0], args[1]
        with _unsharded(gate):
            seen.append(gate.mix_weight(u - h_old).float())  # (B, T, D)

    hook = model.gate.register_forward_hook(record)
    try:
        for start in range(0, len(blocks), batch_size):
            input_ids = blocks[start : start + batch_size].to(device)
            with autocast(device, autocast_dtype):
                ctx = model.prepare(input_ids)
                h = model.encode(ctx)  # (B, T, D)
                for k in range(passes):
                    seen.clear()
                    h = model.loop_step(h, ctx)
                    for a_bar in seen:
                        moments[k].add(a_bar)
    finally:
        hook.remove()
    return {"passes": [m.summary(k + 1) for k, m in enumerate(moments)], "tokens": int(blocks.numel())}


@contextlib.contextmanager
def _unsharded(module: nn.Module):
    """The module's whole parameters for the block: an FSDP2 unit (``fully_shard``) holds only its shard
    outside its own forward, and the forward hook runs after FSDP has resharded it; every rank calls this at
    the same point (an all-gather). Other modules are left as they are."""
    unshard = getattr(module, "unshard", None)
    if not callable(unshard):
        yield
        return
    unshard()
    try:
        yield
    finally:
        module.reshard()


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
    labels: torch.Tensor | None = None,
) -> dict:
    """Per threshold: CE, perplexity, their change against ``max_loops`` without exit, and mean loops used.

    Runs the model's own forward with ``exit_strategy="threshold"`` (sequences leave the loop once
    sigmoid(q) > threshold), so what is measured is what inference does; with ``labels`` (as in
    :func:`next_token_ce`) the CE is over the supervised predictions only.
    """
    _check_exit_settings(max_loops, thresholds)
    device = next(model.parameters()).device
    tokens = max(1, int(supervised_targets(blocks, labels).sum()))
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
                batch_labels = None if labels is None else labels[start : start + batch_size].to(device)
                ce, _ = next_token_ce(out.logits, input_ids, "sum", batch_labels)
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


@torch.no_grad()
def kv_strategy_stats(
    model: nn.Module,
    blocks: torch.Tensor,
    strategies: Sequence[str],
    loops: Sequence[int],
    *,
    batch_size: int = 8,
    autocast_dtype: torch.dtype | None = None,
    progress: Progress | None = None,
) -> dict:
    """What each KV strategy costs at each loop count K, decoding the blocks as a generation does.

    Each block (T tokens) is fed as its first half in one call, then one token per call (teacher-forced:
    the block's own tokens), through a fresh cache of the strategy at K loops without early exit. On the
    T - T // 2 predictions that follow: CE and perplexity, ``agreement`` = the fraction of them whose top
    token equals ``full``'s (the same prefix each time), and the cache's bytes per sequence at the end, also
    over one slot per layer (``vs_base``: what the base model's cache holds for the same tokens). ``full``
    is always measured, as the reference. Returns ``{"prompt_tokens", "decoded_tokens", "strategies":
    {name: {"K": {"loss", "ppl", "agreement", "cache_bytes", "vs_base"}}}}``.
    """
    names = ["full", *dict.fromkeys(s for s in strategies if s != "full")]
    check_kv_strategies(model, names)
    counts = sorted(set(check_ints(loops, "--loops", 1, MAX_LOOPS)))
    device = next(model.parameters()).device
    prompt = blocks.shape[1] // 2
    sums = {(name, k): [0.0, 0.0] for name in names for k in counts}  # CE sum, agreeing predictions
    held: dict[tuple[str, int], tuple[int, float]] = {}  # bytes per sequence, over one slot per layer
    batches = range(0, len(blocks), batch_size)
    with ensure(progress).task("KV strategies", total=len(batches) * len(counts)) as advance:
        for start in batches:
            input_ids = blocks[start : start + batch_size].to(device)
            for k in counts:
                reference = None
                for name in names:
                    with autocast(device, autocast_dtype):
                        logits, cache = _decode_stepwise(model, input_ids, prompt, k, name)
                    top = logits.argmax(-1)  # (B, T - prompt)
                    reference = top if reference is None else reference
                    ce = F.cross_entropy(
                        logits.flatten(0, 1).float(), input_ids[:, prompt:].flatten(), reduction="sum"
                    )
                    sums[(name, k)][0] += float(ce)
                    sums[(name, k)][1] += float((top == reference).sum())
                    bytes_held = cache.memory_bytes()
                    held[(name, k)] = (bytes_held // len(input_ids), bytes_held / cache.base_model_bytes())
                advance(1)
    decoded = blocks.shape[0] * (blocks.shape[1] - prompt)
    result: dict[str, dict] = {name: {} for name in names}
    for (name, k), (ce, agree) in sums.items():
        result[name][str(k)] = {
            "loss": ce / decoded,
            "ppl": _ppl(ce / decoded),
            "agreement": agree / decoded,
            "cache_bytes": held[(name, k)][0],
            "vs_base": held[(name, k)][1],
        }
    return {"prompt_tokens": prompt, "decoded_tokens": decoded, "strategies": result}


def check_kv_strategies(model: nn.Module, names: Sequence[str]) -> None:
    """A one-line error for a KV strategy the model does not know (the model's own rule), before any work."""
    for name in names:
        try:
            ExitSettings.resolve(model.config, kv_strategy=name)
        except ValueError as exc:
            raise LoopusError(f"--kv-strategy: {first_line(exc)}") from None


def _decode_stepwise(
    model: nn.Module, input_ids: torch.Tensor, prompt: int, num_loops: int, kv_strategy: str
) -> tuple[torch.Tensor, LoopusCache]:
    """Logits (B, T - prompt, V) predicting tokens ``prompt..T-1``: the first ``prompt`` tokens in one call,
    then one token per call, through one fresh cache of ``kv_strategy``; and that cache."""
    cache = LoopusCache(model.loop_range)
    settings = dict(cache=cache, use_cache=True, num_loops=num_loops, kv_strategy=kv_strategy)
    logits = [model(input_ids[:, :prompt], logits_to_keep=1, **settings).logits[:, -1]]
    for t in range(prompt, input_ids.shape[1] - 1):
        logits.append(model(input_ids[:, t : t + 1], **settings).logits[:, -1])
    return torch.stack(logits, dim=1), cache

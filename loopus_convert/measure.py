"""The measurements of a looped model on token blocks: loss per loop count, calibration, early exit, KV.

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
which knows where a training run's held-out documents are, and types their dicts as
:class:`loopus_convert.eval_types.PerplexityResult`; training runs them through
:func:`loopus_train.evaluate.run_eval`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

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


HEAD_CHUNK_ROWS = 1024  # rows one no-grad head call scores at most (200 MB of fp32 logits at 49,152 entries)


@dataclass(frozen=True)
class Supervision:
    """The positions of a batch whose next token is scored, and the records they belong to.

    A record is a run of positions whose ``position_ids`` count up by one (a new record starts where they
    do not: transformers' rule for packed sequences); without ``position_ids`` each row is one record. The
    position ``t`` is scored when ``labels[:, t + 1]`` (``input_ids`` without labels) is not
    :data:`IGNORE_INDEX` and ``t + 1`` lies in the same record: no prediction crosses into another record.
    Each record's feature for the confidence head is the state at its last token.
    """

    rows: torch.Tensor  # (N,) row of each scored position
    cols: torch.Tensor  # (N,) its position t (it predicts the token at t + 1)
    targets: torch.Tensor  # (N,) the token it predicts
    record: torch.Tensor  # (N,) the record it belongs to
    record_rows: torch.Tensor  # (R,) each record's row
    record_last: torch.Tensor  # (R,) each record's last position
    counts: torch.Tensor  # (R,) scored positions per record

    @classmethod
    def of(
        cls,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> Supervision:
        """The supervision of ``input_ids`` (B, T) under ``labels`` and ``position_ids`` (B or 1, T)."""
        batch, length = input_ids.shape
        device = input_ids.device
        starts = torch.zeros(batch, length, dtype=torch.bool, device=device)
        starts[:, 0] = True
        if position_ids is not None:
            starts[:, 1:] |= position_ids.expand(batch, length).diff(dim=1).to(device) != 1
        record_of = starts.flatten().cumsum(0).view(batch, length) - 1  # (B, T) record index
        ends = torch.cat([starts[:, 1:], torch.ones_like(starts[:, :1])], dim=1)  # last token of a record
        record_rows, record_last = ends.nonzero(as_tuple=True)
        targets = (input_ids if labels is None else labels)[:, 1:]
        scored = (targets != IGNORE_INDEX) & ~starts[:, 1:]  # (B, T - 1)
        rows, cols = scored.nonzero(as_tuple=True)
        record = record_of[rows, cols]
        counts = torch.zeros(len(record_rows), dtype=torch.long, device=device).index_add_(
            0, record, torch.ones_like(record)
        )
        return cls(rows, cols, targets[rows, cols], record, record_rows, record_last, counts)

    @property
    def num_records(self) -> int:
        return int(self.record_rows.numel())

    def states(self, h: torch.Tensor) -> torch.Tensor:
        """The scored positions' rows of ``h`` (B, T, D): (N, D)."""
        return h[self.rows, self.cols]

    def features(self, h: torch.Tensor) -> torch.Tensor:
        """Each record's confidence feature, ``h`` at its last token: (B, T, D) -> (R, D)."""
        return h[self.record_rows, self.record_last]

    def fraction_correct(self, hits: torch.Tensor) -> torch.Tensor:
        """(R,) each record's fraction of correct scored predictions (0 without one) from ``hits`` (N,)."""
        correct = torch.zeros(self.num_records, device=hits.device).index_add_(0, self.record, hits.float())
        return correct / self.counts.clamp(min=1)


def head_ce(
    model: nn.Module, states: torch.Tensor, targets: torch.Tensor, want_hits: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CE summed over the rows of ``states`` (N, D) against ``targets`` (N,) through ``model.head`` (final
    norm, lm_head, logit transform; logits in fp32), and whether each row's argmax is its target (N,) bool
    (None unless ``want_hits``). Without grad the rows go through the head in chunks of
    :data:`HEAD_CHUNK_ROWS`; with grad, in one call (its logits are kept for the backward pass anyway)."""
    step = max(1, len(states)) if torch.is_grad_enabled() else HEAD_CHUNK_ROWS
    total = states.new_zeros((), dtype=torch.float32)
    hits = []
    for start in range(0, len(states), step):
        logits = model.head(states[start : start + step]).float()  # (n, V)
        chunk = targets[start : start + step]
        total = total + F.cross_entropy(logits, chunk, reduction="sum")
        if want_hits:
            hits.append(logits.detach().argmax(-1) == chunk)
    if not want_hits:
        return total, None
    return total, torch.cat(hits) if hits else targets.new_zeros(0, dtype=torch.bool)


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
    position_ids: torch.Tensor | None = None,
) -> dict:
    """Held-out CE / perplexity / accuracy after each loop count in ``loops``, and the head's calibration.

    ``blocks`` (N, T) long; ``labels`` (N, T) or None as in :func:`next_token_ce`; ``position_ids`` (N, T) or
    None: records packed in a block (:class:`Supervision`). Only the scored predictions count (``tokens``:
    their number) and only their positions go through the head; accuracy is the mean over records of their
    fraction of correct predictions, and calibration pools every (record with a scored position, K) pair,
    the confidence read at the record's last token. Returns ``{"loops": {"K": {"loss", "ppl",
    "accuracy"}}, "calibration": {...}, "tokens": n}``.
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
            part = slice(start, start + batch_size)
            input_ids = blocks[part].to(device)
            positions = None if position_ids is None else position_ids[part].to(device)
            sup = Supervision.of(input_ids, None if labels is None else labels[part].to(device), positions)
            supervised = sup.counts > 0  # (R,)
            tokens += int(sup.counts.sum())
            rows += int(supervised.sum())
            with autocast(device, autocast_dtype):
                ctx = model.prepare(input_ids, position_ids=positions)
                h = model.encode(ctx)  # (B, T, D)
                for k in range(1, counts[-1] + 1):
                    h = model.loop_step(h, ctx)
                    if k in ce_sums:
                        ce, hits = head_ce(model, sup.states(model.decoder_states(h, ctx)), sup.targets)
                        correct = sup.fraction_correct(hits)  # (R,)
                        ce_sums[k] += float(ce)
                        correct_sums[k] += float(correct[supervised].sum())
                        q = torch.sigmoid(model.confidence_head(sup.features(h)).float())
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


def record_mask(
    blocks: torch.Tensor, labels: torch.Tensor | None, position_ids: torch.Tensor | None
) -> torch.Tensor | None:
    """(N, T) long: 1 on each row's first record (up to where ``position_ids`` first restart), 0 on what
    follows it, for the model's padding mask, when what follows holds no scored target in any row (one
    record per row, then padding); else None (no ``position_ids``, or rows of several records)."""
    if position_ids is None:
        return None
    later = (position_ids.expand_as(blocks).diff(dim=-1) != 1).cumsum(dim=-1) > 0  # (N, T - 1)
    targets = (blocks if labels is None else labels)[:, 1:]
    if bool(((targets != IGNORE_INDEX) & later).any()):
        return None
    return torch.cat([torch.ones_like(later[:, :1]), ~later], dim=1).long()


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
    position_ids: torch.Tensor | None = None,
) -> dict:
    """Per threshold: CE, perplexity, their change against ``max_loops`` without exit, and mean loops used.

    Runs the model's own forward with ``exit_strategy="threshold"`` (sequences leave the loop once
    sigmoid(q) > threshold), so what is measured is what inference does; with ``labels`` (as in
    :func:`next_token_ce`) the CE is over the supervised predictions only. ``position_ids`` (N, T): the
    records of each row. A row of one record, then padding (a held-out record's block): the padding is
    masked, and the model reads the confidence at the record's own last token (:func:`record_mask`). Rows
    of several records (text under ``--doc-mask``): each attends to itself, but the exit, which stops a
    whole row, reads the row's last token.
    """
    _check_exit_settings(max_loops, thresholds)
    device = next(model.parameters()).device
    masks = record_mask(blocks, labels, position_ids)
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
                rows = slice(start, start + batch_size)
                mask = None if masks is None else masks[rows].to(device)
                positions = (
                    None if mask is not None or position_ids is None else position_ids[rows].to(device)
                )
                with autocast(device, autocast_dtype):
                    out = model(
                        input_ids,
                        attention_mask=mask,
                        position_ids=positions,
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

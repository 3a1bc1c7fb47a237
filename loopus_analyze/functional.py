"""The functional check: what happens to next-token predictions when a candidate loop block runs twice,
or not at all, compared with blocks of the same length elsewhere in the model.

For a block ``A:B`` (layers ``A .. B-1``) of a model with ``L`` layers, on held-out text:

- **repeat**: layers ``[0..B) + [A..B) + [B..L)`` -- the block applied twice, what a 2-loop model does
  before any training (without the gate);
- **skip**: layers ``[0..A) + [B..L)`` -- the block removed.

For each variant: ``NLL`` (mean next-token negative log-likelihood, nats), ``delta_nll`` = NLL - base NLL,
``KL`` = mean ``KL(p_base || p_variant)`` of the next-token distributions, and top-1 agreement with the base
model. Means run over predictions made from positions ``1 .. T-2`` whose target is a real token: position 0
(the BOS / attention sink) and padding are masked out. Controls are blocks of the same length at other
offsets (spread over the allowed range); a block whose repetition hurts much less than its controls is a
good loop block. All passes run without a KV cache through :func:`loopus_analyze.models.layer_surgery`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from loopus_core.models import layer_surgery, model_parts
from loopus_core.progress import Progress, ensure

log = logging.getLogger(__name__)

DEFAULT_CONTROLS = 3


def repeat_indices(num_layers: int, start: int, end: int) -> list[int]:
    """Layer order that runs the block ``start:end`` twice: ``[0..end) + [start..end) + [end..L)``."""
    return list(range(0, end)) + list(range(start, end)) + list(range(end, num_layers))


def skip_indices(num_layers: int, start: int, end: int) -> list[int]:
    """Layer order without the block ``start:end``: ``[0..start) + [end..L)``."""
    return list(range(0, start)) + list(range(end, num_layers))


def control_blocks(
    num_layers: int, start: int, end: int, count: int = DEFAULT_CONTROLS
) -> list[tuple[int, int]]:
    """Up to ``count`` blocks of the same length as ``start:end`` at other offsets.

    Controls obey the same rule as candidates where they can: they leave layer 0 and layer L-1 outside the
    block (repeating the first or last layer is catastrophic and would make any candidate look good);
    only when that leaves fewer than ``count`` blocks are those allowed. Within that pool, blocks that do
    not overlap the candidate come first, picked at evenly spaced interior quantiles of their starts;
    when there are fewer than ``count`` of those, the rest are the blocks that overlap it least, taken
    alternately from both sides of the candidate.
    """
    length = end - start
    others = [s for s in range(0, num_layers - length + 1) if s != start]
    interior = [s for s in others if s >= 1 and s + length <= num_layers - 1]
    if len(interior) >= count:
        others = interior
    disjoint = [s for s in others if s + length <= start or s >= end]
    if len(disjoint) > count:
        positions = np.linspace(0, len(disjoint) - 1, count + 2)[1:-1]
        picks = sorted({disjoint[int(round(p))] for p in positions})
    else:
        picks = disjoint + _spread_overlapping(others, disjoint, start, end, count - len(disjoint))
    return [(s, s + length) for s in sorted(picks)]


def _spread_overlapping(others: list[int], taken: list[int], start: int, end: int, count: int) -> list[int]:
    """``count`` overlapping block starts, least overlap first, alternating between the sides of the
    candidate (so that the controls of a middle block are not all early or all late layers)."""
    length = end - start

    def overlap(s: int) -> int:
        return min(s + length, end) - max(s, start)

    sides = [sorted((s for s in others if s not in taken and (s < start) == left), key=overlap)
             for left in (True, False)]
    covered_left, covered_right = any(s < start for s in taken), any(s > start for s in taken)
    side = 1 if covered_left and not covered_right else 0  # begin with a side not yet covered
    picks: list[int] = []
    while len(picks) < count and (sides[0] or sides[1]):
        if not sides[side]:
            side = 1 - side
        picks.append(sides[side].pop(0))
        side = 1 - side
    return picks


@dataclass
class _Totals:
    """float64 sums over the masked predictions of one variant."""

    nll: float = 0.0
    kl: float = 0.0
    agree: float = 0.0
    count: int = 0

    def as_dict(self, base_nll: float) -> dict:
        n = max(self.count, 1)
        return {"nll": self.nll / n, "delta_nll": self.nll / n - base_nll, "kl": self.kl / n,
                "top1_agreement": self.agree / n, "tokens": self.count}


def prediction_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T-1) bool: the prediction at position t (of token t+1) counts iff t >= 1 and token t+1 is real."""
    valid = attention_mask[:, 1:].bool().clone()  # target t+1 is real (right padding: so is t)
    valid[:, 0] = False  # the prediction made from position 0 (BOS / attention sink)
    return valid


@dataclass
class FunctionalCheck:
    """Base NLL and, per checked block, the repeat / skip effects (and the controls of each candidate)."""

    base_nll: float
    tokens: int
    effects: dict[str, dict] = field(default_factory=dict)  # "A:B" -> {"repeat": {...}, "skip": {...}}
    controls: dict[str, list[str]] = field(default_factory=dict)  # candidate "A:B" -> control "A:B" list

    def summary(self, split: str) -> dict:
        """The candidate's effects with its controls' effects inlined (what the report and ranking read)."""
        return {
            "split": split,
            **self.effects[split],
            "controls": [{"split": c, **self.effects[c]} for c in self.controls.get(split, [])],
        }

    def to_json(self) -> dict:
        return {"base_nll": self.base_nll, "tokens": self.tokens, "effects": self.effects,
                "controls": self.controls}


@torch.no_grad()
def functional_check(
    model: torch.nn.Module,
    batches: Iterable,
    candidates: Sequence[tuple[int, int]],
    *,
    controls: int = DEFAULT_CONTROLS,
    progress: Progress | None = None,
) -> FunctionalCheck:
    """Measure repeat / skip effects of each candidate block and of its same-length controls.

    ``batches`` are held-out :class:`~loopus_analyze.corpus.TokenBatch`-like objects (``input_ids``,
    ``attention_mask``), never the measuring batches. ``candidates`` are ``(A, B)`` pairs. Every block is
    evaluated once even when it is the control of several candidates.
    """
    batches = list(batches)
    num_layers = model_parts(model).num_layers
    device = next(model.parameters()).device
    control_map: dict[str, list[str]] = {}
    blocks: list[tuple[int, int]] = []
    for a, b in candidates:
        key = f"{a}:{b}"
        if (a, b) not in blocks:
            blocks.append((a, b))
        ctrl = control_blocks(num_layers, a, b, controls)
        control_map[key] = [f"{x}:{y}" for x, y in ctrl]
        blocks.extend(c for c in ctrl if c not in blocks)
    variants: list[tuple[str, str, list[int]]] = []
    for a, b in blocks:
        variants.append((f"{a}:{b}", "repeat", repeat_indices(num_layers, a, b)))
        variants.append((f"{a}:{b}", "skip", skip_indices(num_layers, a, b)))
    totals = {(key, kind): _Totals() for key, kind, _ in variants}
    base = _Totals()
    log.info("functional check: %d blocks (%d variants) on %d held-out batches", len(blocks), len(variants),
             len(batches))
    with ensure(progress).task("functional check (repeat / skip blocks)",
                               len(batches) * (len(variants) + 1)) as advance:
        for batch in batches:
            ids = batch.input_ids.to(device)
            attention = batch.attention_mask.to(device)
            valid = prediction_mask(attention)  # (B, T-1)
            targets = ids[:, 1:][valid]  # (N,)
            base_logp = _log_probs(model, ids, attention)[:, :-1][valid]  # (N, V)
            base_top = base_logp.argmax(-1)
            base_p = base_logp.exp()
            base.nll += float(-base_logp.gather(1, targets[:, None]).double().sum())
            base.count += int(targets.numel())
            advance(1)
            for key, kind, order in variants:
                with layer_surgery(model, order):
                    logp = _log_probs(model, ids, attention)[:, :-1][valid]  # (N, V)
                t = totals[(key, kind)]
                t.nll += float(-logp.gather(1, targets[:, None]).double().sum())
                t.kl += float((base_p * (base_logp - logp)).sum(-1).double().sum())
                t.agree += float((logp.argmax(-1) == base_top).double().sum())
                t.count += int(targets.numel())
                advance(1)
    base_nll = base.nll / max(base.count, 1)
    effects: dict[str, dict] = {}
    for (key, kind), t in totals.items():
        effects.setdefault(key, {})[kind] = t.as_dict(base_nll)
    return FunctionalCheck(base_nll=base_nll, tokens=base.count, effects=effects, controls=control_map)


def _log_probs(model: torch.nn.Module, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """(B, T, V) float32 next-token log-probabilities, no KV cache."""
    logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
    return torch.log_softmax(logits.float(), dim=-1)

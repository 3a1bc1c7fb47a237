"""Random deep supervision (RDS) on one micro-batch: the heart of the LoopUS recipe.

Per micro-batch:

    S  = sorted random subset of --supervised step indices out of 1..--loop-steps
         (a generator seeded from (seed, update, micro-batch): every rank and every resume draws the same)
    h0 = encode(embed(x))
    for t = 1 .. max(S):                        steps after the last supervised one are skipped
        h_in = h_{t-1}.detach()                 no graph across steps: memory flat in the step count
        t not in S:  h_t = loop_step(h_in)      under no_grad
        t in S:      h_t = loop_step^P(h_in)    P = --passes-per-step (2 reproduces the official code)
                     CE_t  = CE(decode(h_t)),   CE_prev = CE(decode(h_in)) without grad
                     q_t   = confidence_logit(h_t), target = per-sequence fraction of correct next tokens
                     loss  = CE_t + beta * SiLU(CE_t - CE_prev) + conf_weight * BCE(q_t, target)
                     backward(loss / (|S| * grad_accum))   each supervised step its own backward
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loopus_convert.evaluate import next_token_ce
from loopus_core.runtime import autocast


def draw_supervised_steps(seed: int, update: int, micro: int, loop_steps: int, supervised: int) -> list[int]:
    """The supervised step indices (1-based, sorted) of one micro-batch, a pure function of its arguments."""
    key = hashlib.sha256(f"{seed}:{update}:{micro}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & ((1 << 63) - 1))
    chosen = torch.randperm(loop_steps, generator=generator)[:supervised] + 1
    return sorted(chosen.tolist())


@dataclass
class BatchStats:
    """Sums over the supervised steps of one or more micro-batches."""

    loss: float = 0.0
    ce: float = 0.0
    mono: float = 0.0
    bce: float = 0.0
    count: int = 0

    def add(self, other: BatchStats) -> None:
        self.loss += other.loss
        self.ce += other.ce
        self.mono += other.mono
        self.bce += other.bce
        self.count += other.count

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([self.loss, self.ce, self.mono, self.bce, float(self.count)], dtype=torch.float64)


def rds_micro_batch(
    model: nn.Module,
    input_ids: torch.Tensor,
    supervised_steps: list[int],
    *,
    passes: int = 1,
    beta: float = 1.0,
    conf_weight: float = 1.0,
    scale: float = 1.0,
    autocast_dtype: torch.dtype | None = None,
    train_encoder: bool = False,
) -> BatchStats:
    """Random deep supervision on one micro-batch; accumulates ``scale`` times each step's gradient.

    The state is detached between loop steps, so each supervised step's graph spans only its own
    ``passes`` loop passes and the decoder; steps after the last supervised one are not run.
    """
    amp = autocast(input_ids.device, autocast_dtype)
    supervised = set(supervised_steps)
    stats = BatchStats()
    with amp, torch.set_grad_enabled(train_encoder):
        ctx = model.prepare(input_ids)
        h = model.encode(ctx)  # (B, T, D)
    prev_ce: torch.Tensor | None = None  # CE of the decoder on the current state, when already known
    for step in range(1, max(supervised_steps) + 1):
        h_in = h if (step == 1 and train_encoder) else h.detach()
        if step not in supervised:
            with amp, torch.no_grad():
                h = model.loop_step(h_in, ctx)
            prev_ce = None
            continue
        with amp:
            if prev_ce is None:
                with torch.no_grad():
                    prev_ce, _ = next_token_ce(model.decode(h_in.detach(), ctx), input_ids)
            h_out = h_in
            for _ in range(passes):
                h_out = model.loop_step(h_out, ctx)
            ce, correct = next_token_ce(model.decode(h_out, ctx), input_ids)
            q = model.confidence_logit(h_out, ctx).float()  # (B,)
            bce = F.binary_cross_entropy_with_logits(q, correct)
            mono = F.silu(ce - prev_ce)
            loss = ce + beta * mono + conf_weight * bce
        if loss.requires_grad:
            (loss * scale).backward()
        stats.add(
            BatchStats(float(loss.detach()), float(ce.detach()), float(mono.detach()), float(bce.detach()), 1)
        )
        h = h_out.detach()
        prev_ce = ce.detach()
    return stats

"""Random deep supervision (RDS) on one micro-batch: the heart of the LoopUS recipe.

Per micro-batch:

    S  = sorted random subset of --supervised step indices out of 1..--loop-steps
         (a generator seeded from (seed, update, micro-batch): every rank and every resume draws the same)
    h0 = noise(encode(embed(x)), --init-noise-std)
    for t = 1 .. max(S):                        steps after the last supervised one are skipped
        h_in = h_{t-1}.detach()                 no graph across steps: memory flat in the step count
        t not in S:  h_t = loop_step(h_in)      under no_grad
        t in S:      h_t = loop_step^P(h_in)    P = --passes-per-step (2 reproduces the official code)
                     (each pass's output: h = noise(h, --noise-std))
                     CE_t  = CE(head(decoder(h_t)[scored])),  CE_prev likewise on h_in without grad
                     q_t   = confidence_head(h_t at each record's last token),
                     target = each record's fraction of correct scored predictions
                     loss  = CE_t + beta * SiLU(CE_t - CE_prev) + conf_weight * BCE(q_t, target)
                     backward(loss / (|S| * grad_accum))   each supervised step its own backward

Only the scored positions go through the head (final norm, lm_head, logit transform): the decoder layers
run on every position (attention needs them), then the states of the scored positions are gathered and
scored (:class:`loopus_convert.measure.Supervision`, :func:`~loopus_convert.measure.head_ce`). On
answer-only data, one position in tens. A term whose weight is 0 costs nothing: ``beta = 0`` skips the
previous-CE pass (decoder and head without grad) and the SiLU term; ``conf_weight = 0`` skips the
confidence head, its target (the argmax over the vocabulary) and the BCE. Either then reads 0 in the stats.

Under data parallelism every rank holds a slice of the batch. CE and the BCE are means, so the average of
the ranks' gradients is the whole batch's; SiLU is not linear, so the monotonicity term uses the batch's
CE - CE_prev (two numbers averaged over the ranks) and each rank's own CE gradient:
``SiLU(d) + SiLU'(d) * (CE_r - stop_grad(CE_r))`` with ``d = mean_r CE_r - mean_r CE_prev_r``, whose
rank-averaged gradient is exactly ``SiLU'(d) * grad CE``: the same update as one process with the whole batch.
The CE sum is divided by the mean over ranks of the scored count and the BCE sum by the mean over ranks of
the count of records with a scored position, so that the ranks' average is the whole batch's mean although
the ranks' counts differ.

With ``labels`` (Hugging Face convention, -100 where unsupervised: the prompt of a prompt/completion pair,
the user turns of a conversation) only the supervised positions are scored. With ``position_ids`` whose
values restart (records packed several to a block, :mod:`loopus_train.packing`), every attention layer of
the encoder, of every loop pass and of the decoder sees a block-diagonal causal mask (transformers builds it
from the position ids), no prediction crosses from one record into the next, and the confidence head reads
each record at its own last token: a packed batch trains exactly as its records padded one per block.

noise(h, s) = h + s * rms(h) * N(0, I), rms over the hidden size per token: the official code's latent noise
(``--noise-std``, per loop step) and randomised initial state (``--init-noise-std``); training only, off by
default.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loopus_convert.measure import Supervision, head_ce
from loopus_core.runtime import autocast


def draw_supervised_steps(seed: int, update: int, micro: int, loop_steps: int, supervised: int) -> list[int]:
    """The supervised step indices (1-based, sorted) of one micro-batch, a pure function of its arguments."""
    key = hashlib.sha256(f"{seed}:{update}:{micro}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & ((1 << 63) - 1))
    chosen = torch.randperm(loop_steps, generator=generator)[:supervised] + 1
    return sorted(chosen.tolist())


def latent_noise(h: torch.Tensor, std: float) -> torch.Tensor:
    """``h + std * rms(h) * N(0, 1)`` with each token's RMS over the hidden size (detached); ``h`` when
    ``std`` is 0."""
    if std <= 0:
        return h
    rms = h.detach().float().pow(2).mean(dim=-1, keepdim=True).sqrt()  # (B, T, 1)
    return h + (std * rms * torch.randn(h.shape, device=h.device)).to(h.dtype)


def monotonicity(
    ce: torch.Tensor, prev_ce: torch.Tensor, mean_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None
) -> torch.Tensor:
    """``SiLU(CE - CE_prev)``, of the whole batch when ``mean_over_ranks`` averages over data-parallel ranks
    (see the module docstring)."""
    if mean_over_ranks is None:
        return F.silu(ce - prev_ce)
    batch_ce, batch_prev = mean_over_ranks(torch.stack([ce.detach(), prev_ce.detach()]))
    d = batch_ce - batch_prev
    slope = torch.sigmoid(d) * (1 + d * (1 - torch.sigmoid(d)))  # SiLU'(d)
    return F.silu(d) + slope * (ce - ce.detach())


def confidence_bce(
    q: torch.Tensor, correct: torch.Tensor, rows: torch.Tensor, normaliser: torch.Tensor | float | None = None
) -> torch.Tensor:
    """BCE of the confidence logits ``q`` (R,) against ``correct``, summed over the records ``rows`` (R,)
    bool that have a supervised position and divided by ``normaliser`` (default: their count)."""
    per = F.binary_cross_entropy_with_logits(q, correct, reduction="none")
    return (per * rows).sum() / (rows.sum().clamp(min=1) if normaliser is None else normaliser)


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


def batch_counts(
    sup: Supervision, mean_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the CE sum and the BCE sum of a micro-batch are divided by: its scored predictions and its
    records with one, each averaged over the data-parallel ranks (one collective; see the module
    docstring)."""
    counts = torch.stack([sup.counts.sum(), (sup.counts > 0).sum()]).double()
    if mean_over_ranks is not None:
        counts = mean_over_ranks(counts).to(counts.device)
    return counts[0].clamp(min=1).float(), counts[1].clamp(min=1).float()


def _supervised_step_loss(
    model: nn.Module,
    h_out: torch.Tensor,
    ctx,
    sup: Supervision,
    norms: tuple[torch.Tensor, torch.Tensor],
    prev_ce: torch.Tensor | None,
    weights: tuple[float, float],
    mean_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, CE, monotonicity, BCE) of one supervised step's state ``h_out``: the decoder on every
    position, the head on the scored ones only; a term whose weight (``weights`` = beta, conf_weight) is 0
    is not computed (it reads 0)."""
    beta, conf_weight = weights
    states = sup.states(model.decoder_states(h_out, ctx))  # (N, D)
    ce_sum, hits = head_ce(model, states, sup.targets, want_hits=conf_weight != 0)
    ce = ce_sum / norms[0]
    zero = ce.new_zeros(())
    bce = mono = zero
    if conf_weight != 0:
        q = model.confidence_head(sup.features(h_out)).float().reshape(-1)  # (R,)
        bce = confidence_bce(q, sup.fraction_correct(hits), sup.counts > 0, norms[1])
    if beta != 0:
        mono = monotonicity(ce, prev_ce, mean_over_ranks)
    return ce + beta * mono + conf_weight * bce, ce, mono, bce


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
    noise_std: float = 0.0,
    init_noise_std: float = 0.0,
    before_last_backward: Callable[[], None] | None = None,
    mean_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None,
    labels: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> BatchStats:
    """Random deep supervision on one micro-batch; accumulates ``scale`` times each step's gradient.

    ``labels`` (B, T) or None: the supervised positions; ``position_ids`` (B, T) or None: records packed in
    a block, each its own block-diagonal attention and its own statistics (see the module docstring).

    The state is detached between loop steps, so each supervised step's graph spans only its own
    ``passes`` loop passes and the decoder; steps after the last supervised one are not run.
    ``before_last_backward`` runs just before the last supervised step's backward pass (the trainer turns
    gradient synchronisation on there); ``mean_over_ranks`` averages a tensor over data-parallel ranks.
    """
    amp = autocast(input_ids.device, autocast_dtype)
    supervised = set(supervised_steps)
    stats = BatchStats()
    sup = Supervision.of(input_ids, labels, position_ids)
    norms = batch_counts(sup, mean_over_ranks)
    with amp, torch.set_grad_enabled(train_encoder):
        ctx = model.prepare(input_ids, position_ids=position_ids)
        h = latent_noise(model.encode(ctx), init_noise_std)  # (B, T, D)
    # only the encoder reads the embeddings: keep their graph out of later stages (FSDP sees it)
    ctx = dataclasses.replace(ctx, inputs_embeds=ctx.inputs_embeds.detach())
    prev_ce: torch.Tensor | None = None  # CE of the decoder on the current state, when already known
    for step in range(1, max(supervised_steps) + 1):
        h_in = h if (step == 1 and train_encoder) else h.detach()
        if step not in supervised:
            with amp, torch.no_grad():
                h = latent_noise(model.loop_step(h_in, ctx), noise_std)
            prev_ce = None
            continue
        with amp:
            if prev_ce is None and beta != 0:  # the previous-CE pass only feeds the beta-weighted term
                with torch.no_grad():
                    states = sup.states(model.decoder_states(h_in.detach(), ctx))
                    prev_ce = head_ce(model, states, sup.targets, want_hits=False)[0] / norms[0]
            h_out = h_in
            for _ in range(passes):
                h_out = latent_noise(model.loop_step(h_out, ctx), noise_std)
            loss, ce, mono, bce = _supervised_step_loss(
                model, h_out, ctx, sup, norms, prev_ce, (beta, conf_weight), mean_over_ranks
            )
        if loss.requires_grad:
            if before_last_backward is not None and step == max(supervised_steps):
                before_last_backward()
            (loss * scale).backward()
        stats.add(
            BatchStats(float(loss.detach()), float(ce.detach()), float(mono.detach()), float(bce.detach()), 1)
        )
        h = h_out.detach()
        prev_ce = ce.detach()
    if conf_weight == 0:
        zero_unset_grads(model.confidence_head)
    return stats


def zero_unset_grads(module: nn.Module) -> None:
    """A zero gradient for each trainable parameter of ``module`` that has none: what a zero-weighted term
    gives it, written without computing the term, so the optimizer treats it as before (AdamW's decay, and
    an optimizer state that a resume finds complete)."""
    for param in module.parameters():
        if param.requires_grad and param.grad is None:
            param.grad = torch.zeros_like(param)

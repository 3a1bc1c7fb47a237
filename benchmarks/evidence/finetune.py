"""Fine-tuning the converted chain model on the answer labels: label-masked RDS and the plain fine-tune.

The toolkit's trainer (``loopus finetune``) scores next-token CE on every position; this task's loss lives on
the answer labels only (per-position labels arrive with issue 14). Until then this module runs RDS on the
model's stage API (``prepare / encode / loop_step / decode / confidence_logit``), reusing loopus_train's
supervised-step draw, its monotonicity term and its learning-rate schedule:

    S = draw_supervised_steps(seed, update, 0, loop_steps, supervised)
    h = encode(x) (no grad: the encoder is frozen)
    for t = 1 .. max(S): h_in = h.detach()
        t not in S: h = loop_step(h_in) without grad
        t in S:     h = loop_step(h_in); CE_t = answer CE of decode(h); q_t = confidence_logit(h)
                    loss_t = CE_t + beta * SiLU(CE_t - CE_{t-1}) + conf_weight * BCE(q_t, frac_t)
                    backward(loss_t / |S|)
    frac_t = each program's fraction of correct answers (METHOD.md's target, with answers for tokens)

Plain: the same converted model at one loop (identity gate: exactly the base model), answer CE, the same
layers trained (loop block and decoder; no gate, no head), as many updates as spend the RDS run's compute.
Compute units: tokens x layer passes, 1 per pass without grad and 3 per pass with forward + backward.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from benchmarks.evidence.pretrain import adamw, answer_ce
from benchmarks.evidence.task import Codec, Sampler
from loopus_convert import loop_base_model
from loopus_train.optim import lr_at, select_trainable
from loopus_train.rds import BatchStats, draw_supervised_steps, monotonicity

log = logging.getLogger(__name__)


@dataclass
class FinetuneSettings:
    """One fine-tune run (defaults: the research's round-2 protocol)."""

    split: str = "1:5"
    gate: str = "identity"
    mode: str = "rds"  # or "plain"
    parts: tuple[str, ...] = ("loop", "gate", "decoder", "head")
    depths: tuple[int, ...] = (0, 1, 2, 3, 4, 5)
    deep: int = 2
    steps: int = 400
    batch: int = 64
    lr: float = 1e-3
    wd: float = 0.01
    warmup: int = 30
    loop_steps: int = 4
    supervised: int = 2
    beta: float = 1.0
    conf_weight: float = 1.0
    seed: int = 1
    match_units: float | None = None  # plain: run as many updates as spend this compute


def looped_model(base_dir: str, split: str, gate: str):
    """The pretrained chain model (fp32) wrapped by the toolkit's ``loop_base_model`` at ``split``."""
    base = LlamaForCausalLM.from_pretrained(base_dir).float()
    return loop_base_model(base, split, num_loops=1, gate_init=gate)


def layer_counts(model) -> tuple[int, int, int]:
    """(encoder, loop block, decoder) layer counts of a looped model."""
    a, b = model.config.split_start, model.config.split_end
    return a, b - a, model.config.num_base_layers - b


def rds_answers(model, batch: dict, steps: list[int], s: FinetuneSettings) -> tuple[BatchStats, float]:
    """One label-masked RDS batch (gradients accumulated, see the module docstring); (stats, units)."""
    ids, labels = batch["input_ids"], batch["labels"]
    n_enc, n_loop, n_dec = layer_counts(model)
    tokens, sup, stats = ids.numel(), set(steps), BatchStats()
    ctx = model.prepare(ids)
    with torch.no_grad():
        h = model.encode(ctx)
    units, prev = float(tokens * n_enc), None
    for step in range(1, max(steps) + 1):
        h_in = h.detach()
        if step not in sup:
            with torch.no_grad():
                h = model.loop_step(h_in, ctx)
            units, prev = units + tokens * n_loop, None
            continue
        if prev is None:
            with torch.no_grad():
                prev, _ = answer_ce(model.decode(h_in, ctx), labels)
            units += tokens * n_dec
        h = model.loop_step(h_in, ctx)
        ce, frac = answer_ce(model.decode(h, ctx), labels)
        bce = F.binary_cross_entropy_with_logits(model.confidence_logit(h, ctx).float(), frac)
        mono = monotonicity(ce, prev, None)
        loss = ce + s.beta * mono + s.conf_weight * bce
        (loss / len(steps)).backward()
        units += 3 * tokens * (n_loop + n_dec)
        stats.add(
            BatchStats(float(loss.detach()), float(ce.detach()), float(mono.detach()), float(bce.detach()), 1)
        )
        h, prev = h.detach(), ce.detach()
    return stats, units


def plain_answers(model, batch: dict) -> tuple[BatchStats, float]:
    """One plain batch at one loop: answer CE backpropagated; (stats, units)."""
    ids, labels = batch["input_ids"], batch["labels"]
    n_enc, n_loop, n_dec = layer_counts(model)
    ctx = model.prepare(ids)
    with torch.no_grad():
        h = model.encode(ctx)
    ce, _ = answer_ce(model.decode(model.loop_step(h, ctx), ctx), labels)
    ce.backward()
    return BatchStats(float(ce.detach()), float(ce.detach()), 0.0, 0.0, 1), float(
        ids.numel() * (n_enc + 3 * (n_loop + n_dec))
    )


def plain_steps(model, s: FinetuneSettings, n: int) -> int:
    """Updates of the plain fine-tune: ``s.steps``, or as many as spend ``s.match_units``."""
    if s.match_units is None:
        return s.steps
    n_enc, n_loop, n_dec = layer_counts(model)
    per_update = s.batch * (n + 1) * (n_enc + 3 * (n_loop + n_dec))
    return max(1, round(s.match_units / per_update))


def finetune(model, s: FinetuneSettings, codec: Codec, n: int) -> dict:
    """Fine-tune ``model`` in place (``s.mode`` rds or plain); returns updates, units, wall time, stats."""
    parts = [p for p in s.parts if s.mode == "rds" or p not in ("gate", "head")]
    named = select_trainable(model, parts)
    params = [p for _, p in named]
    opt = adamw(named, s.lr, s.wd)
    train = Sampler(s.seed + 1000, n, held_out=False, codec=codec, deep=s.deep)
    steps = s.steps if s.mode == "rds" else plain_steps(model, s, n)
    units, t0, stats = 0.0, time.time(), BatchStats()
    model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, lr=s.lr, min_lr=0.1 * s.lr, warmup=s.warmup, total=steps)
        batch = train.batch(s.batch, list(s.depths))
        opt.zero_grad(set_to_none=True)
        if s.mode == "rds":
            sup = draw_supervised_steps(s.seed, step, 0, s.loop_steps, s.supervised)
            stats, used = rds_answers(model, batch, sup, s)
        else:
            stats, used = plain_answers(model, batch)
        units += used
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % 50 == 0:
            log.info(
                "%s %s step %d/%d ce %.4f (%.0f s)",
                s.mode,
                s.gate,
                step + 1,
                steps,
                stats.ce / max(1, stats.count),
                time.time() - t0,
            )
    model.eval()
    return {
        "settings": asdict(s),
        "updates": steps,
        "units": units,
        "wall_s": round(time.time() - t0, 1),
        "last_ce": stats.ce / max(1, stats.count),
        "trained": parts,
    }

"""The LoopUS trainer: random deep supervision over a looped checkpoint, in one readable loop.

Per optimizer update (``--steps`` of them), ``--grad-accum`` micro-batches of ``--batch-size`` packed blocks
(the global batch; under ``torchrun`` each rank takes its shard), each trained with random deep supervision
(:mod:`loopus_train.rds`); then the gradients are averaged over ranks (one all-reduce per update), clipped,
and AdamW steps (fp32 master weights; bf16 autocast where asked or where the GPU supports it; no weight decay
on norms, biases and the gate's ``A_log``; :mod:`loopus_train.optim`). The learning rate: warmup then cosine
to ``--min-lr``, one step per optimizer update.

Everything a run needs to continue lives in a checkpoint directory written atomically
(:mod:`loopus_train.state`): the looped model and tokenizer (loadable like any converted checkpoint), the
optimizer state, the step, the data position, every RNG state, the settings and the command line.
"""

from __future__ import annotations

import logging
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from loopus_convert.checkpoint import load_with_tokenizer
from loopus_core.errors import LoopusError
from loopus_core.runtime import autocast_dtype
from loopus_train.config import TrainConfig
from loopus_train.data import BlockSampler, load_blocks
from loopus_train.distributed import Distributed, all_reduce_gradients, all_reduce_mean, init_distributed
from loopus_train.evaluate import run_eval
from loopus_train.optim import build_optimizer, lr_at, select_trainable
from loopus_train.rds import BatchStats, draw_supervised_steps, rds_micro_batch
from loopus_train.rundir import append_jsonl, prepare_out_dir, start_run_dir
from loopus_train.state import CHECKPOINT_DIR, TrainState, save_checkpoint

log = logging.getLogger(__name__)

Callback = Callable[[dict], None]


@dataclass
class TrainResult:
    """What a run produced."""

    out: Path
    checkpoint: Path  # the newest checkpoint (the trained model)
    steps: int
    last_eval: dict | None


@dataclass
class _Run:
    """What the loop works with: set up once by :func:`_setup`."""

    cfg: TrainConfig
    dist: Distributed
    out: Path
    model: torch.nn.Module
    tokenizer: object
    params: list
    blocks: object
    held_out: torch.Tensor
    state: TrainState
    amp_dtype: torch.dtype | None
    metrics: Path
    checkpoint: Path | None


def train(cfg: TrainConfig, argv: list[str] | None = None, callback: Callback | None = None) -> TrainResult:
    """Fine-tune the looped checkpoint ``cfg.checkpoint`` into ``cfg.out`` (see the module docstring).

    ``callback`` receives one dict per event (``event``: start, step, eval, checkpoint, end) on rank 0.
    Raises :class:`LoopusError` for bad settings, data, checkpoints and output directories, and when the
    loss stops being finite (the last good checkpoint stays).
    """
    cfg.validate()
    dist = init_distributed(cfg.device)
    emit = callback if (callback is not None and dist.main) else (lambda event: None)
    run = _setup(cfg, dist, argv or sys.argv)
    emit(_start_event(run))
    for update in range(run.state.step, cfg.steps):
        began = time.perf_counter()
        record = _update(run, update)
        record["tokens_per_s"] = (
            cfg.batch_size * cfg.grad_accum * cfg.block_size / (time.perf_counter() - began)
        )
        if dist.main:
            append_jsonl(run.metrics, record)
        emit({"event": "step", **record, "steps": cfg.steps})
        step = update + 1
        if step % cfg.eval_every == 0 or step == cfg.steps:
            if dist.main:
                run.state.last_eval = run_eval(run.model, run.held_out, cfg, run.amp_dtype)
                record = {"kind": "eval", "step": step, **run.state.last_eval}
                append_jsonl(run.metrics, record)
                emit({"event": "eval", **record})
            dist.barrier()
        if step % cfg.save_every == 0 or step == cfg.steps:
            if dist.main:
                path = save_checkpoint(run.out, run.model, run.tokenizer, run.state, cfg.keep)
                emit({"event": "checkpoint", "step": step, "path": str(path)})
            dist.barrier()
            run.checkpoint = run.out / CHECKPOINT_DIR / f"step-{step:08d}"
    if run.checkpoint is None:
        raise LoopusError(f"--out {run.out}: nothing to do and no checkpoint was written")
    emit(
        {
            "event": "end",
            "step": cfg.steps,
            "checkpoint": str(run.checkpoint),
            "last_eval": run.state.last_eval,
        }
    )
    return TrainResult(out=run.out, checkpoint=run.checkpoint, steps=cfg.steps, last_eval=run.state.last_eval)


def _setup(cfg: TrainConfig, dist: Distributed, argv: list[str]) -> _Run:
    """Check ``--out``, load the model and the data, build the optimizer, and restore a resumed run."""
    if cfg.batch_size % dist.world:
        raise LoopusError(
            f"--batch-size {cfg.batch_size} does not split over {dist.world} processes; use a "
            "multiple of the process count"
        )
    out = Path(cfg.out).expanduser()
    resume_from = prepare_out_dir(cfg)
    model, tokenizer = load_with_tokenizer(resume_from or Path(cfg.checkpoint).expanduser(), dist.device)
    blocks = load_blocks(tokenizer, cfg.data, block_size=cfg.block_size, held_out=cfg.held_out, seed=cfg.seed)
    model.config.num_loops = cfg.loop_steps  # the saved checkpoints run the trained loop count by default
    named = select_trainable(model, cfg.train_parts)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    optimizer, group_names = build_optimizer(named, cfg, dist.device)
    record = {
        "scheduler": {
            "kind": "warmup_cosine",
            "lr": cfg.lr,
            "min_lr": cfg.min_lr,
            "warmup": cfg.warmup,
            "total": cfg.steps,
        },
        "param_group_names": group_names,
        "config": cfg.identity(),
        "argv": argv,
        "world_size": dist.world,
    }
    state = TrainState(0, BlockSampler(len(blocks.train), cfg.seed), optimizer, blocks.fingerprint, record)
    if resume_from is not None:
        state.load(resume_from)
        log.info("resuming %s from step %d (%s)", out, state.step, resume_from.name)
    else:
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
    metrics = out / "metrics.jsonl"
    if dist.main:
        metrics = start_run_dir(out, cfg, argv, state.step if resume_from is not None else None)
    dist.barrier()
    return _Run(
        cfg,
        dist,
        out,
        model,
        tokenizer,
        [p for _, p in named],
        blocks,
        blocks.held_out[: cfg.eval_blocks],
        state,
        autocast_dtype(cfg.precision, dist.device),
        metrics,
        resume_from,
    )


def _start_event(run: _Run) -> dict:
    return {
        "event": "start",
        "step": run.state.step,
        "steps": run.cfg.steps,
        "trainable": sum(p.numel() for p in run.params),
        "parts": list(run.cfg.train_parts),
        "world": run.dist.world,
        "train_blocks": len(run.blocks.train),
        "held_out_blocks": len(run.held_out),
        "precision": str(run.amp_dtype),
        "resumed_from": str(run.checkpoint) if run.checkpoint is not None else None,
    }


def _update(run: _Run, update: int) -> dict:
    """One optimizer update: the micro-batches' RDS, the all-reduce, clipping and the AdamW step."""
    cfg, dist, state = run.cfg, run.dist, run.state
    lr = lr_at(update, lr=cfg.lr, min_lr=cfg.min_lr, warmup=cfg.warmup, total=cfg.steps)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    state.optimizer.zero_grad(set_to_none=True)
    stats = BatchStats()
    drawn: list[list[int]] = []
    per_rank = cfg.batch_size // dist.world
    for micro in range(cfg.grad_accum):
        indices = state.sampler.take(cfg.batch_size)
        input_ids = run.blocks.train[indices[dist.rank * per_rank : (dist.rank + 1) * per_rank]].to(
            dist.device
        )
        steps = draw_supervised_steps(cfg.seed, update, micro, cfg.loop_steps, cfg.supervised)
        drawn.append(steps)
        stats.add(
            rds_micro_batch(
                run.model,
                input_ids,
                steps,
                passes=cfg.passes_per_step,
                beta=cfg.beta,
                conf_weight=cfg.conf_weight,
                scale=1.0 / (len(steps) * cfg.grad_accum),
                autocast_dtype=run.amp_dtype,
                train_encoder="encoder" in cfg.train_parts,
            )
        )
    all_reduce_gradients(run.params, dist.world)
    totals = all_reduce_mean(stats.as_tensor(), dist)
    loss, ce, mono, bce = (float(totals[i] / totals[4]) for i in range(4))
    if not math.isfinite(loss):
        last = f"; the last good checkpoint is {run.checkpoint}" if run.checkpoint is not None else ""
        raise LoopusError(
            f"the training loss became {loss} at step {update + 1} (lr {lr:.3g}){last}; "
            "lower --lr or use --precision fp32"
        )
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(run.params, max_norm))
    state.optimizer.step()
    state.step = update + 1
    return {
        "kind": "train",
        "step": state.step,
        "loss": loss,
        "ce": ce,
        "mono": mono,
        "bce": bce,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens": state.step * cfg.batch_size * cfg.grad_accum * cfg.block_size,
        "supervised_steps": drawn[0],
    }

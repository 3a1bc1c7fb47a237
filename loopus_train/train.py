"""The LoopUS trainer: random deep supervision over a looped checkpoint, in one readable loop.

Per optimizer update (``--steps`` of them), ``--grad-accum`` micro-batches of ``--batch-size`` packed blocks
(the global batch; under ``torchrun`` each rank takes its slice), each trained with random deep supervision
(:mod:`loopus_train.rds`); then the gradients are clipped and AdamW steps (fp32 master weights; bf16 autocast
where asked or where the GPU supports it; no weight decay on norms, biases and the gate's ``A_log``;
:mod:`loopus_train.optim`). The learning rate: warmup then cosine to ``--min-lr``, one step per optimizer
update. Under ``torchrun`` the model is sharded with FSDP2 (:mod:`loopus_train.distributed`), which averages
the gradients over the ranks once per update. With ``--lora-rank`` only LoRA adapters, the gate and the
confidence head train (:mod:`loopus_train.lora`).

The data is tokenised once into cached token shards (:mod:`loopus_train.shards`); documents are held out
for evaluation (:mod:`loopus_train.data`). Everything a run needs to continue lives in a checkpoint
directory written atomically (:mod:`loopus_train.state`): the model (a looped checkpoint, or a LoRA
adapter), the optimizer state, the step, the data position, every RNG state, the settings and the command.
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
from loopus_core.progress import Progress
from loopus_core.runtime import autocast_dtype
from loopus_train import lora
from loopus_train.config import TrainConfig
from loopus_train.data import BlockSampler, TokenData, load_blocks
from loopus_train.distributed import (
    Distributed,
    all_reduce_mean,
    clip_gradients,
    gradient_sync,
    init_distributed,
    shard_model,
)
from loopus_train.evaluate import run_eval
from loopus_train.optim import build_optimizer, lr_at, select_trainable
from loopus_train.packing import position_ids, training_view
from loopus_train.rds import BatchStats, draw_supervised_steps, rds_micro_batch
from loopus_train.rundir import append_jsonl, prepare_out_dir, run_dir_lock, start_run_dir
from loopus_train.state import TrainState, save_checkpoint
from loopus_train.trackers import Trackers, check_backends

log = logging.getLogger(__name__)

Callback = Callable[[dict], None]
AFTER_ENCODER = ("loop", "gate", "decoder", "head")


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
    blocks: TokenData
    held_out: torch.Tensor
    state: TrainState
    amp_dtype: torch.dtype | None
    metrics: Path
    checkpoint: Path | None
    lora_config: object | None
    trackers: Trackers | None

    def log(self, record: dict) -> None:
        """One record to ``metrics.jsonl`` and the ``--log-to`` backends (rank 0)."""
        if self.dist.main:
            append_jsonl(self.metrics, record)
            if self.trackers is not None:
                self.trackers.log(record)

    def model_writer(self, step: int):
        """How checkpoint ``step`` writes the model: the looped checkpoint, or the LoRA adapter (merged too
        at the last step)."""
        if self.lora_config is None:
            return None
        merge_from = self.cfg.checkpoint if step == self.cfg.steps else None
        base = self.state.record["base_fingerprint"]
        return lora.adapter_writer(self.lora_config, merge_from, self.tokenizer, self.cfg.loop_steps, base)


def train(
    cfg: TrainConfig,
    argv: list[str] | None = None,
    callback: Callback | None = None,
    progress: Progress | None = None,
) -> TrainResult:
    """Fine-tune the looped checkpoint ``cfg.checkpoint`` into ``cfg.out`` (see the module docstring).

    ``callback`` receives one dict per event (``event``: start, step, evaluating, eval, checkpoint, end) on
    rank 0; ``progress`` shows the tokenisation of new data and each evaluation's batches. Raises
    :class:`LoopusError` for bad settings, data, checkpoints and output directories, and when the loss stops
    being finite (the last good checkpoint stays).
    """
    cfg.validate()
    check_backends(cfg.log_to)
    dist = init_distributed(cfg.device)
    with run_dir_lock(cfg.out, dist.main):  # --out checked, and locked for the whole run
        dist.barrier()  # the other ranks look at --out once rank 0 has checked and recovered it
        return _train(cfg, dist, argv, callback, progress)


def _train(
    cfg: TrainConfig,
    dist: Distributed,
    argv: list[str] | None,
    callback: Callback | None,
    progress: Progress | None,
) -> TrainResult:
    """:func:`train` once ``--out`` is locked."""
    emit = callback if (callback is not None and dist.main) else (lambda event: None)
    run = _setup(cfg, dist, argv or sys.argv, progress)
    emit(_start_event(run))
    try:
        for update in range(run.state.step, cfg.steps):
            began = time.perf_counter()
            record = _update(run, update)
            record["tokens_per_s"] = (
                cfg.batch_size * cfg.grad_accum * cfg.block_size / (time.perf_counter() - began)
            )
            run.log(record)
            emit({"event": "step", **record, "steps": cfg.steps})
            step = update + 1
            if step % cfg.eval_every == 0 or step == cfg.steps:
                emit(_eval_event(run, step))
                held = slice(0, len(run.held_out))
                held_labels = run.blocks.held_out.labels(held)  # None: plain text
                positions = position_ids(run.blocks.held_out, held)  # None: one sequence per block
                shown = progress if dist.main else None
                last = run_eval(
                    run.model, run.held_out, cfg, run.amp_dtype, held_labels, positions, progress=shown
                )
                run.state.last_eval = last
                record = {"kind": "eval", "step": step, **run.state.last_eval}
                run.log(record)
                emit({"event": "eval", **record})
            if step % cfg.save_every == 0 or step == cfg.steps:
                run.checkpoint = save_checkpoint(
                    run.out, run.model, run.tokenizer, run.state, cfg.keep, dist, run.model_writer(step)
                )
                emit({"event": "checkpoint", "step": step, "path": str(run.checkpoint)})
    finally:
        if run.trackers is not None:
            run.trackers.close()
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


def _setup(cfg: TrainConfig, dist: Distributed, argv: list[str], progress: Progress | None) -> _Run:
    """Check ``--out``, load the model and the data, shard, build the optimizer, and restore a resumed run."""
    if cfg.batch_size % dist.world:
        raise LoopusError(
            f"--batch-size {cfg.batch_size} does not split over {dist.world} processes; use a "
            "multiple of the process count"
        )
    out = Path(cfg.out).expanduser()
    resume_from = prepare_out_dir(cfg)
    random.seed(cfg.seed)  # before the LoRA matrices are drawn
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed + dist.rank)  # the ranks draw different noise for their samples
    model, tokenizer, lora_config, base_fingerprint = _load_model(cfg, dist, resume_from)
    vocab = model.get_input_embeddings().num_embeddings
    data = _load_data(cfg, dist, tokenizer, progress, vocab)
    blocks = training_view(data, cfg.doc_mask, cfg.split_records)  # records packed
    amp = autocast_dtype(cfg.precision, dist.device)
    model = shard_model(model, dist, amp)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
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
        "data_digest": blocks.digest,
        "base_fingerprint": base_fingerprint,  # a LoRA run's base checkpoint (lora.pin_base); None otherwise
    }
    sampler = BlockSampler(len(blocks.train), cfg.seed)
    state = TrainState(0, sampler, optimizer, model, blocks.fingerprint, record)
    if resume_from is not None:
        state.load(resume_from, dist)  # every RNG state too
        log.info("resuming %s from step %d (%s)", out, state.step, resume_from.name)
    metrics, trackers = out / "metrics.jsonl", None
    if dist.main:
        metrics = start_run_dir(out, cfg, argv, state.step if resume_from is not None else None)
        if cfg.log_to:
            trackers = Trackers(cfg.log_to, out, cfg.identity(), resumed=resume_from is not None)
    dist.barrier()
    held = blocks.held_out[: min(cfg.resolved_eval_blocks(), len(blocks.held_out))]
    params = [p for _, p in named]
    return _Run(
        cfg,
        dist,
        out,
        model,
        tokenizer,
        params,
        blocks,
        held,
        state,
        amp,
        metrics,
        resume_from,
        lora_config,
        trackers,
    )


def _load_model(cfg: TrainConfig, dist: Distributed, resume_from: Path | None):
    """The model (trainable parts chosen, LoRA injected, checkpointing and compile on), its tokenizer, the
    LoRA config and the fingerprint of a LoRA run's base checkpoint (both None for full fine-tuning)."""
    device = "cpu" if dist.sharded else dist.device  # sharding moves each unit's shard to the device
    lora_config = base_fingerprint = None
    if cfg.lora_rank is None:
        model, tokenizer = load_with_tokenizer(resume_from or Path(cfg.checkpoint).expanduser(), device)
        select_trainable(model, cfg.train_parts)
    else:
        model, tokenizer = load_with_tokenizer(Path(cfg.checkpoint).expanduser(), device)
        base_fingerprint = lora.pin_base(model, cfg.checkpoint, resume_from)  # a changed base is refused
        lora_config = lora.lora_config(model, cfg)
        lora.add_lora(model, lora_config)
        if resume_from is not None:
            lora.load_adapter(model, resume_from)
    model.config.num_loops = cfg.loop_steps  # the saved checkpoints run the trained loop count by default
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if cfg.compile:
        for module in [*(model.layers[i] for i in model.loop_range), model.gate]:
            module.compile()
    model.train()
    return model, tokenizer, lora_config, base_fingerprint


def _load_data(
    cfg: TrainConfig, dist: Distributed, tokenizer, progress: Progress | None, vocab_size: int
) -> TokenData:
    """Rank 0 tokenises (or finds the cached shards) first, the other ranks open them afterwards; every
    token id must have a row in the model's embedding of ``vocab_size`` rows."""
    blocks = None
    for turn in (True, False):
        if dist.main == turn:
            blocks = load_blocks(
                tokenizer,
                cfg.data,
                block_size=cfg.block_size,
                held_out=cfg.held_out,
                seed=cfg.seed,
                workers=cfg.data_workers,
                progress=progress if dist.main else None,
                loss_on=cfg.loss_on,
                vocab_size=vocab_size,
            )
        dist.barrier()
    return blocks


def _start_event(run: _Run) -> dict:
    return {
        "event": "start",
        "step": run.state.step,
        "steps": run.cfg.steps,
        "trainable": sum(p.numel() for p in run.params),
        "parts": list(run.cfg.train_parts) if run.lora_config is None else ["lora", "gate", "head"],
        "world": run.dist.world,
        "train_blocks": len(run.blocks.train),
        "held_out_blocks": len(run.blocks.held_out),
        "held_out_documents": run.blocks.held_out.num_documents,
        "precision": str(run.amp_dtype),
        "resumed_from": str(run.checkpoint) if run.checkpoint is not None else None,
    }


def _eval_event(run: _Run, step: int) -> dict:
    """What an evaluation is about to measure (the display says it before the work starts)."""
    return {
        "event": "evaluating",
        "step": step,
        "blocks": len(run.held_out),
        "block_size": run.cfg.block_size,
        "loops": run.cfg.resolved_eval_loops(),
        "thresholds": list(run.cfg.eval_thresholds),
        "max_loops": run.cfg.loop_steps,
    }


def _update(run: _Run, update: int) -> dict:
    """One optimizer update: the micro-batches' RDS, one gradient synchronisation, clipping, AdamW."""
    cfg, dist, state = run.cfg, run.dist, run.state
    lr = lr_at(update, lr=cfg.lr, min_lr=cfg.min_lr, warmup=cfg.warmup, total=cfg.steps)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    state.optimizer.zero_grad(set_to_none=True)
    # every supervised step has a graph when a part after the encoder trains: sync at the last one only
    defer = dist.sharded and (run.lora_config is not None or bool(set(cfg.train_parts) & set(AFTER_ENCODER)))
    gradient_sync(run.model, dist, not defer)
    stats = BatchStats()
    drawn: list[list[int]] = []
    per_rank = cfg.batch_size // dist.world
    for micro in range(cfg.grad_accum):
        indices = state.sampler.take(cfg.batch_size)[dist.rank * per_rank : (dist.rank + 1) * per_rank]
        input_ids = run.blocks.train[indices].to(dist.device)
        labels = run.blocks.train.labels(indices)  # None: every next token is a target
        positions = position_ids(run.blocks.train, indices)  # None: one sequence per block
        steps = draw_supervised_steps(cfg.seed, update, micro, cfg.loop_steps, cfg.supervised)
        drawn.append(steps)
        last = defer and micro == cfg.grad_accum - 1
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
                noise_std=cfg.noise_std,
                init_noise_std=cfg.init_noise_std,
                before_last_backward=(lambda: gradient_sync(run.model, dist, True)) if last else None,
                mean_over_ranks=(lambda t: all_reduce_mean(t, dist).to(t.device)) if dist.sharded else None,
                labels=None if labels is None else labels.to(dist.device),
                position_ids=None if positions is None else positions.to(dist.device),
            )
        )
    totals = all_reduce_mean(stats.as_tensor(), dist)
    loss, ce, mono, bce = (float(totals[i] / totals[4]) for i in range(4))
    if not math.isfinite(loss):
        last = f"; the last good checkpoint is {run.checkpoint}" if run.checkpoint is not None else ""
        raise LoopusError(
            f"the training loss became {loss} at step {update + 1} (lr {lr:.3g}){last}; "
            "lower --lr or use --precision fp32"
        )
    grad_norm = clip_gradients(run.params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
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

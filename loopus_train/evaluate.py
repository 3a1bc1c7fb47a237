"""Evaluation of looped checkpoints on held-out text: during training, and for ``loopus eval`` without tasks.

The measurements themselves (loss per loop count, confidence calibration, early exit) are
:mod:`loopus_convert.evaluate`'s; this module knows where the text comes from: the held-out split of the
training run that wrote a checkpoint (its held-out documents, at any block size), ``--data``, or the built-in
corpus.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from loopus_convert.checkpoint import load_with_tokenizer
from loopus_convert.evaluate import (
    check_eval_settings,
    check_kv_strategies,
    early_exit_stats,
    gate_report,
    kv_strategy_stats,
    loss_per_loops,
)
from loopus_core.checks import check_int
from loopus_core.errors import LoopusError
from loopus_core.models import context_length
from loopus_core.progress import Progress
from loopus_core.runtime import autocast_dtype, resolve_device
from loopus_train.config import TrainConfig
from loopus_train.data import SequenceBlocks, all_blocks, load_blocks
from loopus_train.packing import PackedRecords, position_ids
from loopus_train.rundir import resolve_checkpoint
from loopus_train.state import STATE_JSON

log = logging.getLogger(__name__)


def run_eval(
    model: nn.Module,
    held_out: torch.Tensor,
    cfg: TrainConfig,
    amp_dtype: torch.dtype | None,
    labels: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    progress: Progress | None = None,
) -> dict:
    """Held-out loss and perplexity per loop count, confidence calibration and early-exit statistics (on the
    supervised positions of ``labels`` only, when given; ``position_ids``: each block's records, as in
    :func:`loopus_convert.evaluate.loss_per_loops`, the confidence read at each record's last token), and
    the gate's effective Abar per pass over the
    trained passes (``--loop-steps``); ``progress`` shows the batches of each measurement."""
    was_training = model.training
    model.eval()
    try:
        loops = cfg.resolved_eval_loops()
        per_loops = loss_per_loops(
            model,
            held_out,
            loops,
            batch_size=cfg.eval_batch_size,
            autocast_dtype=amp_dtype,
            labels=labels,
            position_ids=position_ids,
            progress=progress,
        )
        exits = early_exit_stats(
            model,
            held_out,
            cfg.eval_thresholds,
            max_loops=cfg.loop_steps,
            batch_size=cfg.eval_batch_size,
            autocast_dtype=amp_dtype,
            labels=labels,
            position_ids=position_ids,
            progress=progress,
        )
        gate = gate_report(
            model, held_out, cfg.loop_steps, batch_size=cfg.eval_batch_size, autocast_dtype=amp_dtype
        )
    finally:
        model.train(was_training)
    return {**per_loops, "early_exit": exits, "gate": gate}


def eval_blocks(
    checkpoint: Path,
    tokenizer,
    data: str | None,
    *,
    block_size: int | None,
    max_blocks: int,
    progress: Progress | None = None,
    model=None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, str, int]:
    """The blocks to evaluate on, their labels (None: every next token), their position ids (labelled
    records, one per block: the record's, then the padding's, which restart; None for text), where they
    came from, and how many documents they draw from.

    With ``data``: every document of that text. Without: the held-out documents of the training run that
    wrote ``checkpoint`` (same data and seed; the split is by document, so any ``block_size`` evaluates on
    no token of a training document), or else the built-in corpus. ``model``: the model to evaluate, whose
    embedding must hold every token id of the data (a one-line error otherwise).
    """
    vocab_size = None if model is None else model.get_input_embeddings().num_embeddings
    state_file = checkpoint / STATE_JSON
    if data is None and state_file.is_file():
        saved = json.loads(state_file.read_text())
        run = saved["config"]
        split = load_blocks(
            tokenizer,
            run["data"],
            block_size=block_size or run["block_size"],
            held_out=run["held_out"],
            seed=run["seed"],
            progress=progress,
            loss_on=run.get("loss_on"),
            vocab_size=vocab_size,
        )
        if saved.get("data_digest", split.digest) != split.digest:
            raise LoopusError(
                f"the data of the run that wrote {checkpoint} ({run['data'] or 'the built-in corpus'}) "
                "changed since training, so its held-out documents are unknown; pass --data to evaluate "
                "other text"
            )
        blocks = split.held_out
        source = f"the training run's held-out documents ({run['data'] or 'built-in'})"
    else:
        blocks = all_blocks(
            tokenizer, data, block_size=block_size or 256, progress=progress, vocab_size=vocab_size
        )
        source = data or "the built-in corpus"
    if len(blocks) < 1:
        raise LoopusError(
            f"--data {source} gives no block of {blocks.block_size} tokens; add text or lower --block-size"
        )
    if isinstance(blocks, SequenceBlocks):  # the confidence is read at each record's own last token
        blocks = PackedRecords(blocks, pack=False)
    chosen = slice(0, min(max_blocks, len(blocks)))
    documents = len(set().union(*(blocks.documents(i).tolist() for i in range(chosen.stop))))
    return blocks[chosen], blocks.labels(chosen), position_ids(blocks, chosen), str(source), documents


def evaluate_checkpoint(
    checkpoint: str | Path,
    *,
    data: str | None = None,
    loops: Sequence[int] = (1, 2, 4, 8),
    thresholds: Sequence[float] = (0.6, 0.8, 0.9),
    max_loops: int | None = None,
    kv_strategies: Sequence[str] = (),
    block_size: int | None = None,
    max_blocks: int = 64,
    batch_size: int = 8,
    device: str = "auto",
    precision: str = "auto",
    progress: Progress | None = None,
) -> dict:
    """Load a looped checkpoint (or a run directory's newest one) and evaluate it on held-out text.

    Returns ``{"checkpoint", "data", "blocks", "documents", "block_size", "loops": {...},
    "calibration": {...}, "early_exit": {...}, "kv_strategies": {...} or None}``; ``max_loops`` (default:
    the largest of ``loops``) bounds the early-exit loop; ``kv_strategies`` (with ``full`` beside them) are
    decoded token by token at each of ``loops`` (:func:`loopus_convert.evaluate.kv_strategy_stats`).
    """
    check_int(max_blocks, "--max-blocks", 1)
    check_int(batch_size, "--batch-size", 1)
    max_loops = check_eval_settings(loops, thresholds, max_loops)
    if block_size is not None:
        check_int(block_size, "--block-size", 2)
    path = resolve_checkpoint(checkpoint)
    dev = resolve_device(device)
    model, tokenizer = load_with_tokenizer(path, dev)
    model.eval()
    check_kv_strategies(model, kv_strategies)
    context = dict(high=context_length(model.config), why="the model's context")
    if block_size is not None:
        check_int(block_size, "--block-size", 2, **context)
    blocks, labels, positions, source, documents = eval_blocks(
        path, tokenizer, data, block_size=block_size, max_blocks=max_blocks, progress=progress, model=model
    )
    check_int(int(blocks.shape[1]), "--block-size", 2, **context)
    amp = autocast_dtype(precision, dev)
    common = dict(batch_size=batch_size, autocast_dtype=amp, progress=progress, labels=labels)
    per_loops = loss_per_loops(model, blocks, loops, position_ids=positions, **common)
    exits = (
        early_exit_stats(model, blocks, thresholds, max_loops=max_loops, position_ids=positions, **common)
        if thresholds
        else None
    )
    kv = (
        kv_strategy_stats(
            model, blocks, kv_strategies, loops, batch_size=batch_size, autocast_dtype=amp, progress=progress
        )
        if kv_strategies
        else None
    )
    log.info("evaluated %s on %d blocks of %d tokens from %s", path, len(blocks), blocks.shape[1], source)
    return {
        "checkpoint": str(path),
        "data": source,
        "blocks": int(len(blocks)),
        "documents": documents,
        "block_size": int(blocks.shape[1]),
        **per_loops,
        "early_exit": exits,
        "kv_strategies": kv,
    }

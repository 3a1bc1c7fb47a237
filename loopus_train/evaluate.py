"""Evaluation of looped checkpoints on held-out text: during training, and for ``loopus eval`` without tasks.

The measurements themselves (loss per loop count, confidence calibration, early exit) are
:mod:`loopus_convert.measure`'s; this module knows where the text comes from: the held-out split of the
training run that wrote a checkpoint (its held-out documents, at any block size), ``--data``, or the built-in
corpus. Both read their settings as an :class:`~loopus_convert.eval_types.EvalConfig`; ``loopus eval`` gets a
:class:`~loopus_convert.eval_types.PerplexityResult` back.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from loopus_convert.checkpoint import load_with_tokenizer
from loopus_convert.eval_types import DEFAULT_BLOCK_SIZE, EvalConfig, PerplexityResult
from loopus_convert.measure import (
    check_eval_settings,
    check_kv_strategies,
    early_exit_stats,
    gate_report,
    kv_strategy_stats,
    loss_per_loops,
)
from loopus_core.checks import check_int
from loopus_core.errors import LoopusError
from loopus_core.jsonio import read_json
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
    :func:`loopus_convert.measure.loss_per_loops`, the confidence read at each record's last token), and
    the gate's effective Abar per pass over the
    trained passes (``--loop-steps``); ``progress`` shows the batches of each measurement."""
    config = training_eval_config(cfg)
    was_training = model.training
    model.eval()
    try:
        common = dict(
            batch_size=config.batch_size, autocast_dtype=amp_dtype, labels=labels, progress=progress
        )
        per_loops = loss_per_loops(model, held_out, config.loops, position_ids=position_ids, **common)
        exits = early_exit_stats(
            model,
            held_out,
            config.text_thresholds(),
            max_loops=config.max_loops,
            position_ids=position_ids,
            **common,
        )
        gate = gate_report(
            model, held_out, config.max_loops, batch_size=config.batch_size, autocast_dtype=amp_dtype
        )
    finally:
        model.train(was_training)
    return {**per_loops, "early_exit": exits, "gate": gate}


def training_eval_config(cfg: TrainConfig) -> EvalConfig:
    """What a training run evaluates: ``--eval-loops`` (default: within the trained depth), early exit at
    ``--eval-thresholds`` within ``--loop-steps`` passes, ``--eval-batch-size`` blocks per forward pass."""
    return EvalConfig(
        loops=tuple(cfg.resolved_eval_loops()),
        thresholds=tuple(cfg.eval_thresholds),
        max_loops=cfg.loop_steps,
        batch_size=cfg.eval_batch_size,
    )


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
        saved = read_json(state_file)
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
            tokenizer, data, block_size=block_size or DEFAULT_BLOCK_SIZE, progress=progress,
            vocab_size=vocab_size,
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
    checkpoint: str | Path, config: EvalConfig = EvalConfig(), *, progress: Progress | None = None
) -> PerplexityResult:
    """Load a looped checkpoint (or a run directory's newest one) and evaluate it on held-out text, as
    ``config`` says: loss per loop count and calibration, early exit at its thresholds (default
    :data:`~loopus_convert.eval_types.EXIT_THRESHOLDS`) within ``max_loops`` (default: the largest loop
    count), and its KV strategies (with ``full`` beside them), decoded token by token at each loop count
    (:func:`loopus_convert.measure.kv_strategy_stats`). Every setting is checked before the model loads.
    """
    thresholds = config.text_thresholds()
    check_int(config.max_blocks, "--max-blocks", 1)
    check_int(config.batch_size, "--batch-size", 1)
    max_loops = check_eval_settings(config.loops, thresholds, config.max_loops)
    if config.block_size is not None:
        check_int(config.block_size, "--block-size", 2)
    path = resolve_checkpoint(checkpoint)
    dev = resolve_device(config.device)
    model, tokenizer = load_with_tokenizer(path, dev)
    model.eval()
    check_kv_strategies(model, config.kv_strategies)
    context = dict(high=context_length(model.config), why="the model's context")
    if config.block_size is not None:
        check_int(config.block_size, "--block-size", 2, **context)
    blocks, labels, positions, source, documents = eval_blocks(
        path, tokenizer, config.data, block_size=config.block_size, max_blocks=config.max_blocks,
        progress=progress, model=model,
    )  # fmt: skip
    check_int(int(blocks.shape[1]), "--block-size", 2, **context)
    amp = autocast_dtype(config.precision, dev)
    common = dict(batch_size=config.batch_size, autocast_dtype=amp, progress=progress, labels=labels)
    per_loops = loss_per_loops(model, blocks, config.loops, position_ids=positions, **common)
    exits = (
        early_exit_stats(model, blocks, thresholds, max_loops=max_loops, position_ids=positions, **common)
        if thresholds
        else None
    )
    kv = (
        kv_strategy_stats(
            model, blocks, config.kv_strategies, config.loops, batch_size=config.batch_size,
            autocast_dtype=amp, progress=progress,
        )  # fmt: skip
        if config.kv_strategies
        else None
    )
    log.info("evaluated %s on %d blocks of %d tokens from %s", path, len(blocks), blocks.shape[1], source)
    where = dict(
        checkpoint=str(path), data=source, blocks=int(len(blocks)), documents=documents,
        block_size=int(blocks.shape[1]),
    )  # fmt: skip
    return PerplexityResult.of(where, per_loops, exits, kv)

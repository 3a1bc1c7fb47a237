"""``loopus finetune CKPT``: random-deep-supervision fine-tuning of a looped checkpoint."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from loopus.app import PACKAGES, app, err_console, guarded, number_list, say
from loopus.commands.prepare_data import TokenProgress
from loopus_train.config import DEFAULTS, LOG_BACKENDS, LOSS_ON, PARTS, TrainConfig, parse_parts


def _say(text: str) -> None:
    say(text)  # as text: a path or a file name may look like rich markup ("x[/]")


class _Display:
    """Rank 0's terminal view: one progress bar with loss, learning rate and tokens/s; what each evaluation
    measures, a bar per measurement (batches n of m) and its summary. As a
    :class:`loopus_core.progress.Progress` it adds those bars to the live view (before training starts, the
    tokenisation's own display shows them)."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=err_console,
            disable=not sys.stderr.isatty() and os.environ.get("LOOPUS_PROGRESS") != "1",
        )
        self.bar = None  # the training bar, once training starts
        self.tokens = TokenProgress()

    @contextlib.contextmanager
    def task(self, description: str, total: float | None) -> Iterator[Callable[[float], None]]:
        if self.bar is None:
            with self.tokens.task(description, total) as advance:
                yield advance
            return
        task_id = self.progress.add_task(f"  {description}", total=total, info="")
        try:
            yield lambda n=1: self.progress.advance(task_id, n)
        finally:
            self.progress.remove_task(task_id)

    def __call__(self, event: dict) -> None:
        kind = event["event"]
        if kind == "start":
            self.progress.start()
            self.bar = self.progress.add_task(
                "finetune", total=event["steps"], completed=event["step"], info=""
            )
            if event["step"]:
                _say(f"resuming at step {event['step']} from {event['resumed_from']}")
            _say(
                f"training {event['trainable']:,} parameters ({','.join(event['parts'])}) for "
                f"{event['steps']} updates on {event['world']} process(es): "
                f"{event['train_blocks']} train / {event['held_out_blocks']} held-out blocks "
                f"({event['held_out_documents']} held-out documents)"
            )
        elif kind == "step":
            info = f"loss {event['loss']:.4f}  lr {event['lr']:.2e}  {event['tokens_per_s']:,.0f} tok/s"
            self.progress.update(self.bar, completed=event["step"], info=info)
        elif kind == "evaluating":
            _say(
                f"step {event['step']}: evaluating {event['blocks']} held-out blocks of "
                f"{event['block_size']} tokens: loss at K = {', '.join(map(str, event['loops']))}; "
                f"early exit at {', '.join(f'{t:g}' for t in event['thresholds'])} "
                f"(at most {event['max_loops']} loops); "
                f"the gate over {event['max_loops']} passes"
            )
        elif kind == "eval":
            loops = "  ".join(f"K={k}: {v['ppl']:.2f}" for k, v in event["loops"].items())
            cal = event["calibration"]
            exits = event["early_exit"]["thresholds"]
            exit_text = "  ".join(
                f"tau {k}: {v['mean_loops']:.1f} loops, ppl {v['ppl']:.2f}"
                for k, v in exits.items()
                if k != "full"
            )
            _say(f"step {event['step']} held-out ppl  {loops}")
            _say(f"  confidence ECE {cal['ece']:.3f}  Brier {cal['brier']:.3f}")
            _say(f"  early exit (at most {event['early_exit']['max_loops']} loops)  {exit_text}")
            gate = "  ".join(f"{p['mean']:.2f}±{p['std']:.2f}" for p in event["gate"]["passes"])
            _say(f"  gate Abar per pass (mean±sd)  {gate}")
        elif kind == "checkpoint":
            _say(f"step {event['step']}: saved {event['path']}")
        elif kind == "end":
            self.progress.stop()

    def close(self) -> None:
        self.progress.stop()


D = DEFAULTS  # every option's default is the one in TrainConfig (shown by --help, never copied)


# Options whose help does not fit on one line of the signature (their defaults come from TrainConfig too).
_Data = Annotated[
    str | None,
    typer.Option(
        "--data",
        show_default=False,
        help=".txt / .jsonl / .parquet file, folder of them, a datasets name, or a `loopus prepare-data` "
        "shard directory (default: the built-in corpus); records of text, messages (chat), prompt/completion "
        "or input_ids/labels.",
    ),
]
_LossOn = Annotated[
    str | None,
    typer.Option(
        "--loss-on",
        show_default=False,
        help=f"Targets, from {'|'.join(LOSS_ON)} (default: what the data implies: all for text, completion "
        "for prompt/completion, assistant for chat, the given labels for input_ids/labels).",
    ),
]
_Passes = Annotated[
    int, typer.Option("--passes-per-step", help="Loop passes per supervised step, 2 = the official code.")
]
_Parts = Annotated[str, typer.Option("--train", help=f"Parts to train, from {','.join(PARTS)}.")]
_LoraRank = Annotated[
    int | None,
    typer.Option("--lora-rank", show_default=False, help="Train LoRA adapters of this rank (off)."),
]
_LoraAlpha = Annotated[
    float | None, typer.Option("--lora-alpha", show_default=False, help="LoRA alpha (default: 2 x rank).")
]
_LoraTargets = Annotated[
    str | None,
    typer.Option(
        "--lora-targets",
        show_default=False,
        help="Projections that get adapters, e.g. q_proj,v_proj (default: every linear one).",
    ),
]
_Noise = Annotated[
    float,
    typer.Option("--noise-std", help="Latent noise after each loop pass, a fraction of the state's RMS."),
]
_InitNoise = Annotated[
    float, typer.Option("--init-noise-std", help="Noise on the loop's initial state, a fraction of its RMS.")
]
_Precision = Annotated[str, typer.Option("--precision", help="auto (bf16 autocast on GPUs) | fp32 | bf16.")]
_Checkpointing = Annotated[
    bool, typer.Option("--gradient-checkpointing", help="Recompute activations in backward (less memory).")
]
_EvalLoops = Annotated[
    str | None,
    typer.Option(
        "--eval-loops",
        show_default=False,
        help="Loop counts to evaluate, e.g. 1,2,4,8 (default: 1, 2, 4, ... below --loop-steps, and "
        "--loop-steps: the trained depth).",
    ),
]
_EvalBlocks = Annotated[
    int | None,
    typer.Option(
        "--eval-blocks",
        show_default=False,
        help="Held-out blocks per evaluation (default: one per 8 blocks trained, at least 4, at most 32).",
    ),
]
_Resume = Annotated[
    bool, typer.Option("--resume", help="Continue the run in --out from its newest checkpoint.")
]
_LogTo = Annotated[
    str, typer.Option("--log-to", help=f"Also log metrics to these backends, from {','.join(LOG_BACKENDS)}.")
]
_Workers = Annotated[
    int, typer.Option("--data-workers", help="Tokenising processes for new data (0: one per CPU).")
]


@app.command("finetune")
def finetune(
    checkpoint: Path = typer.Argument(..., help="A looped checkpoint written by `loopus convert`."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory: checkpoints, metrics.jsonl, run.json."),
    data: _Data = None,
    loss_on: _LossOn = D.loss_on,
    doc_mask: bool = typer.Option(
        D.doc_mask, "--doc-mask", help="Plain text: each document attends only to itself (records: always)."
    ),
    split_records: bool = typer.Option(
        D.split_records,
        "--split-records",
        help="Labelled records fill every block: a record cut at a block's end goes on in the next one, "
        "without its head in view (default: whole records, packed by least slack).",
    ),
    block_size: int = typer.Option(D.block_size, "--block-size", help="Tokens per packed block."),
    batch_size: int = typer.Option(D.batch_size, "--batch-size", help="Global blocks per micro-batch."),
    grad_accum: int = typer.Option(D.grad_accum, "--grad-accum", help="Micro-batches per optimizer update."),
    steps: int = typer.Option(D.steps, "--steps", help="Optimizer updates."),
    lr: float = typer.Option(D.lr, "--lr", help="Peak learning rate."),
    min_lr: float = typer.Option(D.min_lr, "--min-lr", help="Learning rate at the end of the cosine."),
    warmup: int = typer.Option(D.warmup, "--warmup", help="Warmup updates."),
    weight_decay: float = typer.Option(
        D.weight_decay, "--weight-decay", help="AdamW weight decay of matrices."
    ),
    grad_clip: float = typer.Option(D.grad_clip, "--grad-clip", help="Gradient-norm clip, 0 = off."),
    loop_steps: int = typer.Option(D.loop_steps, "--loop-steps", help="Loop steps per batch."),
    supervised: int = typer.Option(D.supervised, "--supervised", help="Randomly supervised steps per batch."),
    passes_per_step: _Passes = D.passes_per_step,
    beta: float = typer.Option(D.beta, "--beta", help="Weight of SiLU(CE - CE_prev)."),
    conf_weight: float = typer.Option(D.conf_weight, "--conf-weight", help="Weight of the confidence BCE."),
    train_parts: _Parts = ",".join(D.train_parts),
    lora_rank: _LoraRank = D.lora_rank,
    lora_alpha: _LoraAlpha = D.lora_alpha,
    lora_targets: _LoraTargets = None,
    noise_std: _Noise = D.noise_std,
    init_noise_std: _InitNoise = D.init_noise_std,
    precision: _Precision = D.precision,
    gradient_checkpointing: _Checkpointing = D.gradient_checkpointing,
    compile: bool = typer.Option(D.compile, "--compile", help="torch.compile the loop block and the gate."),
    seed: int = typer.Option(D.seed, "--seed", help="Data order, held-out split and supervised steps."),
    held_out: float = typer.Option(D.held_out, "--held-out", help="Fraction of documents held out."),
    eval_every: int = typer.Option(D.eval_every, "--eval-every", help="Evaluate every N updates."),
    eval_blocks: _EvalBlocks = D.eval_blocks,
    eval_loops: _EvalLoops = None,
    eval_thresholds: str = typer.Option(
        ",".join(f"{t:g}" for t in D.eval_thresholds),
        "--eval-thresholds",
        help="Early-exit thresholds evaluated.",
    ),
    save_every: int = typer.Option(D.save_every, "--save-every", help="Checkpoint every N updates."),
    keep: int = typer.Option(D.keep, "--keep", help="Checkpoints kept."),
    device: str = typer.Option(D.device, "--device", help="auto | cpu | cuda | cuda:N."),
    resume: _Resume = D.resume,
    log_to: _LogTo = ",".join(D.log_to),
    data_workers: _Workers = D.data_workers,
) -> None:
    """Fine-tune a looped checkpoint with random deep supervision (also under `torchrun`)."""
    with guarded():
        given = {k: v for k, v in locals().items() if k in _FIELDS}
        cfg = TrainConfig(
            **given,
            checkpoint=str(checkpoint),
            out=str(out),
            train_parts=parse_parts(train_parts),
            eval_loops=number_list(eval_loops, "--eval-loops", int),
            eval_thresholds=number_list(eval_thresholds, "--eval-thresholds", float),
            lora_targets=_names(lora_targets),
            log_to=_names(log_to) or (),
        )
        _run(cfg)


def _run(cfg: TrainConfig) -> None:
    """Train, showing progress on rank 0 only (under torchrun the other ranks stay quiet)."""
    from loopus_train.train import train

    main_rank = os.environ.get("RANK", "0") == "0"
    if not main_rank:
        for name in PACKAGES:
            logging.getLogger(name).setLevel(logging.WARNING)
    display = _Display() if main_rank else None
    try:
        shown = display if display is not None else TokenProgress()  # evaluations show on the live view
        result = train(cfg, argv=["loopus", *sys.argv[1:]], callback=display, progress=shown)
    finally:
        if display is not None:
            display.close()
    if main_rank:
        say(f"trained checkpoint: {result.checkpoint}")
        say(f"metrics: {result.out / 'metrics.jsonl'}")


def _names(text: str | None) -> tuple[str, ...] | None:
    """``"a,b"`` -> ("a", "b"); None or only commas -> None."""
    names = tuple(x.strip() for x in (text or "").split(",") if x.strip())
    return names or None


_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)} - {
    "checkpoint",
    "out",
    "train_parts",
    "eval_loops",
    "eval_thresholds",
    "lora_targets",
    "log_to",
}

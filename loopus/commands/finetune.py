"""``loopus finetune CKPT``: random-deep-supervision fine-tuning of a looped checkpoint."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from loopus.app import PACKAGES, app, console, err_console, guarded, number_list
from loopus.commands.prepare_data import TokenProgress
from loopus_train.config import DEFAULTS, LOG_BACKENDS, PARTS, TrainConfig, parse_parts


def _say(text: str) -> None:
    console.print(text, soft_wrap=True, highlight=False)


class _Display:
    """Rank 0's terminal view: one progress bar with loss, learning rate and tokens/s; eval summaries."""

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
        self.task = None

    def __call__(self, event: dict) -> None:
        kind = event["event"]
        if kind == "start":
            self.progress.start()
            self.task = self.progress.add_task(
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
            self.progress.update(self.task, completed=event["step"], info=info)
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
        elif kind == "checkpoint":
            _say(f"step {event['step']}: saved {event['path']}")
        elif kind == "end":
            self.progress.stop()

    def close(self) -> None:
        self.progress.stop()


D = DEFAULTS  # every option's default is the one in TrainConfig (shown by --help, never copied)


@app.command("finetune")
def finetune(
    checkpoint: Path = typer.Argument(..., help="A looped checkpoint written by `loopus convert`."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory: checkpoints, metrics.jsonl, run.json."),
    data: str = typer.Option(
        None,
        "--data",
        show_default=False,
        help=".txt / .jsonl / .parquet file, folder of them, a datasets name, or a `loopus prepare-data` "
        "shard directory (default: the built-in corpus).",
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
    passes_per_step: int = typer.Option(
        D.passes_per_step, "--passes-per-step", help="Loop passes per supervised step, 2 = the official code."
    ),
    beta: float = typer.Option(D.beta, "--beta", help="Weight of SiLU(CE - CE_prev)."),
    conf_weight: float = typer.Option(D.conf_weight, "--conf-weight", help="Weight of the confidence BCE."),
    train_parts: str = typer.Option(
        ",".join(D.train_parts), "--train", help=f"Parts to train, from {','.join(PARTS)}."
    ),
    lora_rank: int = typer.Option(
        D.lora_rank,
        "--lora-rank",
        show_default=False,
        help="Train LoRA adapters of this rank (default: off).",
    ),
    lora_alpha: float = typer.Option(
        D.lora_alpha, "--lora-alpha", show_default=False, help="LoRA alpha (default: 2 x --lora-rank)."
    ),
    lora_targets: str = typer.Option(
        None,
        "--lora-targets",
        show_default=False,
        help="Projections that get adapters, e.g. q_proj,v_proj (default: every linear one).",
    ),
    noise_std: float = typer.Option(
        D.noise_std, "--noise-std", help="Latent noise after each loop pass, a fraction of the state's RMS."
    ),
    init_noise_std: float = typer.Option(
        D.init_noise_std, "--init-noise-std", help="Noise on the loop's initial state, a fraction of its RMS."
    ),
    precision: str = typer.Option(
        D.precision, "--precision", help="auto (bf16 autocast on GPUs) | fp32 | bf16."
    ),
    gradient_checkpointing: bool = typer.Option(
        D.gradient_checkpointing,
        "--gradient-checkpointing",
        help="Recompute activations in backward (less memory).",
    ),
    compile: bool = typer.Option(D.compile, "--compile", help="torch.compile the loop block and the gate."),
    seed: int = typer.Option(D.seed, "--seed", help="Data order, held-out split and supervised steps."),
    held_out: float = typer.Option(D.held_out, "--held-out", help="Fraction of documents held out."),
    eval_every: int = typer.Option(D.eval_every, "--eval-every", help="Evaluate every N updates."),
    eval_blocks: int = typer.Option(D.eval_blocks, "--eval-blocks", help="Held-out blocks per evaluation."),
    eval_loops: str = typer.Option(
        None,
        "--eval-loops",
        show_default=False,
        help="Loop counts to evaluate, e.g. 1,2,4,8 (default: 1, 2, 4, ... up to 2x "
        "--loop-steps, and --loop-steps).",
    ),
    eval_thresholds: str = typer.Option(
        ",".join(f"{t:g}" for t in D.eval_thresholds),
        "--eval-thresholds",
        help="Early-exit thresholds evaluated.",
    ),
    save_every: int = typer.Option(D.save_every, "--save-every", help="Checkpoint every N updates."),
    keep: int = typer.Option(D.keep, "--keep", help="Checkpoints kept."),
    device: str = typer.Option(D.device, "--device", help="auto | cpu | cuda | cuda:N."),
    resume: bool = typer.Option(
        D.resume, "--resume", help="Continue the run in --out from its newest checkpoint."
    ),
    log_to: str = typer.Option(
        ",".join(D.log_to),
        "--log-to",
        help=f"Also log metrics to these backends, from {','.join(LOG_BACKENDS)} (default: none).",
    ),
    data_workers: int = typer.Option(
        D.data_workers, "--data-workers", help="Tokenising processes for new data (0: one per CPU)."
    ),
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
        result = train(cfg, argv=["loopus", *sys.argv[1:]], callback=display, progress=TokenProgress())
    finally:
        if display is not None:
            display.close()
    if main_rank:
        console.print(f"trained checkpoint: {result.checkpoint}")
        console.print(f"metrics: {result.out / 'metrics.jsonl'}")


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

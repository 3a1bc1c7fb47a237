"""``loopus finetune CKPT``: random-deep-supervision fine-tuning of a looped checkpoint."""

from __future__ import annotations

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

from loopus.app import app, console, err_console, guarded


def _float_list(text: str | None, flag: str) -> tuple[float, ...] | None:
    from loopus_analyze.errors import LoopusError

    if text is None:
        return None
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise LoopusError(f"{flag} {text!r} must be comma-separated numbers (e.g. 0.6,0.8,0.9)") from None


def _int_list(text: str | None, flag: str) -> tuple[int, ...] | None:
    from loopus_analyze.errors import LoopusError

    if text is None:
        return None
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise LoopusError(f"{flag} {text!r} must be comma-separated integers (e.g. 1,2,4,8)") from None


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
                f"{event['train_blocks']} train / {event['held_out_blocks']} held-out blocks"
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


@app.command("finetune")
def finetune(
    checkpoint: Path = typer.Argument(..., help="A looped checkpoint written by `loopus convert`."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory: checkpoints, metrics.jsonl, run.json."),
    data: str = typer.Option(
        None,
        "--data",
        help=".txt / .jsonl file, folder of them, or a datasets name (default: the built-in corpus).",
    ),
    block_size: int = typer.Option(None, "--block-size", help="Tokens per packed block [256]."),
    batch_size: int = typer.Option(None, "--batch-size", help="Global blocks per micro-batch [8]."),
    grad_accum: int = typer.Option(None, "--grad-accum", help="Micro-batches per optimizer update [1]."),
    steps: int = typer.Option(None, "--steps", help="Optimizer updates [100]."),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate [1e-4]."),
    min_lr: float = typer.Option(None, "--min-lr", help="Learning rate at the end of the cosine [1e-5]."),
    warmup: int = typer.Option(None, "--warmup", help="Warmup updates [10]."),
    weight_decay: float = typer.Option(None, "--weight-decay", help="AdamW weight decay of matrices [0.1]."),
    grad_clip: float = typer.Option(None, "--grad-clip", help="Gradient-norm clip, 0 = off [1.0]."),
    loop_steps: int = typer.Option(None, "--loop-steps", help="Loop steps per batch [20]."),
    supervised: int = typer.Option(None, "--supervised", help="Randomly supervised steps per batch [5]."),
    passes_per_step: int = typer.Option(
        None, "--passes-per-step", help="Loop passes per supervised step, 2 = the official code [1]."
    ),
    beta: float = typer.Option(None, "--beta", help="Weight of SiLU(CE - CE_prev) [1.0]."),
    conf_weight: float = typer.Option(None, "--conf-weight", help="Weight of the confidence BCE [1.0]."),
    train_parts: str = typer.Option(
        "loop,gate,decoder,head", "--train", help="Parts to train, from encoder,loop,gate,decoder,head."
    ),
    precision: str = typer.Option(None, "--precision", help="auto (bf16 autocast on GPUs) | fp32 | bf16."),
    gradient_checkpointing: bool = typer.Option(
        False, "--gradient-checkpointing", help="Recompute activations in backward (less memory)."
    ),
    seed: int = typer.Option(None, "--seed", help="Data order, held-out split and supervised steps [0]."),
    held_out: float = typer.Option(None, "--held-out", help="Fraction of blocks held out [0.05]."),
    eval_every: int = typer.Option(None, "--eval-every", help="Evaluate every N updates [50]."),
    eval_blocks: int = typer.Option(None, "--eval-blocks", help="Held-out blocks per evaluation [32]."),
    eval_loops: str = typer.Option(
        None, "--eval-loops", help="Loop counts to evaluate, e.g. 1,2,4,8 [1, 2, 4, ... 2x --loop-steps]."
    ),
    eval_thresholds: str = typer.Option(
        None, "--eval-thresholds", help="Early-exit thresholds [0.6,0.8,0.9]."
    ),
    save_every: int = typer.Option(None, "--save-every", help="Checkpoint every N updates [100]."),
    keep: int = typer.Option(None, "--keep", help="Checkpoints kept [2]."),
    device: str = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N [auto]."),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the run in --out from its newest checkpoint."
    ),
) -> None:
    """Fine-tune a looped checkpoint with random deep supervision (also under `torchrun`)."""
    with guarded():
        from loopus_convert.train import TrainConfig, parse_parts, train

        given = dict(
            block_size=block_size,
            batch_size=batch_size,
            grad_accum=grad_accum,
            steps=steps,
            lr=lr,
            min_lr=min_lr,
            warmup=warmup,
            weight_decay=weight_decay,
            grad_clip=grad_clip,
            loop_steps=loop_steps,
            supervised=supervised,
            passes_per_step=passes_per_step,
            beta=beta,
            conf_weight=conf_weight,
            precision=precision,
            seed=seed,
            held_out=held_out,
            eval_every=eval_every,
            eval_blocks=eval_blocks,
            save_every=save_every,
            keep=keep,
            device=device,
            eval_loops=_int_list(eval_loops, "--eval-loops"),
            eval_thresholds=_float_list(eval_thresholds, "--eval-thresholds"),
        )
        cfg = TrainConfig(
            checkpoint=str(checkpoint),
            out=str(out),
            data=data,
            train_parts=parse_parts(train_parts),
            gradient_checkpointing=gradient_checkpointing,
            resume=resume,
            **{k: v for k, v in given.items() if v is not None},
        )
        main_rank = os.environ.get("RANK", "0") == "0"
        if not main_rank:  # under torchrun only rank 0 talks
            for name in ("loopus", "loopus_analyze", "loopus_convert"):
                logging.getLogger(name).setLevel(logging.WARNING)
        display = _Display() if main_rank else None
        try:
            result = train(cfg, argv=["loopus", *sys.argv[1:]], callback=display)
        finally:
            if display is not None:
                display.close()
        if main_rank:
            console.print(f"trained checkpoint: {result.checkpoint}")
            console.print(f"metrics: {result.out / 'metrics.jsonl'}")

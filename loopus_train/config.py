"""Every setting of a fine-tuning run, in one typed object with one copy of each default.

``loopus finetune`` reads its option defaults from :data:`DEFAULTS`, so ``--help`` shows them without a copy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from loopus_convert.eval_types import EXIT_THRESHOLDS, EvalConfig
from loopus_core.checks import MAX_LOOPS, MAX_SEED, check_float, check_int
from loopus_core.errors import LoopusError
from loopus_core.runtime import PRECISIONS

PARTS = ("encoder", "loop", "gate", "decoder", "head")
LOG_BACKENDS = ("tensorboard", "wandb")  # --log-to: where metrics go besides metrics.jsonl
LOSS_ON = ("all", "completion", "assistant")  # --loss-on; None: what the data implies
MAX_LR = 1.0  # --lr: AdamW steps of a whole unit per update already wreck a pretrained model
DEFAULT_TRAIN_PARTS = ("loop", "gate", "decoder", "head")  # the encoder's layers stay frozen (a tied
# embedding is also the decoder's output head and trains with it: optim.select_trainable says so)

# Settings that may change when a run is resumed (they do not change what is trained).
_RESUMABLE_CHANGES = frozenset(
    {
        "out",
        "resume",
        "device",
        "save_every",
        "eval_every",
        "keep",
        "eval_blocks",
        "eval_loops",
        "eval_thresholds",
        "eval_batch_size",
        "gradient_checkpointing",
        "compile",
        "log_to",
        "data_workers",
    }
)


@dataclass
class TrainConfig:
    """Every setting of a fine-tuning run (one copy of each default; the CLI reads them from here)."""

    checkpoint: str
    out: str
    data: str | None = None
    loss_on: str | None = None  # from LOSS_ON; None: what the data implies
    doc_mask: bool = False  # plain text: documents do not attend to each other (labelled records: always)
    split_records: bool = False  # labelled records fill every block, cut at a block's end (see packing.py)
    block_size: int = 256
    batch_size: int = 8  # global sequences per micro-batch (split over the ranks)
    grad_accum: int = 1
    steps: int = 100  # optimizer updates
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup: int = 10  # optimizer updates of linear warmup
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    grad_clip: float = 1.0
    loop_steps: int = 20
    supervised: int = 5
    passes_per_step: int = 1
    beta: float = 1.0
    conf_weight: float = 1.0
    train_parts: tuple[str, ...] = DEFAULT_TRAIN_PARTS
    lora_rank: int | None = None  # None: full fine-tuning of the trained parts
    lora_alpha: float | None = None  # None: 2 x lora_rank
    lora_targets: tuple[str, ...] | None = None  # None: every linear projection of the adapted layers
    noise_std: float = 0.0  # latent noise after each loop pass, a fraction of the state's RMS (training only)
    init_noise_std: float = 0.0  # noise on the loop's initial state h0, a fraction of its RMS
    precision: str = "auto"
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the loop block's layers and the gate
    seed: int = 0
    held_out: float = 0.05
    eval_every: int = 50
    eval_blocks: int | None = None  # None: one per 8 blocks trained, 4 to 32 (resolved_eval_blocks)
    eval_batch_size: int = EvalConfig.batch_size
    eval_loops: tuple[int, ...] | None = None  # None: 1, 2, 4, ... up to --loop-steps, the trained depth
    eval_thresholds: tuple[float, ...] = EXIT_THRESHOLDS
    save_every: int = 100
    keep: int = 2
    device: str = "auto"
    resume: bool = False
    log_to: tuple[str, ...] = ()  # metrics also to these backends, from LOG_BACKENDS
    data_workers: int = 0  # tokenising processes; 0: one per CPU (at most 16)

    def validate(self) -> None:
        """Raise :class:`LoopusError` naming the flag, the value and the allowed range for every bad value."""
        for flag in (
            "block_size",
            "batch_size",
            "grad_accum",
            "steps",
            "eval_every",
            "eval_batch_size",
            "save_every",
            "keep",
        ):
            check_int(getattr(self, flag), "--" + flag.replace("_", "-"), 1)
        if self.eval_blocks is not None:
            check_int(self.eval_blocks, "--eval-blocks", 1)
        check_int(self.loop_steps, "--loop-steps", 1, MAX_LOOPS)
        check_int(self.supervised, "--supervised", 1, MAX_LOOPS)
        if self.supervised > self.loop_steps:
            raise LoopusError(
                f"--supervised {self.supervised} is greater than --loop-steps {self.loop_steps}; "
                "supervise at most as many steps as the loop runs"
            )
        check_int(self.passes_per_step, "--passes-per-step", 1, 2)
        check_int(self.warmup, "--warmup", 0)
        check_int(self.seed, "--seed", 0, MAX_SEED)
        check_float(self.lr, "--lr", 0.0, MAX_LR, low_open=True)  # 1e300 would overflow after the loading
        check_float(self.min_lr, "--min-lr", 0.0, self.lr)
        for flag in ("weight_decay", "grad_clip", "beta", "conf_weight"):
            check_float(getattr(self, flag), "--" + flag.replace("_", "-"), 0.0)
        check_float(self.held_out, "--held-out", 0.0, 1.0, low_open=True, high_open=True)
        check_loss_on(self.loss_on)
        if self.precision not in PRECISIONS:
            raise LoopusError(f"--precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        unknown = [p for p in self.train_parts if p not in PARTS]
        if unknown or not self.train_parts:
            raise LoopusError(
                f"--train {','.join(self.train_parts) or '(empty)'}: choose from "
                f"{','.join(PARTS)} (comma-separated)"
            )
        for k in self.eval_loops or ():
            check_int(k, "--eval-loops", 1, MAX_LOOPS)
        if self.eval_loops is not None and not self.eval_loops:
            raise LoopusError("--eval-loops must list loop counts of at least 1")
        for t in self.eval_thresholds:
            check_float(t, "--eval-thresholds", 0.0, 1.0, low_open=True, high_open=True)
        self._validate_scale()

    def _validate_scale(self) -> None:
        """LoRA, the noise knobs, logging backends and data workers."""
        if self.lora_rank is not None:
            check_int(self.lora_rank, "--lora-rank", 1, 65536)
        if self.lora_alpha is not None:
            check_float(self.lora_alpha, "--lora-alpha", 0.0, low_open=True)
        if self.lora_rank is None and (self.lora_alpha is not None or self.lora_targets):
            raise LoopusError("--lora-alpha and --lora-targets need --lora-rank; add --lora-rank R (e.g. 16)")
        for flag in ("noise_std", "init_noise_std"):
            check_float(getattr(self, flag), "--" + flag.replace("_", "-"), 0.0, 10.0)
        check_int(self.data_workers, "--data-workers", 0, 256)
        unknown = [b for b in self.log_to if b not in LOG_BACKENDS]
        if unknown:
            raise LoopusError(
                f"--log-to {','.join(self.log_to)}: {', '.join(unknown)} is not a logging backend; "
                f"choose from {','.join(LOG_BACKENDS)} (comma-separated)"
            )

    def identity(self) -> dict:
        """The settings that define the run (compared on --resume and against an existing --out)."""
        record = dataclasses.asdict(self)
        record["checkpoint"] = str(Path(self.checkpoint).expanduser().resolve())
        if self.data is not None and Path(self.data).expanduser().exists():
            record["data"] = str(Path(self.data).expanduser().resolve())
        return {
            k: (list(v) if isinstance(v, tuple) else v)
            for k, v in record.items()
            if k not in _RESUMABLE_CHANGES
        }

    def resolved_eval_loops(self) -> list[int]:
        """The loop counts evaluated: the given ones, or the powers of two below the trained depth
        (``--loop-steps``) and that depth: a run is not evaluated at a depth it never trained."""
        if self.eval_loops is not None:
            return sorted(set(self.eval_loops))
        counts = {1, self.loop_steps}
        k = 2
        while k < self.loop_steps:
            counts.add(k)
            k *= 2
        return sorted(counts)

    def resolved_eval_blocks(self) -> int:
        """Held-out blocks per evaluation: the given number, or one per 8 blocks the run trains on, at
        least 4 and at most 32, so that a short run is not evaluated for longer than it trains."""
        if self.eval_blocks is not None:
            return self.eval_blocks
        return min(32, max(4, self.steps * self.batch_size * self.grad_accum // 8))


def check_loss_on(loss_on: str | None) -> None:
    """A one-line error for a ``--loss-on`` value outside :data:`LOSS_ON` (None: what the data implies)."""
    if loss_on is not None and loss_on not in LOSS_ON:
        raise LoopusError(
            f"--loss-on {loss_on!r} is not one of {', '.join(LOSS_ON)}; leave it out: what the data implies"
        )


DEFAULTS = TrainConfig(checkpoint="", out="")  # what `loopus finetune --help` shows


def parse_parts(text: str) -> tuple[str, ...]:
    """``"loop,gate,decoder"`` -> ("loop", "gate", "decoder"), checked against :data:`PARTS`."""
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise LoopusError(f"--train {text!r}: choose from {','.join(PARTS)} (comma-separated)")
    return parts

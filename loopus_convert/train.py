"""The LoopUS trainer: random deep supervision over a looped checkpoint, in one readable loop.

Per optimizer update (``--steps`` of them), ``--grad-accum`` micro-batches of ``--batch-size`` packed blocks
(the global batch; under ``torchrun`` each rank takes its shard). Per micro-batch, random deep supervision:

    S  = sorted random subset of --supervised step indices out of 1..--loop-steps
         (a generator seeded from (seed, update, micro-batch): every rank and every resume draws the same)
    h0 = encode(embed(x))
    for t = 1 .. max(S):                        steps after the last supervised one are skipped
        h_in = h_{t-1}.detach()                 no graph across steps: memory flat in the step count
        t not in S:  h_t = loop_step(h_in)      under no_grad
        t in S:      h_t = loop_step^P(h_in)    P = --passes-per-step (2 reproduces the official code)
                     CE_t  = CE(decode(h_t)),   CE_prev = CE(decode(h_in)) without grad
                     q_t   = confidence_logit(h_t), target = per-sequence fraction of correct next tokens
                     loss  = CE_t + beta * SiLU(CE_t - CE_prev) + conf_weight * BCE(q_t, target)
                     backward(loss / (|S| * grad_accum))   each supervised step its own backward

then the gradients are averaged over ranks (one all-reduce per update), clipped, and AdamW steps (fp32 master
weights; bf16 autocast where asked or where the GPU supports it; no weight decay on norms, biases and the
gate's ``A_log``). The learning rate: warmup then cosine to ``--min-lr``, one step per optimizer update.

Everything a run needs to continue lives in a checkpoint directory written atomically (temporary directory,
then rename): the looped model and tokenizer (loadable like any converted checkpoint), the optimizer state
(safetensors), the step, the data position, every RNG state, the config and the command line (JSON).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from loopus_analyze.errors import LoopusError

log = logging.getLogger(__name__)

PARTS = ("encoder", "loop", "gate", "decoder", "head")
DEFAULT_TRAIN_PARTS = ("loop", "gate", "decoder", "head")  # the official recipe: the encoder stays frozen
PRECISIONS = ("auto", "fp32", "bf16")
CHECKPOINT_DIR = "checkpoints"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
KILL_HOOK_ENV = "LOOPUS_TEST_KILL"  # test hook: "after-save:N" / "mid-save:N" SIGKILLs the process there

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
    }
)


@dataclass
class TrainConfig:
    """Every setting of a fine-tuning run (one copy of each default; the CLI mirrors them)."""

    checkpoint: str
    out: str
    data: str | None = None
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
    precision: str = "auto"
    gradient_checkpointing: bool = False
    seed: int = 0
    held_out: float = 0.05
    eval_every: int = 50
    eval_blocks: int = 32
    eval_batch_size: int = 8
    eval_loops: tuple[int, ...] | None = None  # None: 1, 2, 4, ... up to 2x --loop-steps
    eval_thresholds: tuple[float, ...] = (0.6, 0.8, 0.9)
    save_every: int = 100
    keep: int = 2
    device: str = "auto"
    resume: bool = False

    def validate(self) -> None:
        """Raise :class:`LoopusError` naming the flag for every value out of range."""
        positive = {
            "--block-size": self.block_size,
            "--batch-size": self.batch_size,
            "--grad-accum": self.grad_accum,
            "--steps": self.steps,
            "--loop-steps": self.loop_steps,
            "--supervised": self.supervised,
            "--eval-every": self.eval_every,
            "--eval-blocks": self.eval_blocks,
            "--eval-batch-size": self.eval_batch_size,
            "--save-every": self.save_every,
            "--keep": self.keep,
        }
        for flag, value in positive.items():
            if value < 1:
                raise LoopusError(f"{flag} {value} must be at least 1")
        if self.supervised > self.loop_steps:
            raise LoopusError(
                f"--supervised {self.supervised} is greater than --loop-steps {self.loop_steps}; "
                "supervise at most as many steps as the loop runs"
            )
        if self.passes_per_step not in (1, 2):
            raise LoopusError(f"--passes-per-step {self.passes_per_step} must be 1 or 2")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise LoopusError(f"--lr {self.lr} / --min-lr {self.min_lr}: need 0 <= min-lr <= lr and lr > 0")
        if self.warmup < 0:
            raise LoopusError(f"--warmup {self.warmup} must be 0 or more optimizer updates")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.beta < 0 or self.conf_weight < 0:
            raise LoopusError("--weight-decay, --grad-clip, --beta and --conf-weight must not be negative")
        if self.precision not in PRECISIONS:
            raise LoopusError(f"--precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        unknown = [p for p in self.train_parts if p not in PARTS]
        if unknown or not self.train_parts:
            raise LoopusError(
                f"--train {','.join(self.train_parts) or '(empty)'}: choose from "
                f"{','.join(PARTS)} (comma-separated)"
            )
        if self.eval_loops is not None and (not self.eval_loops or min(self.eval_loops) < 1):
            raise LoopusError("--eval-loops must list loop counts of at least 1")
        if any(not 0.0 < t < 1.0 for t in self.eval_thresholds):
            raise LoopusError("--eval-thresholds must lie strictly between 0 and 1")

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
        """The loop counts evaluated: the given ones, or powers of two and the training count up to 2x."""
        if self.eval_loops is not None:
            return sorted(set(self.eval_loops))
        top = 2 * self.loop_steps
        counts = {1, self.loop_steps, top}
        k = 2
        while k < top:
            counts.add(k)
            k *= 2
        return sorted(counts)


def parse_parts(text: str) -> tuple[str, ...]:
    """``"loop,gate,decoder"`` -> ("loop", "gate", "decoder"), checked against :data:`PARTS`."""
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise LoopusError(f"--train {text!r}: choose from {','.join(PARTS)} (comma-separated)")
    return parts


# ------------------------------------------------------------------------------------------------- schedule


def lr_at(update: int, *, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Learning rate of optimizer update ``update`` (0-based): linear warmup, then cosine to ``min_lr``.

    ``lr * (update + 1) / warmup`` for the first ``warmup`` updates, then
    ``min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2`` with ``p = (update - warmup) / (total - warmup)``.
    """
    if update < warmup:
        return lr * (update + 1) / warmup
    progress = (update - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def draw_supervised_steps(seed: int, update: int, micro: int, loop_steps: int, supervised: int) -> list[int]:
    """The supervised step indices (1-based, sorted) of one micro-batch, a pure function of its arguments."""
    key = hashlib.sha256(f"{seed}:{update}:{micro}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & ((1 << 63) - 1))
    chosen = torch.randperm(loop_steps, generator=generator)[:supervised] + 1
    return sorted(chosen.tolist())


# ----------------------------------------------------------------------------------------------- parameters


def _as_modules(obj) -> list[nn.Module]:
    if obj is None:
        return []
    if isinstance(obj, nn.Module):
        return [obj]
    return [m for m in obj if m is not None]


def part_modules(model: nn.Module, part: str) -> list[nn.Module]:
    """The modules of one trainable part of a looped model."""
    if part == "encoder":
        return _as_modules(model.encoder_modules())
    if part == "loop":  # the gate is its own part, even where the model lists it with the loop block
        return [m for m in _as_modules(model.loop_modules()) if m is not getattr(model, "gate", None)]
    if part == "gate":
        return _as_modules(model.gate)
    if part == "decoder":
        return _as_modules(model.decoder_modules())
    if part == "head":
        return _as_modules(model.confidence_head)
    raise ValueError(part)


def select_trainable(model: nn.Module, parts: Iterable[str]) -> list[tuple[str, nn.Parameter]]:
    """Freeze everything, then unfreeze the parameters of ``parts``; returns the trainable ones by name."""
    model.requires_grad_(False)
    chosen: set[int] = set()
    for part in parts:
        for module in part_modules(model, part):
            for param in module.parameters():
                param.requires_grad_(True)
                chosen.add(id(param))
    named = [(name, p) for name, p in model.named_parameters() if id(p) in chosen]
    frozen_parts = [p for p in PARTS if p not in parts]
    if frozen_parts:
        shared = {id(p) for part in frozen_parts for m in part_modules(model, part) for p in m.parameters()}
        both = [name for name, p in named if id(p) in shared]
        if both:
            log.warning("%s: shared with a frozen part (tied weights), trained anyway", ", ".join(both))
    if not named:
        raise LoopusError(f"--train {','.join(parts)} selects no parameters of this model")
    return named


def no_decay(name: str, param: torch.Tensor) -> bool:
    """Norms, biases (every 1-D tensor) and the gate's decay parameter ``A_log`` get no weight decay."""
    return param.ndim < 2 or name.endswith("A_log") or "norm" in name.lower()


def build_optimizer(
    named: list[tuple[str, nn.Parameter]], cfg: TrainConfig, device: torch.device
) -> tuple[torch.optim.AdamW, list[list[str]]]:
    """AdamW over fp32 parameters with two groups (decay / no decay); returns it and the group names."""
    decay = [(n, p) for n, p in named if not no_decay(n, p)]
    plain = [(n, p) for n, p in named if no_decay(n, p)]
    groups = [
        g
        for g in (
            {"params": [p for _, p in decay], "weight_decay": cfg.weight_decay},
            {"params": [p for _, p in plain], "weight_decay": 0.0},
        )
        if g["params"]
    ]
    names = [[n for n, _ in decay], [n for n, _ in plain]]
    names = [n for n in names if n]
    optimizer = torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), foreach=device.type == "cuda"
    )
    return optimizer, names


# ------------------------------------------------------------------------------------------------- RDS step


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token CE (fp32) and each sequence's fraction of correct argmax predictions (B,)."""
    shifted = logits[:, :-1].float()  # (B, T-1, V)
    targets = input_ids[:, 1:]
    ce = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1))
    correct = (shifted.detach().argmax(-1) == targets).float().mean(dim=1)
    return ce, correct



def load_with_tokenizer(path: str | Path, device: torch.device) -> tuple[nn.Module, object]:
    """A looped checkpoint in fp32 on ``device`` and the tokenizer saved next to it (one-line errors)."""
    from transformers import AutoTokenizer

    import loopus_convert

    model = loopus_convert.load_looped(str(path), dtype="float32", device=str(device))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise LoopusError(
            f"{path} has no loadable tokenizer ({type(exc).__name__}); save one next to the checkpoint"
        ) from None
    return model, tokenizer

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
) -> BatchStats:
    """Random deep supervision on one micro-batch; accumulates ``scale`` times each step's gradient.

    The state is detached between loop steps, so each supervised step's graph spans only its own
    ``passes`` loop passes and the decoder; steps after the last supervised one are not run.
    """
    amp = torch.autocast(
        input_ids.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None
    )
    supervised = set(supervised_steps)
    stats = BatchStats()
    with amp, torch.set_grad_enabled(train_encoder):
        ctx = model.prepare(input_ids)
        h = model.encode(ctx)  # (B, T, D)
    prev_ce: torch.Tensor | None = None  # CE of the decoder on the current state, when already known
    for step in range(1, max(supervised_steps) + 1):
        h_in = h if (step == 1 and train_encoder) else h.detach()
        if step not in supervised:
            with amp, torch.no_grad():
                h = model.loop_step(h_in, ctx)
            prev_ce = None
            continue
        with amp:
            if prev_ce is None:
                with torch.no_grad():
                    prev_ce, _ = lm_loss(model.decode(h_in.detach(), ctx), input_ids)
            h_out = h_in
            for _ in range(passes):
                h_out = model.loop_step(h_out, ctx)
            ce, correct = lm_loss(model.decode(h_out, ctx), input_ids)
            q = model.confidence_logit(h_out, ctx).float()  # (B,)
            bce = F.binary_cross_entropy_with_logits(q, correct)
            mono = F.silu(ce - prev_ce)
            loss = ce + beta * mono + conf_weight * bce
        if loss.requires_grad:
            (loss * scale).backward()
        stats.add(
            BatchStats(float(loss.detach()), float(ce.detach()), float(mono.detach()), float(bce.detach()), 1)
        )
        h = h_out.detach()
        prev_ce = ce.detach()
    return stats


# ---------------------------------------------------------------------------------------------- distributed


@dataclass
class Distributed:
    """Where this process sits in a ``torchrun`` job (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def init_distributed(device_name: str) -> Distributed:
    """Join the ``torchrun`` process group when ``WORLD_SIZE`` > 1 (NCCL on GPUs, gloo on CPU)."""
    from loopus_analyze.models import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world <= 1:
        return Distributed(device=device)
    rank = int(os.environ["RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank=rank, world=world, device=device)


def all_reduce_gradients(params: list[nn.Parameter], world: int) -> None:
    """Average the gradients of ``params`` over the ranks in one flat all-reduce.

    A parameter that got no gradient on any rank keeps ``grad = None`` (AdamW then skips it, as it does in a
    single process); one that got a gradient on some ranks only counts zeros for the others.
    """
    if world <= 1:
        return
    has_grad = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
    torch.distributed.all_reduce(has_grad)
    active = [p for p, flag in zip(params, has_grad.tolist(), strict=True) if flag > 0]
    if not active:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in active])
    torch.distributed.all_reduce(flat)
    flat /= world
    offset = 0
    for p in active:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def _all_reduce_mean(tensor: torch.Tensor, dist: Distributed) -> torch.Tensor:
    """Mean over the ranks (on the rank's device: NCCL reduces GPU tensors only); returned on the CPU."""
    if dist.world > 1:
        tensor = tensor.to(dist.device)
        torch.distributed.all_reduce(tensor)
        tensor = tensor.cpu() / dist.world
    return tensor


# ---------------------------------------------------------------------------------------------- checkpoints


def _kill_hook(point: str, step: int) -> None:
    """Test hook: SIGKILL at ``point`` of checkpoint ``step`` when ``$LOOPUS_TEST_KILL`` says so."""
    if os.environ.get(KILL_HOOK_ENV) == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``out/checkpoints``, oldest first (temporary directories are ignored)."""
    root = Path(out) / CHECKPOINT_DIR
    found = []
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith("step-") and (path / STATE_JSON).is_file():
                found.append((int(path.name.removeprefix("step-")), path))
    return sorted(found)


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with file.open("rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    as_json = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    return as_json, tensors


def _set_rng_state(as_json: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, state, gauss = as_json["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = as_json["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count()) if f"rng.cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    groups = [
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]
    ]
    return {"param_groups": groups, "scalars": scalars}, tensors


def _optimizer_from_files(
    optimizer: torch.optim.Optimizer, as_json: dict, tensors: dict[str, torch.Tensor]
) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, values in as_json.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in as_json["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(
    out: Path,
    step: int,
    model: nn.Module,
    tokenizer,
    optimizer: torch.optim.Optimizer,
    state: dict,
    keep: int,
) -> Path:
    """Write checkpoint ``step`` atomically and prune all but the newest ``keep``; returns its directory.

    Everything is written into a temporary directory next to the final one and renamed into place when
    complete, so a crash at any moment leaves the previous checkpoint untouched and loadable.
    """
    from safetensors.torch import save_file

    from loopus_convert.convert import save_looped

    root = Path(out) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    # the looped model exactly as `loopus convert` writes it (self-contained, with the tokenizer)
    save_looped(model, tmp, tokenizer=tokenizer, generation_config=getattr(model, "generation_config", None))
    _kill_hook("mid-save", step)
    optimizer_json, tensors = _optimizer_to_files(optimizer)
    rng_json, rng_tensors = _rng_state()
    save_file({**tensors, **rng_tensors}, str(tmp / STATE_TENSORS))
    (tmp / STATE_JSON).write_text(
        json.dumps({**state, "optimizer": optimizer_json, "rng": rng_json}, indent=1)
    )
    _fsync_tree(tmp)
    if final.exists():  # the same step written again (a resumed run that had nothing left to do)
        old = root / f".old-step-{step:08d}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _kill_hook("after-save", step)
    for _, path in list_checkpoints(out)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    return final


def load_trainer_state(path: Path, optimizer: torch.optim.Optimizer) -> dict:
    """Restore the optimizer and every RNG from checkpoint ``path``; returns its JSON state."""
    from safetensors.torch import load_file

    state = json.loads((path / STATE_JSON).read_text())
    tensors = load_file(str(path / STATE_TENSORS))
    _optimizer_from_files(optimizer, state["optimizer"], tensors)
    _set_rng_state(state["rng"], tensors)
    return state


def resolve_checkpoint(path: str | Path) -> Path:
    """A looped checkpoint directory, or a training run's output directory (its newest checkpoint)."""
    path = Path(path).expanduser()
    if (path / RUN_FILE).is_file() and not (path / "config.json").is_file():
        found = list_checkpoints(path)
        if not found:
            raise LoopusError(f"{path} is a training run that saved no checkpoint yet; pass a checkpoint")
        return found[-1][1]
    return path


# -------------------------------------------------------------------------------------------- run directory


def _differences(saved: dict, current: dict) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [k for k in keys if saved.get(k) != current.get(k)]


def prepare_out_dir(cfg: TrainConfig) -> Path | None:
    """Check ``--out`` against ``--resume``; returns the checkpoint to resume from (None: a fresh run).

    A fresh run needs an empty or new directory (or one holding the same run that saved no checkpoint);
    ``--resume`` needs a run of the same settings with at least one complete checkpoint.
    """
    out = Path(cfg.out).expanduser()
    if out.exists() and not out.is_dir():
        raise LoopusError(f"--out {out} is a file; pass a directory")
    run_file = out / RUN_FILE
    saved = None
    if run_file.is_file():
        try:
            saved = json.loads(run_file.read_text())["config"]
        except (json.JSONDecodeError, KeyError):
            raise LoopusError(f"{run_file} is damaged; choose another --out") from None
    found = list_checkpoints(out)
    if saved is not None:
        diff = _differences(saved, cfg.identity())
        if diff:
            raise LoopusError(
                f"--out {out} holds another run (different {', '.join(diff)}); choose another --out"
                + ("" if cfg.resume else " or resume that run with its own settings")
            )
    if cfg.resume:
        if saved is None:
            raise LoopusError(f"--resume: {out} holds no training run to resume; start without --resume")
        if not found:
            raise LoopusError(
                f"--resume: the run in {out} saved no checkpoint yet; start it again without --resume"
            )
        return found[-1][1]
    if found:
        raise LoopusError(
            f"--out {out} holds a run with checkpoints up to step {found[-1][0]}; pass --resume to "
            "continue it or choose another --out"
        )
    if out.is_dir() and saved is None and any(out.iterdir()):
        raise LoopusError(
            f"--out {out} is not empty and holds no loopus run; choose a new or empty directory"
        )
    return None


def _append_jsonl(path: Path, record: dict) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records after ``step`` (steps a crashed run logged after its last checkpoint are redone)."""
    if not path.is_file():
        return
    kept = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= step
    ]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    """What a run produced."""

    out: Path
    checkpoint: Path  # the newest checkpoint (the trained model)
    steps: int
    last_eval: dict | None


Callback = Callable[[dict], None]


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast for ``bf16``, and for ``auto`` on a GPU that supports it; None means plain fp32."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def train(cfg: TrainConfig, argv: list[str] | None = None, callback: Callback | None = None) -> TrainResult:
    """Fine-tune the looped checkpoint ``cfg.checkpoint`` into ``cfg.out`` (see the module docstring).

    ``callback`` receives one dict per event (``event``: start, step, eval, checkpoint, end) on rank 0.
    Raises :class:`LoopusError` for bad settings, data, checkpoints and output directories, and when the
    loss stops being finite (the last good checkpoint stays).
    """
    cfg.validate()
    dist = init_distributed(cfg.device)
    if cfg.batch_size % dist.world:
        raise LoopusError(
            f"--batch-size {cfg.batch_size} does not split over {dist.world} processes; use a "
            "multiple of the process count"
        )
    emit = callback if (callback is not None and dist.main) else (lambda event: None)
    out = Path(cfg.out).expanduser()
    resume_from = prepare_out_dir(cfg)


    from loopus_convert.data import BlockSampler, load_blocks

    source = resume_from if resume_from is not None else Path(cfg.checkpoint).expanduser()
    model, tokenizer = load_with_tokenizer(source, dist.device)
    blocks = load_blocks(tokenizer, cfg.data, block_size=cfg.block_size, held_out=cfg.held_out, seed=cfg.seed)
    held_out = blocks.held_out[: cfg.eval_blocks]

    model.config.num_loops = cfg.loop_steps  # the saved checkpoints run the trained loop count by default
    named = select_trainable(model, cfg.train_parts)
    params = [p for _, p in named]
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    optimizer, group_names = build_optimizer(named, cfg, dist.device)
    sampler = BlockSampler(len(blocks.train), cfg.seed)
    amp_dtype = autocast_dtype(cfg.precision, dist.device)
    start = 0
    if resume_from is not None:
        state = load_trainer_state(resume_from, optimizer)
        if state["data_fingerprint"] != blocks.fingerprint:
            raise LoopusError(
                f"--resume: the data changed since the run started ({cfg.data or 'built-in'} gives "
                "different blocks); resume with the same data and --block-size"
            )
        sampler.load_state_dict(state["sampler"])
        start = int(state["step"])
        log.info("resuming %s from step %d (%s)", out, start, resume_from.name)
    else:
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
    metrics_path = out / METRICS_FILE
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        if resume_from is None:
            (out / RUN_FILE).write_text(
                json.dumps(
                    {
                        "config": cfg.identity(),
                        "argv": argv or sys.argv,
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    },
                    indent=1,
                )
            )
            metrics_path.unlink(missing_ok=True)
        _truncate_metrics(metrics_path, start)
        for stale in (out / CHECKPOINT_DIR).glob(".*-step-*"):  # half-written by a run that was killed
            log.info("removing %s, left by an interrupted checkpoint write", stale.name)
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()

    n_trainable = sum(p.numel() for p in params)
    emit(
        {
            "event": "start",
            "step": start,
            "steps": cfg.steps,
            "trainable": n_trainable,
            "parts": list(cfg.train_parts),
            "world": dist.world,
            "train_blocks": len(blocks.train),
            "held_out_blocks": len(held_out),
            "precision": str(amp_dtype),
            "resumed_from": str(resume_from) if resume_from is not None else None,
        }
    )
    log.debug(
        "training %s parameters (%s) for %d updates on %d process(es)",
        f"{n_trainable:,}",
        ",".join(cfg.train_parts),
        cfg.steps,
        dist.world,
    )
    per_rank = cfg.batch_size // dist.world
    tokens_per_update = cfg.batch_size * cfg.grad_accum * cfg.block_size
    last_eval: dict | None = None
    checkpoint = resume_from

    def state_json(step: int) -> dict:
        return {
            "step": step,
            "sampler": sampler.state_dict(),
            "data_fingerprint": blocks.fingerprint,
            "scheduler": {
                "kind": "warmup_cosine",
                "updates_done": step,
                "lr": cfg.lr,
                "min_lr": cfg.min_lr,
                "warmup": cfg.warmup,
                "total": cfg.steps,
            },
            "param_group_names": group_names,
            "config": cfg.identity(),
            "argv": argv or sys.argv,
            "world_size": dist.world,
            "last_eval": last_eval,
        }

    for update in range(start, cfg.steps):
        began = time.perf_counter()
        lr = lr_at(update, lr=cfg.lr, min_lr=cfg.min_lr, warmup=cfg.warmup, total=cfg.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        stats = BatchStats()
        drawn: list[list[int]] = []
        for micro in range(cfg.grad_accum):
            indices = sampler.take(cfg.batch_size)
            shard = indices[dist.rank * per_rank : (dist.rank + 1) * per_rank]
            input_ids = blocks.train[shard].to(dist.device)
            steps = draw_supervised_steps(cfg.seed, update, micro, cfg.loop_steps, cfg.supervised)
            drawn.append(steps)
            stats.add(
                rds_micro_batch(
                    model,
                    input_ids,
                    steps,
                    passes=cfg.passes_per_step,
                    beta=cfg.beta,
                    conf_weight=cfg.conf_weight,
                    scale=1.0 / (len(steps) * cfg.grad_accum),
                    autocast_dtype=amp_dtype,
                    train_encoder="encoder" in cfg.train_parts,
                )
            )
        all_reduce_gradients(params, dist.world)
        totals = _all_reduce_mean(stats.as_tensor(), dist)
        loss, ce, mono, bce = (float(totals[i] / totals[4]) for i in range(4))
        if not math.isfinite(loss):
            last = f"; the last good checkpoint is {checkpoint}" if checkpoint is not None else ""
            raise LoopusError(
                f"the training loss became {loss} at step {update + 1} (lr {lr:.3g}){last}; "
                "lower --lr or use --precision fp32"
            )
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        optimizer.step()
        elapsed = time.perf_counter() - began
        step = update + 1
        record = {
            "kind": "train",
            "step": step,
            "loss": loss,
            "ce": ce,
            "mono": mono,
            "bce": bce,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": step * tokens_per_update,
            "tokens_per_s": tokens_per_update / elapsed,
            "supervised_steps": drawn[0],
        }
        if dist.main:
            _append_jsonl(metrics_path, record)
        emit({"event": "step", **record, "steps": cfg.steps})

        if step % cfg.eval_every == 0 or step == cfg.steps:
            if dist.main:
                last_eval = run_eval(model, held_out, cfg, amp_dtype)
                record = {"kind": "eval", "step": step, **last_eval}
                _append_jsonl(metrics_path, record)
                emit({"event": "eval", **record})
            dist.barrier()
        if step % cfg.save_every == 0 or step == cfg.steps:
            if dist.main:
                checkpoint = save_checkpoint(
                    out, step, model, tokenizer, optimizer, state_json(step), cfg.keep
                )
                emit({"event": "checkpoint", "step": step, "path": str(checkpoint)})
            dist.barrier()
            checkpoint = out / CHECKPOINT_DIR / f"step-{step:08d}"

    if checkpoint is None:
        raise LoopusError(f"--out {out}: nothing to do and no checkpoint was written")
    emit({"event": "end", "step": cfg.steps, "checkpoint": str(checkpoint), "last_eval": last_eval})
    return TrainResult(out=out, checkpoint=checkpoint, steps=cfg.steps, last_eval=last_eval)


def run_eval(
    model: nn.Module, held_out: torch.Tensor, cfg: TrainConfig, amp_dtype: torch.dtype | None
) -> dict:
    """Held-out loss and perplexity per loop count, confidence calibration and early-exit statistics."""
    from loopus_convert.evaluate import early_exit_stats, loss_per_loops

    was_training = model.training
    model.eval()
    try:
        loops = cfg.resolved_eval_loops()
        per_loops = loss_per_loops(
            model, held_out, loops, batch_size=cfg.eval_batch_size, autocast_dtype=amp_dtype
        )
        exits = early_exit_stats(
            model,
            held_out,
            cfg.eval_thresholds,
            max_loops=cfg.loop_steps,
            batch_size=cfg.eval_batch_size,
            autocast_dtype=amp_dtype,
        )
    finally:
        model.train(was_training)
    return {**per_loops, "early_exit": exits}

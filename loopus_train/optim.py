"""What is trained and how it steps: the trainable parts, AdamW's parameter groups, the learning rate.

No weight decay on norms, biases (every 1-D tensor) and the gate's decay parameter ``A_log``; fp32 master
weights (the model is loaded in fp32, autocast handles bf16); one schedule step per optimizer update: linear
warmup, then cosine to ``--min-lr``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import torch
from torch import nn

from loopus_convert.modeling_loopus import SelectiveGate
from loopus_core.errors import LoopusError
from loopus_train.config import PARTS, TrainConfig

log = logging.getLogger(__name__)


def lr_at(update: int, *, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Learning rate of optimizer update ``update`` (0-based): linear warmup, then cosine to ``min_lr``.

    ``lr * (update + 1) / warmup`` for the first ``warmup`` updates, then
    ``min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2`` with ``p = (update - warmup) / (total - warmup)``.
    """
    if update < warmup:
        return lr * (update + 1) / warmup
    progress = (update - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


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
    for frozen in [p for p in PARTS if p not in parts]:
        _say_tied(model, named, frozen, [p for p in PARTS if p in parts])
    if not named:
        raise LoopusError(f"--train {','.join(parts)} selects no parameters of this model")
    return named


def _say_tied(model: nn.Module, named: list[tuple[str, nn.Parameter]], frozen: str, parts: list[str]) -> None:
    """The decision on tied weights, said once per run: a weight that the ``frozen`` part shares with the
    trained ``parts`` (a tied input embedding and output head) trains with them; its other weights stay
    fixed."""
    ids = {id(p) for m in part_modules(model, frozen) for p in m.parameters()}
    for name, param in named:
        if id(param) not in ids:
            continue
        holders = ", ".join(
            t for t in parts if any(p is param for m in part_modules(model, t) for p in m.parameters())
        )
        log.warning(
            "%s: tied weights of the %s and the %s; trained with the %s, so the %s's other weights stay "
            "frozen but this one changes (train without %s to keep it fixed)",
            name, frozen, holders, holders, frozen, holders,
        )  # fmt: skip


def no_decay(name: str, param: torch.Tensor) -> bool:
    """Norms, biases (every 1-D tensor) and the parameters the gate exempts (``SelectiveGate.NO_DECAY``: its
    decay rate ``A_log``) get no weight decay."""
    owner, _, leaf = name.rpartition(".")
    from_gate = owner.rpartition(".")[2] == "gate" and leaf in SelectiveGate.NO_DECAY
    return param.ndim < 2 or from_gate or "norm" in name.lower()


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

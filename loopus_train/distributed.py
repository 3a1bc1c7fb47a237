"""Where this process sits in a ``torchrun`` job, and the collective operations the trainer needs.

The gradients of the trained parameters are averaged over the ranks once per optimizer update (after the
several backward passes of the supervised steps), in one flat all-reduce.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from loopus_core.runtime import resolve_device


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


def all_reduce_mean(tensor: torch.Tensor, dist: Distributed) -> torch.Tensor:
    """Mean over the ranks (on the rank's device: NCCL reduces GPU tensors only); returned on the CPU."""
    if dist.world > 1:
        tensor = tensor.to(dist.device)
        torch.distributed.all_reduce(tensor)
        tensor = tensor.cpu() / dist.world
    return tensor

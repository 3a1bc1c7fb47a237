"""Where this process sits in a ``torchrun`` job, and torch's own engine for more than one process: FSDP2.

One process trains the model as it is. Under ``torchrun`` (``WORLD_SIZE`` > 1) the ranks form a 1-D device
mesh (``init_device_mesh``: ``cpu`` with gloo, ``cuda`` with NCCL) and :func:`shard_model` applies FSDP2's
``fully_shard`` to every decoder layer, to the gate and to the confidence head, each a unit of its own, and
last to the whole model: the root unit, which keeps what is left (embeddings, final norm, lm_head). The
trainer calls the model's stages rather than ``forward``; ``prepare`` and ``decode`` use root parameters and
are registered as FSDP forward methods (``register_fsdp_forward_method``), the other stages touch only their
own units (the probes of ``shared/reading/distributed.md``: a stage that uses a root parameter outside the
root's forward fails with "mixed torch.Tensor and DTensor").

Gradients are reduce-scattered (averaged over the ranks) by FSDP itself, once per optimizer update:
:func:`gradient_sync` turns synchronisation off before an update's first backward pass and on again before
its last, so the supervised steps' several backward passes accumulate locally in between. Under bf16,
``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` computes in bf16 and keeps fp32 master shards.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from loopus_core.runtime import resolve_device

STAGE_METHODS = ("prepare", "decode", "head")  # stages that use the root unit's parameters


@dataclass
class Distributed:
    """Where this process sits in a ``torchrun`` job (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mesh: object = None  # the DeviceMesh of the ranks (None for one process)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def broadcast(self, value: object) -> object:
        """Rank 0's ``value`` on every rank."""
        if self.world == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def init_distributed(device_name: str) -> Distributed:
    """Join the ``torchrun`` process group when ``WORLD_SIZE`` > 1 (NCCL on GPUs, gloo on CPU)."""
    from torch.distributed.device_mesh import init_device_mesh

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
    mesh = init_device_mesh(device.type, (world,))
    return Distributed(rank=rank, world=world, device=device, mesh=mesh)


def shard_model(model: nn.Module, dist: Distributed, amp_dtype: torch.dtype | None) -> nn.Module:
    """FSDP2 units for a looped model (see the module docstring); the model itself on one process."""
    if not dist.sharded:
        return model.to(dist.device)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    policy = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32 if amp_dtype else None)
    options = dict(mesh=dist.mesh, mp_policy=policy, reshard_after_forward=True)
    for unit in [*model.layers, model.gate, model.confidence_head]:
        fully_shard(unit, **options)
    fully_shard(model, **options)
    for name in STAGE_METHODS:
        register_fsdp_forward_method(model, name)
    return model


def gradient_sync(model: nn.Module, dist: Distributed, enabled: bool) -> None:
    """Whether the next backward passes reduce gradients over the ranks (always on for one process)."""
    if dist.sharded:
        model.set_requires_gradient_sync(enabled)


def clip_gradients(params: list[nn.Parameter], max_norm: float) -> float:
    """``clip_grad_norm_`` over (possibly sharded) gradients; the total norm over all ranks."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def full_state_dict(model: nn.Module, dist: Distributed) -> dict[str, torch.Tensor]:
    """The model's complete state dict on rank 0 (in CPU memory; every rank must call it); {} elsewhere."""
    if not dist.sharded:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def all_reduce_mean(tensor: torch.Tensor, dist: Distributed) -> torch.Tensor:
    """Mean over the ranks (on the rank's device: NCCL reduces GPU tensors only); returned on the CPU."""
    if dist.world > 1:
        tensor = tensor.to(dist.device)
        torch.distributed.all_reduce(tensor)
        tensor = tensor.cpu() / dist.world
    return tensor

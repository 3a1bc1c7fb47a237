"""LoRA through ``peft``: low-rank adapters on the trained layers, the gate and the confidence head in full.

``--lora-rank R`` injects a LoRA adapter (``W x + (alpha / R) * B A x``, ``A``: (R, in), ``B``: (out, R) zero
at the start, so training starts from the checkpoint itself) into every linear projection of the decoder
layers of the trained parts (``--train``: by default the loop block and the decoder; ``--lora-targets``
picks the projections by name, e.g. ``q_proj,v_proj``). Everything else is frozen except the gate and the
confidence head, which are new in a looped model and always trained in full.

Checkpoints during the run hold the adapter (``adapter/adapter_config.json`` and
``adapter/adapter_model.safetensors`` with the LoRA matrices, the gate and the head: a folder of its own,
since transformers applies an adapter it finds next to a model's weights when loading them); the run's last
checkpoint also holds the merged looped checkpoint (``W + (alpha / R) * B A`` written into the base weights
by ``peft``'s ``merge_and_unload``), which loads like any converted checkpoint, without ``peft``.

A LoRA run trains on top of the base checkpoint at ``CKPT``, which it reads again on ``--resume`` and for the
final merge. The run pins it: its weights fingerprint (:func:`weights_fingerprint`, a sha256 over every
tensor) is recorded in each checkpoint's ``trainer_state.json`` (``base_fingerprint``), and a resume or a
merge that finds other weights at that path is refused with one line (:func:`check_base`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import torch
from torch import nn

from loopus_convert.checkpoint import load_looped, looped_state, write_checkpoint_files, write_safetensors
from loopus_core.errors import LoopusError
from loopus_train.config import TrainConfig
from loopus_train.state import STATE_JSON

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"  # the adapter's folder inside a checkpoint (see the module docstring)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FULL_MODULES = ("gate", "confidence_head")  # trained in full in a LoRA run, saved with the adapter


def _peft():
    try:
        import peft  # optional (loopus[train])
    except ImportError:
        raise LoopusError("--lora-rank needs the peft library: `pip install 'loopus[train]'`") from None
    return peft


def lora_layers(model: nn.Module, parts: tuple[str, ...]) -> list[int]:
    """Decoder-layer indices of the trained parts that get adapters (encoder / loop / decoder)."""
    cfg = model.config
    spans = {
        "encoder": range(0, cfg.split_start),
        "loop": range(cfg.split_start, cfg.split_end),
        "decoder": range(cfg.split_end, cfg.num_base_layers),
    }
    return sorted({i for part in parts if part in spans for i in spans[part]})


def lora_config(model: nn.Module, cfg: TrainConfig):
    """The ``peft.LoraConfig`` of a run: rank, alpha (default 2 x rank), and a regex over module names that
    selects the target projections inside the chosen layers."""
    peft = _peft()
    layers = lora_layers(model, cfg.train_parts)
    if not layers:
        raise LoopusError(
            f"--lora-rank with --train {','.join(cfg.train_parts)}: no decoder layer to adapt; "
            "train encoder, loop or decoder"
        )
    linear = _linear_types()
    found = sorted(
        {
            name.rsplit(".", 1)[-1]
            for i in layers
            for name, m in model.layers[i].named_modules()
            if isinstance(m, linear)
        }
    )
    targets = list(cfg.lora_targets) if cfg.lora_targets else found
    unknown = [t for t in targets if t not in found]
    if unknown:
        raise LoopusError(
            f"--lora-targets {','.join(unknown)}: not a projection of this model's layers; choose from "
            f"{','.join(found)}"
        )
    prefix = re.escape(model.layers_path)
    pattern = rf"{prefix}\.({'|'.join(map(str, layers))})\.(.+\.)?({'|'.join(map(re.escape, targets))})"
    return peft.LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha if cfg.lora_alpha is not None else 2 * cfg.lora_rank,
        lora_dropout=0.0,
        target_modules=pattern,
        bias="none",
    )


def _linear_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D  # GPT-2's projections

    return (nn.Linear, Conv1D)


def add_lora(model: nn.Module, config) -> None:
    """Inject the adapters in place; freeze everything but them, the gate and the confidence head."""
    peft = _peft()
    peft.inject_adapter_in_model(config, model)
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_" in name or name.split(".")[0] in FULL_MODULES)


def adapter_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter's part of a state dict: the LoRA matrices, the gate and the confidence head."""
    return {k: v for k, v in state.items() if ".lora_" in k or k.split(".")[0] in FULL_MODULES}


def load_adapter(model: nn.Module, directory: Path) -> None:
    """Fill an adapted model's adapter from a checkpoint written by :func:`adapter_writer`."""
    from safetensors.torch import load_file

    tensors = load_file(str(Path(directory) / ADAPTER_DIR / ADAPTER_WEIGHTS))
    missing = set(adapter_tensors(model.state_dict())) - set(tensors)
    unexpected = model.load_state_dict(tensors, strict=False).unexpected_keys
    if missing or unexpected:
        raise LoopusError(
            f"{directory}: the adapter does not fit this run ({len(missing)} tensors missing, "
            f"{len(unexpected)} unexpected); resume with the run's own --lora-rank and --lora-targets"
        )


def weights_fingerprint(model: nn.Module) -> str:
    """``sha256:<hex>`` over the name, dtype, shape and bytes of every tensor a looped checkpoint stores
    (:func:`~loopus_convert.checkpoint.looped_state`, sorted by name): equal exactly when the weights are."""
    digest = hashlib.sha256()
    for name, tensor in sorted(looped_state(model).items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)}:".encode())
        digest.update(memoryview(flat.view(torch.uint8).numpy()))
    return "sha256:" + digest.hexdigest()


def pin_base(model: nn.Module, checkpoint: str | Path, resume_from: Path | None) -> str:
    """The base ``model``'s fingerprint, checked against the one recorded in ``resume_from`` (a resume)."""
    fingerprint = weights_fingerprint(model)
    if resume_from is not None:
        recorded = json.loads((Path(resume_from) / STATE_JSON).read_text()).get("base_fingerprint")
        check_base(checkpoint, recorded, fingerprint, "--resume")
    return fingerprint


def check_base(checkpoint: str | Path, recorded: str | None, actual: str, what: str) -> None:
    """Refuse (one line) a base checkpoint whose weights are not those the run recorded; a run of a loopus
    before the record (``recorded`` None) cannot be checked: a warning says so."""
    if recorded is None:
        log.warning("%s: the run recorded no fingerprint of its base %s; not checked", what, checkpoint)
        return
    if recorded != actual:
        raise LoopusError(
            f"{what}: the base checkpoint {checkpoint} is not the one this LoRA run trained on (its weights "
            f"fingerprint is {actual[:19]}, the run recorded {recorded[:19]}); put the run's base back at "
            "that path and resume, or start a new run with another --out"
        )


def merged_model(
    checkpoint: str | Path, config, tensors: dict[str, torch.Tensor], base_fingerprint: str | None = None
) -> nn.Module:
    """The base looped checkpoint with the adapter ``tensors`` merged into its weights (``peft``); with
    ``base_fingerprint``, a base whose weights changed is refused (:func:`check_base`)."""
    peft = _peft()
    base = load_looped(checkpoint)
    if base_fingerprint is not None:
        check_base(checkpoint, base_fingerprint, weights_fingerprint(base), "the final LoRA merge")
    adapted = peft.tuners.lora.LoraModel(base, config, "default")
    base.load_state_dict(adapter_tensors(tensors), strict=False)
    return adapted.merge_and_unload()


def adapter_writer(
    config, merge_from: str | Path | None, tokenizer, num_loops: int, base_fingerprint: str | None = None
):
    """A ``write_model`` for :func:`loopus_train.state.save_checkpoint`: the adapter files, and with
    ``merge_from`` (the base checkpoint, whose weights must match ``base_fingerprint``) the merged looped
    checkpoint next to them."""

    def write(directory: Path, tensors: dict[str, torch.Tensor]) -> None:
        (directory / ADAPTER_DIR).mkdir()
        write_safetensors(adapter_tensors(tensors), directory / ADAPTER_DIR / ADAPTER_WEIGHTS)
        config.save_pretrained(str(directory / ADAPTER_DIR))  # adapter_config.json
        if merge_from is None:
            return
        model = merged_model(merge_from, config, tensors, base_fingerprint)
        model.config.num_loops = num_loops
        weights = looped_state(model)
        write_checkpoint_files(
            directory,
            lambda file: write_safetensors(weights, file),
            model.config,
            torch.float32,
            tokenizer,
            getattr(model, "generation_config", None),
        )

    return write

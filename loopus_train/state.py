"""Everything a resume needs, in one object: :class:`TrainState`, and the checkpoints that hold it.

A checkpoint ``out/checkpoints/step-N/`` is a complete looped checkpoint (it loads like any converted one,
with its tokenizer) plus ``trainer_state.json`` (step, data position, schedule, settings, command line,
last evaluation) and ``trainer_state.safetensors`` (optimizer moments and every RNG state). It is written
through :func:`loopus_core.runtime.atomic_directory` (temporary directory, fsync, rename), so a crash at any
moment leaves the previous checkpoint untouched and loadable.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from loopus_convert.checkpoint import looped_state, write_checkpoint_files, write_safetensors
from loopus_core.errors import LoopusError
from loopus_core.runtime import atomic_directory
from loopus_train.data import BlockSampler

CHECKPOINT_DIR = "checkpoints"
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"


@dataclass
class TrainState:
    """The resumable state of a run besides the model weights.

    ``step`` optimizer updates are done; ``sampler`` is the data position; ``optimizer`` holds the AdamW
    moments; ``record`` is the JSON that describes the run (settings, command line, schedule, parameter
    group names, world size); ``last_eval`` the newest evaluation. :meth:`save` also stores every RNG state,
    :meth:`load` restores all of it.
    """

    step: int
    sampler: BlockSampler
    optimizer: torch.optim.Optimizer
    data_fingerprint: str
    record: dict = field(default_factory=dict)
    last_eval: dict | None = None

    def to_json(self) -> dict:
        return {
            **self.record,
            "step": self.step,
            "sampler": self.sampler.state_dict(),
            "data_fingerprint": self.data_fingerprint,
            "last_eval": self.last_eval,
        }

    def save(self, directory: Path) -> None:
        """Write ``trainer_state.json`` and ``trainer_state.safetensors`` into ``directory``."""
        from safetensors.torch import save_file

        optimizer_json, tensors = _optimizer_to_files(self.optimizer)
        rng_json, rng_tensors = _rng_state()
        save_file({**tensors, **rng_tensors}, str(directory / STATE_TENSORS))
        (directory / STATE_JSON).write_text(
            json.dumps({**self.to_json(), "optimizer": optimizer_json, "rng": rng_json}, indent=1)
        )

    def load(self, directory: Path) -> None:
        """Restore step, data position, optimizer and RNG states from the checkpoint ``directory``."""
        from safetensors.torch import load_file

        saved = json.loads((directory / STATE_JSON).read_text())
        if saved["data_fingerprint"] != self.data_fingerprint:
            raise LoopusError(
                f"--resume: the data changed since the run started ({directory} was trained on other "
                "blocks); "
                "resume with the same data and --block-size"
            )
        tensors = load_file(str(directory / STATE_TENSORS))
        _optimizer_from_files(self.optimizer, saved["optimizer"], tensors)
        _set_rng_state(saved["rng"], tensors)
        self.sampler.load_state_dict(saved["sampler"])
        self.step = int(saved["step"])
        self.last_eval = saved.get("last_eval")


def save_checkpoint(out: Path, model: nn.Module, tokenizer, state: TrainState, keep: int) -> Path:
    """Write checkpoint ``state.step`` atomically and prune all but the newest ``keep``; returns its path."""
    final = Path(out) / CHECKPOINT_DIR / f"step-{state.step:08d}"
    tensors = looped_state(model)
    generation = getattr(model, "generation_config", None)
    with atomic_directory(final, existing="replace", label="the checkpoint", fsync=True) as tmp:
        write_checkpoint_files(
            tmp,
            lambda file: write_safetensors(tensors, file),
            model.config,
            next(model.parameters()).dtype,
            tokenizer,
            generation,
        )
        state.save(tmp)
    for _, path in list_checkpoints(out)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    return final


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``out/checkpoints``, oldest first (temporary directories are ignored)."""
    root = Path(out) / CHECKPOINT_DIR
    found = []
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith("step-") and (path / STATE_JSON).is_file():
                found.append((int(path.name.removeprefix("step-")), path))
    return sorted(found)


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

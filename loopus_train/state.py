"""Everything a resume needs, in one object: :class:`TrainState`, and the checkpoints that hold it.

A checkpoint ``out/checkpoints/step-N/`` holds

* the model: a complete looped checkpoint (it loads like any converted one, with its tokenizer), gathered
  from the shards on rank 0; or, for a LoRA run, the adapter (``adapter_config.json`` and
  ``adapter_model.safetensors``: the LoRA matrices, the gate and the confidence head), plus the merged
  looped checkpoint in the run's last checkpoint;
* ``optimizer/``: the AdamW moments through ``torch.distributed.checkpoint`` (each rank writes its own shard;
  a resume on another number of ranks re-shards them);
* ``rng-rank-R.json``: every RNG state of rank R;
* ``trainer_state.json``, written last: step, data position, schedule, settings, command line, last
  evaluation, and ``files``: the size of every other file of the checkpoint. A checkpoint is complete when
  this file reads and every file it lists is there with its size (:func:`checkpoint_problem`); only
  complete checkpoints are listed, resumed from or evaluated.

The directory is written through :func:`loopus_core.outputs.atomic_directory` on rank 0 (temporary
directory, fsync, rename), the other ranks writing their parts into the same temporary directory, so a
crash at any moment leaves the previous checkpoint untouched and loadable.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from loopus_convert.checkpoint import looped_state, write_checkpoint_files, write_safetensors
from loopus_core.errors import LoopusError
from loopus_core.outputs import atomic_directory, remove_directory
from loopus_train.data import BlockSampler
from loopus_train.distributed import Distributed, full_state_dict

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
STATE_JSON = "trainer_state.json"
OPTIMIZER_DIR = "optimizer"
RNG_FILE = "rng-rank-{rank:05d}.json"
_STEP_NAME = re.compile(r"step-(\d+)")  # checkpoints/step-00000040; other names (step-latest) are not ours


@dataclass
class TrainState:
    """The resumable state of a run besides the model weights.

    ``step`` optimizer updates are done; ``sampler`` is the data position; ``optimizer`` holds the AdamW
    moments of ``model``'s trainable parameters; ``record`` is the JSON that describes the run (settings,
    command line, schedule, parameter group names, world size); ``last_eval`` the newest evaluation.
    """

    step: int
    sampler: BlockSampler
    optimizer: torch.optim.Optimizer
    model: nn.Module
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
        """Write ``trainer_state.json`` (rank 0, after every other file of the checkpoint), with the size
        of each of those files (what :func:`checkpoint_problem` checks)."""
        files = {
            path.relative_to(directory).as_posix(): path.stat().st_size
            for path in sorted(directory.rglob("*"))
            if path.is_file()
        }
        (directory / STATE_JSON).write_text(json.dumps({**self.to_json(), "files": files}, indent=1))

    def load(self, directory: Path, dist: Distributed) -> None:
        """Restore step, data position, optimizer and this rank's RNG states from checkpoint ``directory``."""
        saved = json.loads((directory / STATE_JSON).read_text())
        if saved["data_fingerprint"] != self.data_fingerprint:
            raise LoopusError(
                f"--resume: the data changed since the run started ({directory} was trained on other "
                "blocks); resume with the same data and --block-size"
            )
        load_optimizer(self.model, self.optimizer, directory / OPTIMIZER_DIR)
        rng = directory / RNG_FILE.format(rank=dist.rank)
        if not rng.is_file():
            raise LoopusError(
                f"--resume: {directory} holds no RNG state of rank {dist.rank} (it was written by "
                f"{saved.get('world_size', 1)} process(es)); resume with that many processes"
            )
        _set_rng_state(json.loads(rng.read_text()))
        self.sampler.load_state_dict(saved["sampler"])
        self.step = int(saved["step"])
        self.last_eval = saved.get("last_eval")


def save_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """The optimizer state through ``torch.distributed.checkpoint`` (a collective under torchrun)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    with _single_process_quiet(), _interrupts_unwrapped():
        dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=str(directory))


def load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Fill ``optimizer`` from :func:`save_optimizer`'s directory (re-sharded for this run's ranks)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    optimizer.zero_grad(set_to_none=True)  # an optimizer without state is initialised only without grads
    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    with _single_process_quiet(), _interrupts_unwrapped():
        dcp.load(state, checkpoint_id=str(directory))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """No "assuming the intent is to save in a single process" warning: one process is a normal run."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


@contextlib.contextmanager
def _interrupts_unwrapped() -> Iterator[None]:
    """Ctrl-C or SIGTERM inside ``torch.distributed.checkpoint`` as themselves: dcp catches every exception
    of a save or load step (BaseException, so KeyboardInterrupt and :class:`~loopus_core.errors.Terminated`
    too) and raises a ``CheckpointException`` that wraps them, which the CLI would show as a traceback."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as exc:
        for wrapped, _ in exc.failures.values():
            if isinstance(wrapped, KeyboardInterrupt):
                raise wrapped from None
        raise


@contextlib.contextmanager
def _shared_directory(final: Path, dist: Distributed) -> Iterator[Path]:
    """:func:`atomic_directory` on rank 0, its temporary directory shared with every rank."""
    if not dist.main:
        yield Path(dist.broadcast(None))
        return
    with atomic_directory(final, existing="replace", label="the checkpoint", fsync=True) as tmp:
        dist.broadcast(str(tmp))
        yield tmp


def save_checkpoint(
    out: Path,
    model: nn.Module,
    tokenizer,
    state: TrainState,
    keep: int,
    dist: Distributed | None = None,
    write_model=None,
) -> Path:
    """Write checkpoint ``state.step`` (every rank calls it) and prune all but the newest ``keep``.

    ``write_model(directory, full_state)`` writes the model files on rank 0 (default: the looped
    checkpoint); returns the checkpoint's path."""
    dist = dist or Distributed()
    final = Path(out) / CHECKPOINT_DIR / f"step-{state.step:08d}"
    tensors = full_state_dict(model, dist)
    with _shared_directory(final, dist) as tmp:
        if dist.main:
            (write_model or _write_looped(model, tokenizer))(tmp, tensors)
        save_optimizer(model, state.optimizer, tmp / OPTIMIZER_DIR)
        (tmp / RNG_FILE.format(rank=dist.rank)).write_text(json.dumps(_rng_state()))
        dist.barrier()
        if dist.main:
            state.save(tmp)
    if dist.main:
        for _, path in list_checkpoints(out)[:-keep]:
            remove_directory(path)
    dist.barrier()
    return final


def _write_looped(model: nn.Module, tokenizer):
    """A ``write_model`` that writes the looped checkpoint files of ``model``'s gathered tensors."""

    def write(directory: Path, tensors: dict[str, torch.Tensor]) -> None:
        weights = looped_state(model, tensors)
        write_checkpoint_files(
            directory,
            lambda file: write_safetensors(weights, file),
            model.config,
            next(iter(weights.values())).dtype,
            tokenizer,
            getattr(model, "generation_config", None),
        )

    return write


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``out/checkpoints``, oldest first (:func:`checkpoint_problem`; temporary
    directories and names other than ``step-N`` are ignored)."""
    return [(step, path) for step, path in _step_dirs(out) if checkpoint_problem(path) is None]


def newest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint of run ``out`` (None: there is none). Each newer, incomplete one is
    logged as a warning with what it lacks: a resume or an evaluation falls back past it and says so."""
    for _, path in reversed(_step_dirs(out)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        log.warning("checkpoint %s is incomplete (%s); using the previous complete one", path.name, problem)
    return None


def incomplete_checkpoints(out: Path) -> list[tuple[Path, str]]:
    """The ``step-N`` directories of ``out`` that are not complete checkpoints, with what each lacks."""
    found = ((path, checkpoint_problem(path)) for _, path in _step_dirs(out))
    return [(path, problem) for path, problem in found if problem is not None]


def checkpoint_problem(path: Path) -> str | None:
    """Why checkpoint directory ``path`` cannot be resumed from (None: it is complete): no or an unreadable
    ``trainer_state.json``, or a file it lists missing or of another size (a checkpoint is written
    atomically, so this is damage from outside, or a checkpoint of a loopus before the list)."""
    try:
        saved = json.loads((path / STATE_JSON).read_text())
    except FileNotFoundError:
        return f"no {STATE_JSON}"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return f"{STATE_JSON} is damaged"
    if not isinstance(saved, dict) or not isinstance(saved.get("files", {}), dict):
        return f"{STATE_JSON} is damaged"
    for name, size in saved.get("files", {}).items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, not {size}"
    return None


def _step_dirs(out: Path) -> list[tuple[int, Path]]:
    """Every ``checkpoints/step-N`` directory of run ``out``, complete or not, by step."""
    root = Path(out) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_NAME.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def _rng_state() -> dict:
    """Python's, NumPy's, torch's and every CUDA device's RNG state, as JSON."""
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in cuda])

"""Metrics beside ``metrics.jsonl``: TensorBoard and Weights & Biases, optional, off by default.

``--log-to tensorboard,wandb`` sends every record the trainer writes to ``metrics.jsonl`` to those backends
too, on rank 0, as flat scalars named by their path (``train/loss``, ``eval/loops/4/ppl``,
``eval/early_exit/thresholds/0.9/mean_loops``) at the record's optimizer step. TensorBoard writes event
files into ``out/tensorboard`` (``torch.utils.tensorboard``; needs the ``tensorboard`` package), W&B a run
whose id is stored in ``out/wandb-run-id`` so that ``--resume`` continues it (needs ``wandb`` and a login).
A backend whose package is not installed is a one-line error before any work starts.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

from loopus_core.errors import LoopusError

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # backend -> the package it needs


def check_backends(names: tuple[str, ...]) -> None:
    """A LoopusError naming the first backend whose package is not installed."""
    for name in names:
        package = PACKAGES[name]
        try:
            found = importlib.util.find_spec(package) is not None
        except (ImportError, ValueError):  # a package shadowed or removed from sys.modules
            found = False
        if not found:
            raise LoopusError(
                f"--log-to {name}: the {package} package is not installed; `pip install 'loopus[log]'` "
                f"(or `pip install {package}`), or leave {name} out of --log-to"
            )


def flatten(record: dict, prefix: str = "") -> dict[str, float]:
    """Nested dicts of numbers -> ``{"a/b/c": value}``; non-numeric and non-finite values are left out."""
    flat: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(flatten(value, name))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            flat[name] = float(value)
    return flat


class Trackers:
    """The open backends of a run: :meth:`log` sends one metrics record, :meth:`close` flushes them."""

    def __init__(self, names: tuple[str, ...], out: Path, config: dict, resumed: bool) -> None:
        check_backends(names)
        self._writers = []
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self._writers.append(("tensorboard", SummaryWriter(log_dir=str(out / "tensorboard"))))
        if "wandb" in names:
            self._writers.append(("wandb", _wandb_run(out, config, resumed)))

    def log(self, record: dict) -> None:
        """One record of ``metrics.jsonl`` (its ``kind`` and ``step`` say where it goes)."""
        step = int(record.get("step", 0))
        scalars = flatten({k: v for k, v in record.items() if k not in ("kind", "step")}, record["kind"])
        for kind, writer in self._writers:
            if kind == "tensorboard":
                for name, value in scalars.items():
                    writer.add_scalar(name, value, step)
            else:
                writer.log(scalars, step=step)

    def close(self) -> None:
        for kind, writer in self._writers:
            if kind == "tensorboard":
                writer.close()
            else:
                writer.finish()
        self._writers = []


def _wandb_run(out: Path, config: dict, resumed: bool):
    import wandb

    id_file = out / "wandb-run-id"
    run_id = id_file.read_text().strip() if resumed and id_file.is_file() else wandb.util.generate_id()
    id_file.write_text(run_id)
    return wandb.init(id=run_id, resume="allow", dir=str(out), config=config, name=out.name)

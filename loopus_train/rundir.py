"""The run directory of ``loopus finetune``: ``run.json`` (settings and command line), ``metrics.jsonl``
(one JSON record per update and per evaluation), ``checkpoints/step-N/``; and how ``--out`` and
``--resume`` relate to what is already there."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from loopus_core.errors import LoopusError
from loopus_train.config import TrainConfig
from loopus_train.state import CHECKPOINT_DIR, list_checkpoints

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"


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


def resolve_checkpoint(path: str | Path) -> Path:
    """A looped checkpoint directory, or a training run's output directory (its newest checkpoint)."""
    path = Path(path).expanduser()
    if (path / RUN_FILE).is_file() and not (path / "config.json").is_file():
        found = list_checkpoints(path)
        if not found:
            raise LoopusError(f"{path} is a training run that saved no checkpoint yet; pass a checkpoint")
        return found[-1][1]
    return path


def start_run_dir(out: Path, cfg: TrainConfig, argv: list[str], resumed_at: int | None) -> Path:
    """Create ``out``; a fresh run writes ``run.json`` and starts ``metrics.jsonl`` empty, a resumed one
    drops the records logged after its checkpoint; temporary checkpoints of a killed run are removed.
    Returns the metrics file."""
    out.mkdir(parents=True, exist_ok=True)
    metrics = out / METRICS_FILE
    if resumed_at is None:
        record = {"config": cfg.identity(), "argv": argv, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (out / RUN_FILE).write_text(json.dumps(record, indent=1))
        metrics.unlink(missing_ok=True)
    truncate_metrics(metrics, resumed_at or 0)
    root = out / CHECKPOINT_DIR
    for stale in [*root.glob(".tmp-step-*"), *root.glob(".old-step-*")]:  # left by a run that was killed
        log.info("removing %s, left by an interrupted checkpoint write", stale.name)
        shutil.rmtree(stale, ignore_errors=True)
    return metrics


def append_jsonl(path: Path, record: dict) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, step: int) -> None:
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

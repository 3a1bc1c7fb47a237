"""The run directory of ``loopus finetune``: ``run.json`` (settings and command line), ``metrics.jsonl``
(one JSON record per update and per evaluation), ``checkpoints/step-N/``; and how ``--out`` and
``--resume`` relate to what is already there."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from loopus_core.errors import LoopusError
from loopus_core.outputs import check_output, output_lock, recover_stale, write_text_atomic
from loopus_train.config import TrainConfig
from loopus_train.state import CHECKPOINT_DIR, incomplete_checkpoints, newest_checkpoint

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
_LEFT_BY_A_WRITE = re.compile(r"\.(?:tmp|old)-(step-\d+)-.+")  # which ones are ours: recover_stale


def _differences(saved: dict, current: dict) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [k for k in keys if saved.get(k) != current.get(k)]


@contextlib.contextmanager
def run_dir_lock(out: str | Path, main: bool = True) -> Iterator[None]:
    """Hold ``--out``'s lock for the whole run (on rank 0: ``main``): a second ``loopus finetune`` on the
    same run directory stops at once with a one-line error naming this one's pid. Under the lock, the
    one-line errors of an unwritable ``--out`` (a file in the way, a parent below a file, a read-only or
    special file system), before the model and the data are loaded; then what a killed checkpoint write
    left is recovered (:func:`recover_checkpoints`)."""
    if not main:
        yield
        return
    with output_lock(out, "--out") as target:
        check_output(target, "merge", "--out")
        recover_checkpoints(target)
        yield


def prepare_out_dir(cfg: TrainConfig) -> Path | None:
    """Check ``--out`` against ``--resume``; returns the checkpoint to resume from (None: a fresh run).

    ``--resume`` needs a run of the same settings with a complete checkpoint (the newest one; newer
    incomplete ones are passed over with a warning). A fresh run needs a new or empty directory, or one
    holding a run that saved no checkpoint (a run that failed before its first one is started over,
    whatever its settings were, with a warning).
    """
    out = Path(cfg.out).expanduser()
    saved = _saved_config(out)
    newest = newest_checkpoint(out)
    if newest is None:
        return _fresh_start(out, cfg, saved)
    if saved is None:
        raise LoopusError(
            f"--out {out} holds checkpoints but no {RUN_FILE} (or a damaged one); choose another --out"
        )
    diff = _differences(saved, cfg.identity())
    if diff:
        raise LoopusError(
            f"--out {out} holds another run (different {', '.join(diff)}); choose another --out"
            + ("" if cfg.resume else " or resume that run with its own settings")
        )
    if not cfg.resume:
        raise LoopusError(
            f"--out {out} holds a run with checkpoints up to {newest.name}; pass --resume to "
            "continue it or choose another --out"
        )
    return newest


def _saved_config(out: Path) -> dict | None:
    """The settings in ``out/run.json``; None when there is none or it cannot be read (half-written by a
    loopus before atomic writes)."""
    try:
        return json.loads((out / RUN_FILE).read_text())["config"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        return None


def _fresh_start(out: Path, cfg: TrainConfig, saved: dict | None) -> None:
    """A run directory without a complete checkpoint: say whether a fresh run may start in it."""
    ran = (out / RUN_FILE).exists()
    damaged = incomplete_checkpoints(out)
    if damaged:
        path, problem = damaged[-1]
        raise LoopusError(
            f"--out {out} holds only incomplete checkpoints ({path.name}: {problem}); choose another --out"
        )
    if cfg.resume:
        if not ran:
            raise LoopusError(f"--resume: {out} holds no training run to resume; start without --resume")
        raise LoopusError(
            f"--resume: the run in {out} saved no checkpoint yet; start it again without --resume"
        )
    if ran:
        diff = _differences(saved, cfg.identity()) if saved is not None else []
        log.warning(
            "--out %s holds a run that saved no checkpoint%s; starting it over",
            out,
            f" (with other {', '.join(diff)})" if diff else "",
        )
    elif out.is_dir() and any(out.iterdir()):
        raise LoopusError(
            f"--out {out} is not empty and holds no loopus run; choose a new or empty directory"
        )
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A looped checkpoint directory, or a training run's output directory (its newest complete
    checkpoint)."""
    path = Path(path).expanduser()
    if (path / RUN_FILE).is_file() and not (path / "config.json").is_file():
        newest = newest_checkpoint(path)
        if newest is None:
            raise LoopusError(f"{path} is a training run that saved no checkpoint yet; pass a checkpoint")
        return newest
    return path


def start_run_dir(out: Path, cfg: TrainConfig, argv: list[str], resumed_at: int | None) -> Path:
    """Create ``out``; a fresh run writes ``run.json`` and starts ``metrics.jsonl`` empty, a resumed one
    drops the records logged after its checkpoint. Returns the metrics file."""
    out.mkdir(parents=True, exist_ok=True)
    metrics = out / METRICS_FILE
    if resumed_at is None:
        record = {"config": cfg.identity(), "argv": argv, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        write_text_atomic(out / RUN_FILE, json.dumps(record, indent=1), "--out")
        metrics.unlink(missing_ok=True)
    truncate_metrics(metrics, resumed_at or 0)
    return metrics


def recover_checkpoints(out: Path) -> None:
    """Put back or remove what a killed checkpoint write left in ``out/checkpoints`` (call it holding the
    run's lock, before a checkpoint is chosen): a checkpoint moved aside by an interrupted replace is
    restored (:func:`loopus_core.outputs.recover_stale`); temporary directories and lock files go."""
    root = out / CHECKPOINT_DIR
    if not root.is_dir():
        return
    names = {m.group(1) for p in root.iterdir() if (m := _LEFT_BY_A_WRITE.fullmatch(p.name))}
    for name in sorted(names):
        recover_stale(root / name)
    for stale in [*root.glob(".tmp-step-*"), *root.glob(".lock-step-*")]:  # older names; stale locks
        log.info("removing %s, left by an interrupted checkpoint write", stale.name)
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def append_jsonl(path: Path, record: dict) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records after ``step`` (steps a crashed run logged after its last checkpoint are redone), and
    lines that are not a JSON record (a half-written last line: a kill or a full disk during a write),
    with a warning."""
    if not path.is_file():
        return
    kept, damaged = [], []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        try:
            record = json.loads(line) if line.strip() else {}
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            damaged.append(number)
        elif record and record.get("step", 0) <= step:
            kept.append(line)
    if damaged:
        log.warning("%s: dropping line(s) %s, which are not JSON records", path, ", ".join(map(str, damaged)))
    write_text_atomic(path, "".join(line + "\n" for line in kept), "--out")

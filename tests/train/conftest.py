"""Fixtures of the trainer tests: converted tiny and default checkpoints, training text, run helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.tiny_models import write_text_files

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session", autouse=True)
def _data_cache(tmp_path_factory):
    """Token shards of this session in a cache of its own (also for the runs in subprocesses)."""
    before = os.environ.get("LOOPUS_DATA_CACHE")
    os.environ["LOOPUS_DATA_CACHE"] = str(tmp_path_factory.mktemp("data-cache"))
    yield
    if before is None:
        os.environ.pop("LOOPUS_DATA_CACHE", None)
    else:
        os.environ["LOOPUS_DATA_CACHE"] = before


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: the suite shares two cores, and numbers must match the subprocess runs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def looped_tiny(tiny_llama_dir, tmp_path_factory) -> Path:
    """The tiny Llama converted at 2:6 (encoder 2 layers, loop block 4, decoder 2)."""
    from loopus_convert import convert_model

    out = tmp_path_factory.mktemp("looped") / "tiny-2-6"
    convert_model(str(tiny_llama_dir), out, split="2:6")
    return out


@pytest.fixture(scope="session")
def train_text(tmp_path_factory) -> Path:
    """A folder with a .txt and a .jsonl file (a few thousand tokens of the tiny tokenizer)."""
    return write_text_files(tmp_path_factory.mktemp("text") / "data")


def tiny_args(ckpt: Path, data: Path, out: Path, **over) -> list[str]:
    """Command-line arguments of a short tiny-model run; ``over`` replaces or adds flags (``lr=1e-3``)."""
    flags = {
        "block-size": 32,
        "batch-size": 4,
        "steps": 8,
        "loop-steps": 4,
        "supervised": 2,
        "lr": 1e-3,
        "warmup": 2,
        "save-every": 2,
        "eval-every": 100,
        "eval-loops": "1,4",
        "eval-thresholds": "0.9",
        "eval-blocks": 2,
        "keep": 3,
        "device": "cpu",
    }
    flags.update({k.replace("_", "-"): v for k, v in over.items()})
    args = ["finetune", str(ckpt), "--data", str(data), "--out", str(out)]
    for key, value in flags.items():
        if value is True:
            args.append(f"--{key}")
        elif value is not None and value is not False:
            args += [f"--{key}", str(value)]
    return args


def run_subprocess(
    args: list[str],
    env_extra: dict | None = None,
    torchrun: int = 0,
    timeout: float = 300,
    driver: list[str] | None = None,
) -> subprocess.CompletedProcess:
    """Run ``loopus ARGS`` (or ``torchrun --nproc-per-node N -m loopus ARGS``) in a fresh process.

    ``LOOPUS_TEST_KILL=POINT:N`` in ``env_extra`` runs it through :mod:`tests.train.kill_driver`, which
    SIGKILLs the process at that point of checkpoint N; ``driver`` (a script and its first arguments) runs
    it through another such seam.
    """
    env_extra = dict(env_extra or {})
    kill = env_extra.pop("LOOPUS_TEST_KILL", None)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        **(env_extra or {}),
    }
    if kill:
        driver = [str(REPO / "tests" / "train" / "kill_driver.py"), kill]
    program = driver or ["-m", "loopus"]
    if torchrun:
        launcher = ["-m", "torch.distributed.run", "--nproc-per-node", str(torchrun), "--standalone"]
        cmd = [sys.executable, *launcher, *program, *args]
    else:
        cmd = [sys.executable, *program, *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def read_metrics(out: Path, kind: str = "train") -> list[dict]:
    """The records of one kind in ``out/metrics.jsonl``."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]

"""Time and disk of the README's first run, end to end, on the embedded default model: the commands of the
README section "A first run, end to end", read from README.md itself (one copy), run in order in a scratch
directory with ``python -m loopus`` for ``loopus``.

Records per command: wall seconds, peak resident memory (``/usr/bin/time -v``), the exit status, the load
average before it (the machine is shared: a figure from a loaded machine says so), and the disk used by what
the run wrote (the converted checkpoint, the training run). ``--analyze-runs N`` runs the first command (the
default analysis, also `make demo`'s) N times and records each, for the "three idle runs" a time claim
needs. Run::

    HF_HUB_OFFLINE=1 python benchmarks/first_run.py --json benchmarks/results/first_run.json

The scratch directory is deleted afterwards unless ``--keep DIR`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTION = "## A first run, end to end"


def readme_commands(readme: Path = REPO / "README.md") -> list[list[str]]:
    """The first bash block of the README's first-run section, one command per line, comments dropped."""
    text = readme.read_text(encoding="utf-8")
    section = text[text.index(SECTION):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands = [shlex.split(line.split("#")[0]) for line in block.splitlines() if line.split("#")[0].strip()]
    assert all(c[0] == "loopus" for c in commands), commands
    return commands


def _time_v(stderr: str, key: str) -> str:
    match = re.search(rf"^\s*{re.escape(key)}: (.*)$", stderr, re.M)
    return match.group(1).strip() if match else ""


def run_one(command: list[str], cwd: Path) -> dict:
    """Run ``command`` (``loopus ...``) under ``/usr/bin/time -v``; wall, peak RSS, status, load before."""
    argv = ["/usr/bin/time", "-v", sys.executable, "-m", "loopus", *command[1:]]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    env = os.environ | {"PYTHONPATH": str(REPO)}
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    peak_kb = _time_v(done.stderr, "Maximum resident set size (kbytes)")
    return {"command": shlex.join(command), "returncode": done.returncode, "wall_s": round(wall, 1),
            "peak_rss_mb": round(int(peak_kb) / 1024, 1) if peak_kb else None, "load_before": round(load, 2),
            "stdout_tail": done.stdout[-600:],
            "stderr_tail": done.stderr.split("\tCommand being timed")[0][-600:]}


VECTOR_FLAGS = {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}  # what decides the CPU's matmul speed
MATMUL_SHAPE = (4096, 576, 1536)  # a stacked forward's MLP matmul on the embedded model (tokens, D, inner)


def machine() -> dict:
    """The machine the times come from: CPU model and vector extensions, cores, torch's threads, and a
    float32 matmul rate of the map's typical shape (best of 5; times from machines of different rates are
    not comparable)."""
    import torch

    info = Path("/proc/cpuinfo").read_text(encoding="utf-8") if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*: (.*)$", info, re.M)
    flags = re.search(r"^flags\s*: (.*)$", info, re.M)
    vector = sorted(set(flags.group(1).split()) & VECTOR_FLAGS) if flags else []
    tokens, width, inner = MATMUL_SHAPE
    a, b = torch.randn(tokens, width), torch.randn(width, inner)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        best = min(best, (time.perf_counter() - start) / 10)
    return {"cpu": model.group(1) if model else platform.processor(), "cpus": os.cpu_count(),
            "vector": vector,
            "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "python": platform.python_version(),
            "matmul_gflops": round(2 * tokens * width * inner / best / 1e9, 1)}


def disk_mb(path: Path) -> float | None:
    """Bytes under ``path`` in MB (None when absent)."""
    if not path.exists():
        return None
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=None, help="write the record here")
    parser.add_argument("--analyze-runs", type=int, default=1, help="run the first command this many times")
    parser.add_argument("--keep", type=Path, default=None, help="work in this directory and keep it")
    args = parser.parse_args()
    commands = readme_commands()
    work = args.keep or Path(tempfile.mkdtemp(prefix="loopus-first-run-"))
    work.mkdir(parents=True, exist_ok=True)
    steps = []
    try:
        for i, command in enumerate(commands):
            for _ in range(args.analyze_runs if i == 0 else 1):
                steps.append(run_one(command, work))
                print(f"{steps[-1]['wall_s']:8.1f} s  rc {steps[-1]['returncode']}  {steps[-1]['command']}",
                      flush=True)
                if steps[-1]["returncode"] != 0:
                    raise SystemExit(steps[-1]["stderr_tail"])
        disk = {name: disk_mb(work / name) for name in ("looped/smollm", "runs/smollm")}
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    record = {"command": "python benchmarks/first_run.py " + " ".join(sys.argv[1:]),
              "date": time.strftime("%F %T"),
              "machine": machine(),
              "steps": steps, "disk_mb": disk,
              "first_run_wall_s": round(sum(s["wall_s"] for s in steps[args.analyze_runs - 1:]), 1)}
    print(json.dumps({k: v for k, v in record.items() if k != "steps"}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()

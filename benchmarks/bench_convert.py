"""Convert cost vs a plain transformers load + save_pretrained of the base model (embedded default model).

Each measurement runs in a fresh subprocess; peak memory = ru_maxrss at the end minus ru_maxrss after the
imports (so the libraries do not count), wall time = the work alone. Reports ratios over the weight size and
over the reference. Run: HF_HUB_OFFLINE=1 python3 benchmarks/bench_convert.py [--repeats 3] [--split 4:26]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time, shutil, tempfile
from pathlib import Path
import torch
import transformers
from transformers import AutoModelForCausalLM
import loopus_convert
from loopus_convert import convert_model
torch.set_num_threads(1)
mode, model_dir, split, out_root = sys.argv[1:5]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = Path(tempfile.mkdtemp(dir=out_root)) / "out"
start = time.perf_counter()
if mode == "ours":
    convert_model(model_dir, out, split=split)
else:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.save_pretrained(out)
wall = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
shutil.rmtree(out.parent)
print(json.dumps({"wall_s": wall, "peak_kib": peak - base}))
"""


def run(mode: str, model_dir: Path, split: str, out_root: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(model_dir), split, out_root],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--split", default="4:26")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from loopus_core.models import default_model_dir

    model_dir = default_model_dir()
    weights = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    results: dict[str, list[dict]] = {"ours": [], "reference": []}
    with tempfile.TemporaryDirectory() as out_root:
        for _ in range(args.repeats):  # interleaved, so background load hits both alike
            for mode in results:
                results[mode].append(run(mode, model_dir, args.split, out_root))
    summary = {}
    for mode, runs in results.items():
        summary[mode] = {
            "wall_s": statistics.median(r["wall_s"] for r in runs),
            "peak_over_weights": statistics.median(r["peak_kib"] * 1024 / weights for r in runs),
        }
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch threads 1")
    print(
        f"model: {model_dir.name}, weights {weights / 2**20:.0f} MiB, split {args.split}, "
        f"median of {args.repeats} interleaved runs"
    )
    for mode, row in summary.items():
        print(
            f"{mode:>9}: wall {row['wall_s']:.2f} s, peak memory / weight size {row['peak_over_weights']:.2f}"
        )
    print(
        "convert wall / (load + save_pretrained) wall: "
        f"{summary['ours']['wall_s'] / summary['reference']['wall_s']:.2f}"
        " (target <= 1.5)"
    )
    print(f"convert peak / weight size: {summary['ours']['peak_over_weights']:.2f} (target <= 1.6)")


if __name__ == "__main__":
    main()

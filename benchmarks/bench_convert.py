"""Convert cost vs a plain transformers load + save_pretrained of the base model (embedded default model),
and optionally vs the conversion of an earlier checkout of this repository, side by side.

Each measurement runs in a fresh subprocess; peak memory = ru_maxrss at the end minus ru_maxrss after the
imports (so the libraries do not count), wall time = the work alone. Reports ratios over the weight size and
over the reference. Run: HF_HUB_OFFLINE=1 python3 benchmarks/bench_convert.py [--repeats 3] [--split 4:26]
[--previous DIR] [--json FILE]; ``--previous DIR`` is a checkout of an earlier commit (e.g. ``git worktree add
/tmp/old 4c2a688^``, the design before issue 22) whose ``convert_model`` runs as a third mode. The machine's
load average is recorded before and after (a loaded machine slows every mode; the ratios are interleaved).
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
if mode in ("ours", "previous"):
    convert_model(model_dir, out, split=split)
else:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.save_pretrained(out)
wall = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
shutil.rmtree(out.parent)
print(json.dumps({"wall_s": wall, "peak_kib": peak - base}))
"""


ROOT = Path(__file__).resolve().parents[1]


def run(mode: str, model_dir: Path, split: str, out_root: str, previous: Path | None = None) -> dict:
    code = previous if mode == "previous" else ROOT
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"}
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
    parser.add_argument("--previous", type=Path, help="a checkout of an earlier commit, run as a third mode")
    parser.add_argument("--json", type=Path, help="write the settings, runs and ratios here")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from loopus_core.models import default_model_dir

    model_dir = default_model_dir()
    weights = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    modes = ["ours", "reference"] + (["previous"] if args.previous else [])
    results: dict[str, list[dict]] = {mode: [] for mode in modes}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as out_root:
        for _ in range(args.repeats):  # interleaved, so background load hits every mode alike
            for mode in results:
                results[mode].append(run(mode, model_dir, args.split, out_root, args.previous))
    load_after = os.getloadavg()
    summary = {
        mode: {
            "wall_s": statistics.median(r["wall_s"] for r in runs),
            "peak_over_weights": statistics.median(r["peak_kib"] * 1024 / weights for r in runs),
        }
        for mode, runs in results.items()
    }
    ratios = {
        "convert_wall_over_reference": summary["ours"]["wall_s"] / summary["reference"]["wall_s"],
        "convert_peak_over_weights": summary["ours"]["peak_over_weights"],
    }
    if args.previous:
        previous = summary["previous"]["wall_s"]
        ratios["convert_wall_over_previous"] = summary["ours"]["wall_s"] / previous
        ratios["previous_wall_over_reference"] = previous / summary["reference"]["wall_s"]
        ratios["previous_peak_over_weights"] = summary["previous"]["peak_over_weights"]
    _report(args, model_dir, weights, summary, ratios)
    if args.json:
        record = {
            "settings": {"repeats": args.repeats, "split": args.split, "threads": 1,
                         "previous": str(args.previous) if args.previous else None},
            "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                        "load_average_before": load_before, "load_average_after": load_after,
                        "loaded": max(load_before[0], load_after[0]) > 3},
            "model": {"name": model_dir.name, "weights_bytes": weights},
            "runs": results,
            "median": summary,
            "ratios": ratios,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1) + "\n")


def _report(args, model_dir: Path, weights: int, summary: dict, ratios: dict) -> None:
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch threads 1")
    print(
        f"model: {model_dir.name}, weights {weights / 2**20:.0f} MiB, split {args.split}, "
        f"median of {args.repeats} interleaved runs"
    )
    for mode, row in summary.items():
        print(
            f"{mode:>9}: wall {row['wall_s']:.2f} s, peak memory / weight size {row['peak_over_weights']:.2f}"
        )
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}")


if __name__ == "__main__":
    main()

"""lm-evaluation-harness on a looped checkpoint: the saving of one load, and the time at K loops.

Model: the embedded default SmolLM2-135M-Instruct, converted with the identity gate at ``--split``; tasks:
the shipped offline ``loopus_mc`` (loglikelihood) and ``loopus_gen`` (generation).

1. Wall time of one ``loopus eval CKPT --tasks ... --loops 1,2,4,8`` process against four separate
   ``lm_eval --model hf --model_args pretrained=CKPT,trust_remote_code=True,num_loops=K`` processes (each
   pays the start-up, the imports, the task set-up and the model load again), and whether their numbers agree.
2. In one process, the harness's time per task at K loops over the base model's time on the same task
   (``loopus eval --base``: the plain ``--model hf`` wrapper on the base model), next to the layer-count
   prediction (A + K (B - A) + L - B) / L; fastest of ``--repeats`` rounds.

Run: HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python3 benchmarks/bench_harness.py
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TASKS = "loopus_mc,loopus_gen"


def _run(command: list[str], env: dict) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return seconds


def _lm_eval_numbers(out: Path) -> dict:
    saved = json.loads(sorted(out.rglob("results_*.json"))[-1].read_text())
    return {
        t: {k: v for k, v in e.items() if isinstance(v, (int, float))} for t, e in saved["results"].items()
    }


def _best_of(repeats: int, commands: list[list[str]], env: dict) -> list[float]:
    """The fastest wall time of each command over ``repeats`` rounds (forward, then backward order)."""
    best = [float("inf")] * len(commands)
    for round_index in range(repeats):
        order = range(len(commands)) if round_index % 2 == 0 else reversed(range(len(commands)))
        for i in order:
            best[i] = min(best[i], _run(commands[i], env))
    return best


def part_one(
    ckpt: Path, loops: list[int], limit: int, batch: int, repeats: int, tmp: Path, env: dict
) -> None:
    """One `loopus eval --tasks` process against one `lm_eval` process per loop count."""
    from loopus_convert.harness import LOCAL_TASKS

    out = tmp / "sweep.json"
    sweep = [
        sys.executable, "-m", "loopus", "eval", str(ckpt), "--tasks", TASKS, "--loops",
        ",".join(map(str, loops)), "--limit", str(limit), "--batch-size", str(batch), "--device", "cpu",
        "--json", str(out),
    ]  # fmt: skip
    commands = [sweep] + [
        [
            sys.executable,
            "-m",
            "lm_eval",
            "--model",
            "hf",
            "--model_args",
            f"pretrained={ckpt},trust_remote_code=True,num_loops={k}",
            "--include_path",
            str(LOCAL_TASKS),
            "--tasks",
            TASKS,
            "--limit",
            str(limit),
            "--batch_size",
            str(batch),
            "--device",
            "cpu",
            "--output_path",
            str(tmp / f"lm-eval-{k}"),
        ]  # fmt: skip
        for k in loops
    ]
    ours, *separate = _best_of(repeats, commands, env)
    rows = json.loads(out.read_text())["rows"]
    inside = sum(entry["seconds"] for row in rows for entry in row["tasks"].values())
    agree = True
    for k, row in zip(loops, rows, strict=True):
        numbers = _lm_eval_numbers(tmp / f"lm-eval-{k}")
        for task, entry in row["tasks"].items():
            agree &= all(abs(entry["metrics"][task][m] - v) <= 1e-9 for m, v in numbers[task].items())
    print(f"1. loop counts {loops}, {limit} documents per task, batch {batch}, fastest of {repeats} round(s)")
    print("| | wall time |\n|---|---|")
    print(
        f"| `loopus eval --tasks` (one process, one load; {inside:.1f} s in simple_evaluate) | {ours:.1f} s |"
    )
    for k, seconds in zip(loops, separate, strict=True):
        print(f"| `lm_eval ... num_loops={k}` | {seconds:.1f} s |")
    print(f"| {len(loops)} `lm_eval` processes | {sum(separate):.1f} s |")
    print(f"ratio separate / one load: {sum(separate) / ours:.2f}; same numbers: {agree}")


def part_two(ckpt: Path, base: Path, split, loops: list[int], limit: int, batch: int, repeats: int) -> None:
    """The harness's time per task at K loops over the base model's, against the layer-count prediction.

    Both models stay loaded; every round runs the base model and each K on each task, in alternating order
    (forward, then backward), after one untimed warm-up round; the fastest round counts."""
    from loopus_convert.checkpoint import load_with_tokenizer
    from loopus_convert.harness import LoopSetting, RunOptions, applied, load_tasks, run_unit, wrap_model
    from loopus_core.models import open_model

    options = RunOptions(limit=limit, batch_size=batch, device="cpu")
    units = load_tasks(TASKS)
    opened = open_model(str(base), device="cpu")
    layer_params = sum(p.numel() for p in opened.model.model.layers[0].parameters())
    head_params = opened.model.lm_head.weight.numel()
    looped = wrap_model(*load_with_tokenizer(ckpt, "cpu"), options)
    rows = [("base", wrap_model(opened.model, opened.tokenizer, options), None)]
    rows += [(str(k), looped, LoopSetting(f"{k} loops", k)) for k in loops]
    best: dict[tuple[str, str, str], float] = {}
    for round_index in range(repeats + 1):
        for key, lm, setting in rows if round_index % 2 == 0 else rows[::-1]:
            with applied(lm.model.config, setting) if setting else contextlib.nullcontext():
                for unit in units:
                    entry = run_unit(lm, unit, options)
                    for what in ("seconds", "forward_seconds"):
                        if round_index > 0:  # round 0 warms up
                            best[key, unit.name, what] = min(
                                best.get((key, unit.name, what), 1e9), entry[what]
                            )
    tasks = [u.name for u in units]
    base_times = ", ".join(
        f"{t} {best['base', t, 'seconds']:.2f} s ({best['base', t, 'forward_seconds']:.2f} s in forward)"
        for t in tasks
    )
    print(
        f"2. harness time at K loops / base model, {limit} documents per task, batch {batch}, fastest of "
        f"{repeats} interleaved rounds after a warm-up; base model: {base_times}"
    )
    header = " | ".join(f"{t} K/base (all) | {t} K/base (forward)" for t in tasks)
    print(f"| K | predicted (A+K(B-A)+L-B)/L | same + lm_head cost | {header} |")
    print("|---|---|---|" + "---|---|" * len(tasks))
    for k in loops:
        ratios = " | ".join(
            f"{best[str(k), t, what] / best['base', t, what]:.2f}"
            for t in tasks
            for what in ("seconds", "forward_seconds")
        )
        with_head = (split.layers_at(k) * layer_params + head_params) / (
            split.num_layers * layer_params + head_params
        )
        print(f"| {k} | {split.layers_at(k) / split.num_layers:.2f} | {with_head:.2f} | {ratios} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=("1", "2", "all"), default="all")
    parser.add_argument("--split", default="11:21")
    parser.add_argument("--loops", default="1,2,4,8")
    parser.add_argument("--limit", type=int, default=24)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": str(args.threads),
        "PYTHONPATH": str(ROOT),
    }
    from loopus_convert import convert_model
    from loopus_core.models import default_model_dir

    base = default_model_dir()
    loops = [int(k) for k in args.loops.split(",")]
    import lm_eval
    import transformers

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}; torch "
        f"{torch.__version__} ({args.threads} thread(s)), transformers {transformers.__version__}, lm-eval "
        f"{lm_eval.__version__}; model {base.name}, split {args.split}, tasks {TASKS}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        converted = convert_model(str(base), Path(tmp) / "looped", split=args.split)
        ckpt, split = converted.out, converted.split
        if args.part in ("1", "all"):
            part_one(ckpt, loops, args.limit, args.batch, args.repeats, Path(tmp), env)
        if args.part in ("2", "all"):
            part_two(ckpt, base, split, loops, args.limit, args.batch, args.repeats)


if __name__ == "__main__":
    main()

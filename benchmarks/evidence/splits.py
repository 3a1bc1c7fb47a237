"""``python -m benchmarks.evidence.splits [--quick] [--shard I/N]``: does the analysis pick the best split?

Issue 25 item 4. One ``loopus analyze`` of the model (default settings) gives every split's zero-shot repeat
cost. Before any training, a plan of splits is drawn from it and frozen in ``plan.json``: the analysis' pick,
the cheapest block of two other lengths (half the pick's length and half-way to the longest block), the
paper-style ``2:L-1``, each similarity view's pick, and seeded random splits until ``num_splits`` distinct
splits. Each split is converted with ``loopus convert`` (default gate), fine-tuned with ``loopus finetune``
under one recipe per seed, and evaluated with ``loopus eval`` (held-out perplexity at K = 1, 2, 4 on the run's
own held-out documents). The commands are the CLI itself, called in this process (``app(args=...)``), and
each command line is recorded. ``splitstats`` turns the runs into Spearman correlations with bootstrap
intervals over splits.

Resumable: every run writes into ``WORK/<A>-<B>-s<seed>/``; a run with ``eval.json`` is skipped, a killed
fine-tune continues with ``--resume`` from its newest checkpoint (one every ``save_every`` updates). The
training checkpoints are deleted once the evaluation is written (1.6 GB each); ``metrics.jsonl`` and
``run.json`` stay. Runs go seed by seed (every split at the first seed, then the second), one at a time;
``--shard I/N`` trains every N-th split of the plan in one of N parallel processes, and a last
``--report-only`` run writes the summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

log = logging.getLogger("benchmarks.evidence.splits")

RESULTS = Path(__file__).parent / "results"
WORK = Path("benchmarks/out/evidence/splits")


@dataclass(frozen=True)
class SplitStudy:
    """The model, the plan's size, the training recipe and the evaluation (one copy of each value)."""

    model: str | None = None  # None: the embedded default model
    analyze_args: tuple[str, ...] = ()  # extra ``loopus analyze`` options (none: its defaults)
    num_splits: int = 8
    plan_seed: int = 0  # the random splits
    seeds: tuple[int, ...] = (0, 1)
    steps: int = 100
    block_size: int = 64
    batch_size: int = 2
    loop_steps: int = 4
    supervised: int = 2
    lr: float = 1e-4
    save_every: int = 10
    eval_loops: tuple[int, ...] = (1, 2, 4)
    eval_max_blocks: int = 64
    extra_train_args: tuple[str, ...] = field(default=())


QUICK = SplitStudy(
    analyze_args=("--tokens", "1016", "--no-probes"),
    num_splits=3,
    steps=2,
    block_size=32,
    save_every=1,
    eval_max_blocks=4,
)


def loopus(args: list[str]) -> None:
    """Run one ``loopus`` command line in this process; raise when it exits non-zero."""
    import loopus.cli  # noqa: F401  (registers the commands)
    from loopus.app import app

    log.info("loopus %s", " ".join(args))
    code = app(args=args, standalone_mode=False, prog_name="loopus")
    if code not in (None, 0):
        raise RuntimeError(f"loopus {' '.join(args)} exited with {code}")


def model_args(s: SplitStudy) -> list[str]:
    """The MODEL argument of analyze / convert (nothing: the embedded model)."""
    return [s.model] if s.model else []


def analysis(s: SplitStudy, work: Path) -> tuple[dict, list[str], float | None]:
    """``loopus analyze`` into ``work/analysis`` (reused when there): its JSON, command and wall s."""
    out = work / "analysis"
    command = ["analyze", *model_args(s), "--out", str(out), *s.analyze_args]
    wall = None
    if not (out / "analysis.json").exists():
        t0 = time.time()
        loopus(command)
        wall = round(time.time() - t0, 1)
    return json.loads((out / "analysis.json").read_text()), command, wall


def valid_splits(record: dict) -> list[str]:
    """Every split the repeat-cost map holds, as ``A:B``."""
    grid = record["repeat_map"]["repeat"]["delta_nll"]
    return [f"{a}:{b}" for a, row in enumerate(grid) for b, v in enumerate(row) if v is not None]


def cheapest_of_length(record: dict, length: int) -> str:
    """The block of ``length`` layers with the lowest repeat cost on the selection text."""
    grid = record["repeat_map"]["repeat"]["delta_nll"]
    cands = [(v, f"{a}:{b}") for a, row in enumerate(grid) for b, v in enumerate(row)
             if v is not None and b - a == length]
    return min(cands)[1]


def make_plan(record: dict, s: SplitStudy) -> list[dict]:
    """The splits to train, each with why it is there (see the module docstring); fixed before training."""
    layers = int(record["model"]["num_layers"])
    start, end = (int(x) for x in record["split"].split(":"))
    length, longest = end - start, layers - 2
    named = [(record["split"], "analysis pick")]
    for other in (max(2, length // 2), (length + longest + 1) // 2):
        if other != length:
            named.append((cheapest_of_length(record, other), f"cheapest {other}-layer block"))
    named.append((f"2:{layers - 1}", "paper-style 2:L-1"))
    for view, info in sorted(record["similarity"]["views"].items()):
        named.append((info["best"], f"similarity pick ({view} CKA)"))
    plan: dict[str, list[str]] = {}
    for split, why in named:
        plan.setdefault(split, []).append(why)
    pool = sorted(set(valid_splits(record)) - set(plan))
    rng = random.Random(s.plan_seed)
    rng.shuffle(pool)
    while len(plan) < s.num_splits and pool:
        plan[pool.pop()] = [f"random (seed {s.plan_seed})"]
    return [{"split": k, "why": v} for k, v in plan.items()]


def frozen_plan(record: dict, s: SplitStudy, work: Path) -> list[dict]:
    """The plan written at the first launch (``work/plan.json``), reused by every later one."""
    path = work / "plan.json"
    if path.exists():
        return json.loads(path.read_text())["splits"]
    plan = make_plan(record, s)
    path.write_text(json.dumps({"splits": plan, "written": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                      time.gmtime())}, indent=1))
    return plan


def run_dir(work: Path, split: str, seed: int) -> Path:
    return work / f"{split.replace(':', '-')}-s{seed}"


def train_args(s: SplitStudy, conv: Path, out: Path, seed: int) -> list[str]:
    """The ``loopus finetune`` command line of one run (the one recipe; only the checkpoint and seed vary)."""
    return [
        "finetune", str(conv), "--out", str(out), "--steps", str(s.steps), "--block-size", str(s.block_size),
        "--batch-size", str(s.batch_size), "--loop-steps", str(s.loop_steps), "--supervised",
        str(s.supervised), "--lr", str(s.lr), "--seed", str(seed), "--save-every", str(s.save_every),
        "--keep", "1", "--eval-every", str(s.steps), "--eval-blocks", "4", "--eval-loops", "1",
        "--device", "cpu", "--precision", "fp32", "--data-workers", "1", *s.extra_train_args,
    ]


def finished_steps(train_out: Path) -> int:
    """The newest complete checkpoint's step of a run directory (0: none)."""
    from loopus_train.state import newest_checkpoint

    newest = newest_checkpoint(train_out) if train_out.is_dir() else None
    return int(newest.name.split("-")[-1]) if newest is not None else 0


def convert(s: SplitStudy, split: str, work: Path) -> tuple[Path, list[str]]:
    """``loopus convert`` at ``split`` with the default gate (reused when complete)."""
    conv = work / "converted" / split.replace(":", "-")
    command = ["convert", *model_args(s), "--split", split, "--out", str(conv), "--force"]
    if not (conv / "DONE").exists():
        loopus(command)
        (conv / "DONE").write_text("")
    return conv, command


def one_run(s: SplitStudy, split: str, seed: int, work: Path) -> dict:
    """Convert, fine-tune (or resume) and evaluate one (split, seed); skipped once recorded."""
    rdir = run_dir(work, split, seed)
    done = rdir / "run_record.json"
    if done.exists():
        return json.loads(done.read_text())
    rdir.mkdir(parents=True, exist_ok=True)
    conv, convert_cmd = convert(s, split, work)
    train_out = rdir / "train"
    command = train_args(s, conv, train_out, seed)
    t0 = time.time()
    steps_before = finished_steps(train_out)
    if steps_before < s.steps:
        loopus(command + (["--resume"] if steps_before else []))
    train_wall = round(time.time() - t0, 1)
    eval_cmd = ["eval", str(train_out), "--loops", ",".join(map(str, s.eval_loops)), "--exit-threshold", "",
                "--max-blocks", str(s.eval_max_blocks), "--device", "cpu", "--precision", "fp32",
                "--json", str(rdir / "eval.json")]
    t0 = time.time()
    loopus(eval_cmd)
    result = json.loads((rdir / "eval.json").read_text())
    record = {
        "split": split, "seed": seed,
        "ppl": {str(k): result["loops"][str(k)]["ppl"] for k in s.eval_loops},
        "loss": {str(k): result["loops"][str(k)]["loss"] for k in s.eval_loops},
        "eval_tokens": result.get("tokens"), "train_wall_s": train_wall, "resumed_at": steps_before,
        "eval_wall_s": round(time.time() - t0, 1), "load_avg": os.getloadavg(),
        "commands": {"convert": convert_cmd, "finetune": command, "eval": eval_cmd},
    }
    done.write_text(json.dumps(record, indent=1))
    for ckpt in train_out.glob("checkpoints/step-*"):  # 1.6 GB each; the numbers are recorded
        shutil.rmtree(ckpt)
    return record


def provenance(record: dict) -> dict:
    """What the analysis was run with and how long each step took (from its own ``provenance``)."""
    keys = ("model_fingerprint", "seed", "tokens_used", "selection_tokens", "report_tokens",
            "map_tokens_requested", "probes", "repeat_budget", "date", "wall_time_s")
    return {k: record.get("provenance", {}).get(k) for k in keys}


def code_commit() -> str | None:
    """The commit of the code that runs (None outside a git checkout); uncommitted edits are not seen."""
    import subprocess

    try:
        found = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                               cwd=Path(__file__).parent, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return found.stdout.strip()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny budgets (3 splits, 2 updates): no claim")
    ap.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--work", type=Path, default=None, help=f"runs and the analysis (default {WORK})")
    ap.add_argument("--out", type=Path, default=None, help="splits.json and splits.png (default: results/)")
    ap.add_argument("--report-only", action="store_true", help="summarise the finished runs, train nothing")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--shard", type=shard, default=None, metavar="I/N",
                    help="train only the splits whose place in the plan is I modulo N (both seeds of a split "
                         "in one shard, so parallel shards never convert the same split); writes no summary: "
                         "a last --report-only run does")
    args = ap.parse_args(argv)
    if args.shard and args.report_only:
        ap.error("--shard trains a share of the runs; --report-only summarises them all: pick one")
    return args


def shard(text: str) -> tuple[int, int]:
    """``I/N`` as ``(I, N)`` with ``0 <= I < N``."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not I/N (e.g. 0/2)") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"{text!r}: I must be in 0..N-1")
    return i, n


def study_for(args: argparse.Namespace) -> tuple[SplitStudy, Path, Path]:
    """The settings and the work / output folders of parsed ``args``."""
    s = replace(QUICK if args.quick else SplitStudy(), model=args.model)
    work = args.work or (WORK.parent / "splits-quick" if args.quick else WORK)
    out = args.out or (work / "results" if args.quick else RESULTS)
    return s, work, out


def main(argv: list[str] | None = None) -> int:
    """Analyse, plan, train every (split, seed) not yet done, and write ``splits.json`` + ``splits.png``."""
    import torch

    from benchmarks.evidence import splitstats

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    s, work, out = study_for(args)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    record, analyze_cmd, analyze_wall = analysis(s, work)
    plan = frozen_plan(record, s, work)
    meta = {"settings": asdict(s), "analyze_command": ["loopus", *analyze_cmd],
            "analyze_wall_s": analyze_wall, "analysis_provenance": provenance(record), "plan": plan,
            "command": " ".join(["python -m benchmarks.evidence.splits", *(argv or sys.argv[1:])]),
            "code_commit": code_commit()}
    runs = []

    def save(with_plot: bool) -> None:
        result = splitstats.summarise(record, plan, runs, s)
        (out / "splits.json").write_text(json.dumps({**meta, **result}, indent=1), encoding="utf-8")
        if with_plot:
            splitstats.plot(result, out / "splits.png")

    i, n = args.shard or (0, 1)
    mine = plan[i::n]  # a shard's splits; both seeds of each
    for seed in s.seeds:
        for item in mine:
            done = (run_dir(work, item["split"], seed) / "run_record.json").exists()
            if done or not args.report_only:
                runs.append(one_run(s, item["split"], seed, work))
                if not args.report_only and not args.shard:
                    save(with_plot=False)  # after every run: a killed study leaves its partial JSON
    if not args.shard:
        save(with_plot=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

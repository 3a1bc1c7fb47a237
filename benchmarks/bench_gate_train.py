"""Gate benchmark, part 2: the issue-15 fine-tuning recipe with each gate init, side by side.

For every run: ``loopus convert`` the embedded default model (SmolLM2-135M-Instruct) at ``--split`` with the
run's gate init, then ``loopus finetune`` it with the recipe of issue 15 (300 updates, block 64, batch 2,
4 loop steps of which 2 supervised, lr 1e-4, built-in corpus), evaluating held-out perplexity at K = 1, 2, 4.
The run ``plain`` is a one-loop fine-tune of the same tokens (``--loop-steps 1 --supervised 1``) from the
identity conversion. Runs go one after another; a run whose final checkpoint exists is skipped, an unfinished
one starts again. ``--report`` tabulates the finished runs: held-out perplexity at K = 1, 2, 4 and the gate's
effective Abar per pass (:func:`loopus_convert.measure.gate_report`), at conversion and after training, all
measured on the run's 32 held-out blocks (the trainer's own eval records are in each run's metrics.jsonl).

Usage:
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/bench_gate_train.py --root /tmp/gatebench \
        --runs identity,official,plain,residual > /tmp/gatebench/bench.log 2>&1
    HF_HUB_OFFLINE=1 python benchmarks/bench_gate_train.py --root /tmp/gatebench --report
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from loopus_train.state import list_checkpoints  # noqa: E402

STEPS = 300
RECIPE = [
    "--block-size", "64", "--batch-size", "2", "--steps", str(STEPS), "--loop-steps", "4",
    "--supervised", "2", "--lr", "1e-4", "--eval-loops", "1,2,4", "--eval-every", "100",
    "--save-every", str(STEPS), "--keep", "1",
]  # fmt: skip
PLAIN = ["--loop-steps", "1", "--supervised", "1"]  # overrides the recipe's loop settings (later flags win)


def _cli(*args: str, log: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    start = time.time()
    with log.open("a") as handle:
        handle.write(f"$ loopus {' '.join(args)}\n")
        handle.flush()
        subprocess.run([sys.executable, "-m", "loopus", *args], check=True, env=env, stdout=handle,
                       stderr=subprocess.STDOUT)  # fmt: skip
        handle.write(f"# {time.time() - start:.0f} s\n")


def run_one(root: Path, name: str, split: str) -> None:
    """Convert (if needed) and fine-tune one run; ``plain`` starts from the identity conversion."""
    init = "identity" if name == "plain" else name
    converted = root / f"conv-{init}"
    if not (converted / "config.json").is_file():
        args = ("convert", "--split", split, "--gate-init", init, "--out", str(converted))
        _cli(*args, log=root / "convert.log")
    out = root / f"run-{name}"
    if any(step == STEPS for step, _ in list_checkpoints(out)):
        print(f"{name}: done already", flush=True)
        return
    shutil.rmtree(out, ignore_errors=True)  # an unfinished run starts again (it saves only at the end)
    extra = PLAIN if name == "plain" else []
    _cli("finetune", str(converted), "--out", str(out), *RECIPE, *extra, log=root / f"{name}.log")
    print(f"{name}: finished", flush=True)


def _measure(path: Path, run: Path, passes: int) -> dict:
    """Held-out ppl at K = 1, 2, 4 and the gate report of the checkpoint ``path``, on ``run``'s held-out
    blocks (the 32 the trainer evaluates on)."""
    import torch

    from loopus_convert.checkpoint import load_with_tokenizer
    from loopus_convert.measure import gate_report, loss_per_loops
    from loopus_train.evaluate import eval_blocks
    from loopus_train.rundir import resolve_checkpoint

    model, tokenizer = load_with_tokenizer(path, torch.device("cpu"))
    blocks, *_ = eval_blocks(resolve_checkpoint(run), tokenizer, None, block_size=None, max_blocks=32)
    ppl = loss_per_loops(model, blocks, [1, 2, 4])["loops"]
    return {"ppl": [ppl[str(k)]["ppl"] for k in (1, 2, 4)], "gate": gate_report(model, blocks, passes)}


def report(root: Path, names: list[str], passes: int) -> None:
    """One table: held-out ppl at K = 1, 2, 4 and the effective Abar per pass, converted and trained."""
    import torch

    from loopus_train.rundir import resolve_checkpoint

    torch.set_num_threads(2)
    print(f"| run | ppl K=1 / 2 / 4 converted | after {STEPS} updates | Abar per pass 1..{passes} converted "
          "(mean ± sd over tokens x channels) | after training |")  # fmt: skip
    print("|---|---|---|---|---|")
    for name in names:
        run = root / f"run-{name}"
        if not any(step == STEPS for step, _ in list_checkpoints(run)):
            continue
        init = "identity" if name == "plain" else name
        before = _measure(root / f"conv-{init}", run, passes)
        after = _measure(resolve_checkpoint(run), run, passes)

        def ppl(entry: dict) -> str:
            return " / ".join(f"{p:.2f}" if p < 1e4 else f"{p:.2e}" for p in entry["ppl"])

        def abar(entry: dict) -> str:
            return " / ".join(f"{p['mean']:.3f}±{p['std']:.3f}" for p in entry["gate"]["passes"])

        print(f"| {name} | {ppl(before)} | {ppl(after)} | {abar(before)} | {abar(after)} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/gatebench"))
    parser.add_argument("--runs", default="identity,official,plain,residual")
    parser.add_argument("--split", default="10:20")
    parser.add_argument("--report", action="store_true", help="Only tabulate the finished runs.")
    parser.add_argument("--report-loops", type=int, default=4, help="Passes in the Abar report.")
    args = parser.parse_args()
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    args.root.mkdir(parents=True, exist_ok=True)
    if args.report:
        report(args.root, names, args.report_loops)
        return
    for name in names:
        run_one(args.root, name, args.split)


if __name__ == "__main__":
    main()

"""Early exit on the embedded default model: mean loops used and perplexity change per threshold.

The default model (SmolLM2-135M-Instruct) converted at 4:26 is measured as converted (an untrained confidence
head) and, with ``--train-steps N``, after N short fine-tuning updates on the built-in corpus; both on the
same held-out blocks of that run (``loopus_convert.measure``: loss per loop count, calibration, early exit
with the model's own ``exit_strategy="threshold"`` forward).

Usage: HF_HUB_OFFLINE=1 python benchmarks/bench_early_exit.py [--train-steps 30] [--max-loops 4] [--reuse-run]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def measure(
    ckpt: Path, blocks: torch.Tensor, loops: list[int], thresholds: list[float], max_loops: int
) -> dict:
    from loopus_convert import load_looped
    from loopus_convert.measure import early_exit_stats, loss_per_loops

    model = load_looped(ckpt)
    per = loss_per_loops(model, blocks, loops, batch_size=4)
    exits = early_exit_stats(model, blocks, thresholds, max_loops=max_loops, batch_size=4)
    return {
        "loops": {k: round(v["ppl"], 3) for k, v in per["loops"].items()},
        "calibration": {k: round(v, 4) for k, v in per["calibration"].items()},
        "early_exit": {
            k: {
                "mean_loops": round(v["mean_loops"], 3),
                "ppl": round(v["ppl"], 3),
                "ppl_change": round(v["ppl_change"], 4),
            }
            for k, v in exits["thresholds"].items()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--max-loops", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--eval-blocks", type=int, default=24)
    parser.add_argument("--thresholds", default="0.2,0.3,0.4,0.5,0.6,0.8,0.9")
    parser.add_argument("--reuse-run", action="store_true", help="Measure the run left by a previous call.")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "loopus-bench"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    from loopus_convert import convert_model
    from loopus_core.models import default_model_dir
    from loopus_train.config import TrainConfig
    from loopus_train.data import load_blocks
    from loopus_train.state import list_checkpoints
    from loopus_train.train import train

    work = Path(args.work)
    ckpt = work / "smol-4-26"
    if not (ckpt / "config.json").is_file():
        convert_model(str(default_model_dir()), ckpt, split="4:26")
    held = load_blocks(
        AutoTokenizer.from_pretrained(ckpt), None, block_size=args.block_size, held_out=0.05, seed=0
    ).held_out[: args.eval_blocks]
    loops = sorted({1, 2, args.max_loops, 2 * args.max_loops})
    thresholds = [float(t) for t in args.thresholds.split(",")]
    report = {
        "model": "SmolLM2-135M-Instruct converted at 4:26",
        "held_out_blocks": len(held),
        "block_size": args.block_size,
        "max_loops": args.max_loops,
        "converted": measure(ckpt, held, loops, thresholds, args.max_loops),
    }
    if args.train_steps:
        out = work / "early-exit-run"
        reuse = args.reuse_run and [s for s, _ in list_checkpoints(out)][-1:] == [args.train_steps]
        if not reuse:
            shutil.rmtree(out, ignore_errors=True)
        cfg = TrainConfig(
            checkpoint=str(ckpt),
            out=str(out),
            data=None,
            block_size=args.block_size,
            batch_size=2,
            steps=args.train_steps,
            lr=1e-4,
            min_lr=1e-5,
            warmup=3,
            loop_steps=args.max_loops,
            supervised=2,
            eval_every=10**6,
            save_every=10**6,
            eval_loops=(1,),
            eval_thresholds=(),
            eval_blocks=1,
            device="cpu",
        )
        began = time.perf_counter()
        if not reuse:
            train(cfg)
        report["train"] = {
            "steps": args.train_steps,
            "loop_steps": args.max_loops,
            "supervised": 2,
            "batch": "2 x 64 tokens",
            "seconds": round(time.perf_counter() - began, 1) if not reuse else "reused",
        }
        report["trained"] = measure(list_checkpoints(out)[-1][1], held, loops, thresholds, args.max_loops)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

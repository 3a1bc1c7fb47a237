"""The default analysis of the embedded model at several seeds: is the pick stable, how many predictions do
the final contenders and the report carry, and how long does each run take on this machine.

Each seed draws a different selection and report text (``loopus analyze --seed S``: which documents are
held out and the order of their windows). Every run is ``/usr/bin/time -v python -m loopus analyze --seed S
--out DIR/seedS`` with every other option at its default (the command a user types), timed as a whole
(model load included) with the load average before it; from its ``analysis.json`` the record keeps the
pick, the confidence and its reason, the stability statement (stable, or unstable with the alternatives
it names), the race's rounds and contenders (predictions each), the report text's predictions and the wall
time of each step. Across the runs: the most common pick and its share, how many reports say "unstable",
and how many of the other seeds' picks each report names (as its pick or an alternative).
Run on an otherwise idle machine::

    HF_HUB_OFFLINE=1 python benchmarks/bench_analyze_seeds.py --seeds 5 \
        --json benchmarks/results/analyze_seeds.json
    HF_HUB_OFFLINE=1 python benchmarks/bench_analyze_seeds.py --large-vocab --seeds 1 \
        --json benchmarks/results/analyze_large_vocab.json

``--large-vocab`` analyses a model of Gemma-3-270M's shape (18 layers, hidden 640, a 262,144-token
vocabulary, sliding-window attention) with random weights and the embedded model's tokenizer, built in the
scratch directory: the head's share of the map grows with the vocabulary, and this is the shape the issue
timed (its weights are not on this machine; only the time is measured, the pick of a random model means
nothing).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from first_run import machine, run_one  # noqa: E402

LARGE_VOCAB = "random weights, Gemma-3-270M's shape (18 layers, hidden 640, vocabulary 262,144)"
STABLE_SHARE = 0.8  # the bar: the same split in at least 4 of 5 seeds


def large_vocab_model(out: Path) -> Path:
    """A random model of Gemma-3-270M's shape in ``out`` (the embedded model's tokenizer)."""
    import torch
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    from loopus_core.models import default_model_dir

    config = Gemma3TextConfig(
        vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
        max_position_embeddings=32768, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    Gemma3ForCausalLM(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(default_model_dir()).save_pretrained(out)
    return out


def summary(analysis: dict) -> dict:
    """What one run's ``analysis.json`` says about the decision and its evidence."""
    race = analysis["repeat_map"].get("race", {})
    decision = analysis["decision"]
    return {
        "split": analysis["split"], "confidence": analysis["confidence"], "reason": analysis["reason"],
        "window": analysis["repeat_map"].get("window"), "contenders": race.get("contenders"),
        "rounds": race.get("rounds"), "race_stop": race.get("stop"),
        "report_text": decision.get("report_text"),  # the pick and its neighbours read all of it
        "stability": decision.get("stability"),
        "wall_time_s": analysis["provenance"]["wall_time_s"],
    }


def stability(runs: list[dict]) -> dict:
    """The most common pick and its share of the runs; whether each report says "unstable", and how many of
    the other runs' picks it names (its pick or one of its alternatives)."""
    picks = [r["split"] for r in runs]
    common, count = Counter(picks).most_common(1)[0]
    said, covered = [], []
    for i, run in enumerate(runs):
        record = run.get("stability") or {}
        said.append(record.get("stable") is False)
        named = {run["split"], *(alt["split"] for alt in record.get("alternatives", []))}
        covered.append(sum(p in named for j, p in enumerate(picks) if j != i))
    return {"picks": picks, "most_common": common, "share": count / len(picks),
            "stable": count / len(picks) >= STABLE_SHARE, "reports_saying_unstable": sum(said),
            "other_picks_named": {"each": covered, "of": len(picks) - 1}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="how many seeds")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds FIRST .. FIRST + SEEDS - 1")
    parser.add_argument("--json", type=Path, default=None, help="write the record here")
    parser.add_argument("--keep", type=Path, default=None, help="keep the reports in this directory")
    parser.add_argument("--include", type=Path, default=None,
                        help="add the runs of an earlier record (seeds run while the machine was busy: they "
                             "count for the stability; each run keeps its load average)")
    parser.add_argument("--large-vocab", action="store_true", help="a random model of Gemma-3-270M's shape")
    parser.add_argument("--map-tokens", type=int, default=None,
                        help="pass --map-tokens to every analysis (default: the analysis' own default)")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="loopus-seeds-"))
    work.mkdir(parents=True, exist_ok=True)
    runs, host = [], machine()
    try:
        model = [str(large_vocab_model(work / "model"))] if args.large_vocab else []
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            out = work / f"seed{seed}"
            flags = ["--seed", str(seed)]
            flags += ["--map-tokens", str(args.map_tokens)] if args.map_tokens else []
            step = run_one(["loopus", "analyze", *model, *flags, "--out", str(out)], work)
            if step["returncode"] != 0:
                raise SystemExit(step["stderr_tail"])
            analysis = json.loads((out / "analysis.json").read_text(encoding="utf-8"))
            runs.append({"seed": seed, **step, **summary(analysis)})
            print(f"seed {seed}: {runs[-1]['split']} ({runs[-1]['confidence']}) in {step['wall_s']} s, "
                  f"load before {step['load_before']}", flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    walls = [r["wall_s"] for r in runs]  # this invocation's runs: the time figures
    if args.include:
        runs += json.loads(args.include.read_text(encoding="utf-8"))["runs"]
    record = {
        "command": "python benchmarks/bench_analyze_seeds.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%F %T"), "machine": host, "runs": runs,
        "model": LARGE_VOCAB if args.large_vocab else "embedded default", "map_tokens": args.map_tokens,
        "stability": stability(runs),
        "wall_s": {"min": min(walls), "max": max(walls), "each": walls, "runs": "this invocation's"},
        "peak_rss_mb_max": max(r["peak_rss_mb"] or 0 for r in runs),
    }
    print(json.dumps({k: v for k, v in record.items() if k != "runs"}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Benchmark the similarity budget of ``loopus analyze``: the default ``--tokens`` against twice as many.

    HF_HUB_OFFLINE=1 python3 benchmarks/bench_similarity_budget.py [--tokens N]

The measuring pass (probes off) and the similarity evidence of the embedded model on its measuring text, at
``--tokens`` (default: :data:`loopus_analyze.corpus.DEFAULT_TOKENS`) and at twice that, side by side: wall
time of each, the largest difference of the debiased CKA matrices, and whether the similarity picks (the
split each view would choose) and the curves' change points are the same.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench_functional_map import machine  # noqa: E402


def evidence(opened, texts, tokens: int) -> dict:
    """CKA, similarity picks and change points of one budget, with the pass's wall time."""
    from loopus_analyze import corpus
    from loopus_analyze.analyze import BOOTSTRAP_RESAMPLES, _similarity_picks
    from loopus_analyze.collect import measure
    from loopus_analyze.similarity import similarity_evidence

    batches = corpus.make_batches(opened.tokenizer, texts, tokens=tokens, seq_len=corpus.DEFAULT_SEQ_LEN,
                                  batch_size=corpus.DEFAULT_BATCH_SIZE, seed=0)
    wall = time.perf_counter()
    measurements = measure(opened.model, opened.tokenizer, batches, probes=False, seed=0)
    wall = time.perf_counter() - wall
    search, _, points = similarity_evidence(measurements, resamples=BOOTSTRAP_RESAMPLES, seed=0)
    picks = {view: "{}:{}".format(*block) for view, block in _similarity_picks(measurements, search).items()}
    return {"tokens": int(measurements.tokens_used), "wall_s": wall, "picks": picks,
            "change_points": {p.signal: p.split for p in points}, "cka": measurements.cka_debiased}


def main() -> None:
    from loopus_analyze import corpus, heldout
    from loopus_core.models import open_model
    from loopus_core.texts import load_texts

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=corpus.DEFAULT_TOKENS)
    args = parser.parse_args()
    opened = open_model(None)
    texts = heldout.three_ways(load_texts(None), seed=0).measured
    ours, double = (evidence(opened, texts, t) for t in (args.tokens, 2 * args.tokens))
    results = {"machine": machine(), "command": " ".join([Path(sys.executable).name, *sys.argv]),
               "tokens": [ours["tokens"], double["tokens"]],
               "wall_s": [ours["wall_s"], double["wall_s"]], "ratio_wall": double["wall_s"] / ours["wall_s"],
               "max_abs_cka_difference": float(np.nanmax(np.abs(ours.pop("cka") - double.pop("cka")))),
               "same_picks": ours["picks"] == double["picks"],
               "same_change_points": ours["change_points"] == double["change_points"],
               "picks": ours["picks"], "change_points": ours["change_points"]}
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

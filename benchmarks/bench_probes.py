"""Benchmark the probes of ``loopus analyze``: warm-started chains along depth against cold fits.

    HF_HUB_OFFLINE=1 python3 benchmarks/bench_probes.py [--tokens N]

The probe sample of the default analysis of the embedded model (its measuring text, ``--tokens`` tokens,
the sample of :data:`loopus_analyze.collect.DEFAULT_PROBE_TOKENS`), then on the same sample, the same
document split and control labels, and the same threads (as many as torch uses, one BLAS thread per fit):

- ours: :func:`loopus_analyze.probes.run_probes`, each target fitted state by state from the previous
  state's solution (``warm_start``);
- the reference: every (state, target) fitted from zero, as the probes were fitted before (same ``C``,
  same ``max_iter``).

Reports the wall and CPU time of each, their ratio, and per target the largest and the mean difference of
the test accuracies (and of the selectivities).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench_functional_map import machine  # noqa: E402


def probe_sample(tokens: int) -> tuple[np.ndarray, dict, int]:
    """The probe sample (features, labels) that the default analysis fits, and its window length."""
    from loopus_analyze import collect, corpus, heldout
    from loopus_core.models import open_model
    from loopus_core.texts import load_texts

    opened = open_model(None)
    texts = heldout.three_ways(load_texts(None), seed=0)
    batches = corpus.make_batches(opened.tokenizer, texts.measured, tokens=tokens, seed=0,
                                  seq_len=corpus.DEFAULT_SEQ_LEN, batch_size=corpus.DEFAULT_BATCH_SIZE)
    captured = {}

    def capture(features, labels, **kwargs):
        captured.update(features=features, labels=labels)
        return {}

    real = collect.run_probes
    collect.run_probes = capture
    try:
        collect.measure(opened.model, opened.tokenizer, batches, probes=True, seed=0)
    finally:
        collect.run_probes = real
    return captured["features"], captured["labels"], corpus.DEFAULT_SEQ_LEN


def cold_probes(features: np.ndarray, labels: dict, seq_len: int) -> dict:
    """The reference: :func:`run_probes` with every fit started from zero (no warm start)."""
    from joblib import Parallel, delayed
    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    from loopus_analyze import probes

    def fit_all(x_all, chains, *, c, max_iter):
        """Every (target, state) alone: a one-state chain is a fit from zero."""
        import torch

        work = [(i, s) for i in range(len(chains)) for s in range(x_all.shape[0])]
        jobs = max(1, min(torch.get_num_threads(), len(work)))
        with threadpool_limits(limits=1, user_api="blas"), warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            fit = delayed(probes.probe_chain)
            scores = Parallel(n_jobs=jobs, prefer="threads")(
                fit(x_all[s:s + 1], *chains[i], c=c, max_iter=max_iter) for i, s in work)
        out = [np.zeros(x_all.shape[0]) for _ in chains]
        for (i, s), score in zip(work, scores, strict=True):
            out[i][s] = score[0]
        return out

    real = probes._fit_all
    probes._fit_all = fit_all
    try:
        return probes.run_probes(features, labels, seed=0, seq_len=seq_len)
    finally:
        probes._fit_all = real


def main() -> None:
    from loopus_analyze import collect, corpus, probes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=corpus.DEFAULT_TOKENS)
    args = parser.parse_args()
    features, labels, seq_len = probe_sample(args.tokens)
    results = {"machine": machine(), "command": " ".join([Path(sys.executable).name, *sys.argv]),
               "sample": {"tokens": int(features.shape[1]), "states": int(features.shape[0]),
                          "requested": collect.DEFAULT_PROBE_TOKENS}}
    times = {}
    for side, run in (("cold", lambda: cold_probes(features, labels, seq_len)),
                      ("warm", lambda: probes.run_probes(features, labels, seed=0, seq_len=seq_len))):
        wall, cpu = time.perf_counter(), time.process_time()
        results[side] = run()
        times[side] = (time.perf_counter() - wall, time.process_time() - cpu)
    cold, warm = results.pop("cold"), results.pop("warm")
    results["time"] = {"cold_wall_s": times["cold"][0], "cold_cpu_s": times["cold"][1],
                       "warm_wall_s": times["warm"][0], "warm_cpu_s": times["warm"][1],
                       "ratio_wall": times["cold"][0] / times["warm"][0],
                       "ratio_cpu": times["cold"][1] / times["warm"][1]}
    results["difference"] = {
        f"{task}/{kind}": {"max_abs": float(np.abs(warm[task][kind] - cold[task][kind]).max()),
                           "mean": float(np.mean(warm[task][kind] - cold[task][kind]))}
        for task in cold for kind in ("accuracy", "control", "selectivity")}
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

"""Benchmark the measuring pass of ``loopus analyze`` against the straightforward alternatives, side by side.

    HF_HUB_OFFLINE=1 python3 benchmarks/bench_measure.py [--part a|b|c|all] [--tokens N] [--repeat R]

(a) time: ``measure(probes=False)`` (states + CKA + drift + lens) over a bare forward with
    ``output_hidden_states=True`` over the same batches of the embedded default model; interleaved repeats,
    best of each side, ratio of the two (target <= 1.3).
(b) peak memory: the same measuring pass in a fresh subprocess at 1x and 8x a token budget, peak RSS read
    from ``ru_maxrss`` (which includes the model); ratio 8x / 1x (target <= 1.2).
(c) CKA accumulation: ours (streamed per batch, :class:`HSICAccumulator`) against keeping all states and
    computing every layer pair separately with a full-batch debiased CKA (Kornblith's U-centred Grams in
    float64), on states of the default model's shape; each side in its own subprocess for its peak RSS.
    The reference is timed on a few pairs and extrapolated to all pairs (it takes hours otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _open_default(tokens: int, seq_len: int, batch_size: int):
    from loopus_analyze.corpus import make_batches
    from loopus_core.models import open_model
    from loopus_core.texts import load_texts

    opened = open_model(None)
    batches = make_batches(opened.tokenizer, load_texts(None), tokens=tokens, seq_len=seq_len,
                           batch_size=batch_size, seed=0)
    return opened, batches


def part_a(tokens: int, repeat: int, seq_len: int, batch_size: int) -> dict:
    import torch

    from loopus_analyze.collect import measure

    opened, batches = _open_default(tokens, seq_len, batch_size)
    model = opened.model

    def bare():
        with torch.inference_mode():
            for b in batches:
                model(input_ids=b.input_ids, attention_mask=b.attention_mask, output_hidden_states=True,
                      use_cache=False)

    def ours():
        measure(model, opened.tokenizer, batches, probes=False)

    measure(model, opened.tokenizer, batches[:1], probes=False)  # warm-up (first-call costs)
    times: dict[str, list[float]] = {"bare": [], "ours": []}
    cpu: dict[str, list[float]] = {"bare": [], "ours": []}
    for _ in range(repeat):
        for name, fn in (("bare", bare), ("ours", ours)):
            wall, proc = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - wall)
            cpu[name].append(time.process_time() - proc)
    tokens_used = sum(b.measured_tokens for b in batches)
    return {"tokens": tokens_used, "batches": len(batches), "bare_s": min(times["bare"]),
            "ours_s": min(times["ours"]), "ratio_wall": min(times["ours"]) / min(times["bare"]),
            "ratio_cpu": min(cpu["ours"]) / min(cpu["bare"]), "all_wall": times, "all_cpu": cpu}


def _child_measure(tokens: int, seq_len: int, batch_size: int) -> None:
    from loopus_analyze.collect import measure

    opened, batches = _open_default(tokens, seq_len, batch_size)
    before = _peak_rss_mb()
    measure(opened.model, opened.tokenizer, batches, probes=False)
    print(json.dumps({"tokens": sum(b.measured_tokens for b in batches), "peak_rss_mb": _peak_rss_mb(),
                      "peak_before_measure_mb": before}))


def _run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def part_b(tokens: int, seq_len: int, batch_size: int) -> dict:
    one = _run_child("--child", "measure", "--tokens", str(tokens), "--seq-len", str(seq_len),
                     "--batch-size", str(batch_size))
    eight = _run_child("--child", "measure", "--tokens", str(8 * tokens), "--seq-len", str(seq_len),
                       "--batch-size", str(batch_size))
    return {"1x": one, "8x": eight, "ratio": eight["peak_rss_mb"] / one["peak_rss_mb"],
            "ratio_above_model": (eight["peak_rss_mb"] - eight["peak_before_measure_mb"])
            / max(one["peak_rss_mb"] - one["peak_before_measure_mb"], 1e-9)}


def _synthetic_states(tokens: int, states: int, dim: int, per_batch: int):
    import torch

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(per_batch, dim, generator=gen)
    for start in range(0, tokens, per_batch):
        n = min(per_batch, tokens - start)
        drift = torch.randn(states, n, dim, generator=gen).cumsum(0) * 0.3
        yield base[:n] + drift + 20.0  # shared offset, like a residual stream


def _reference_cka(x, y) -> float:
    """Kornblith et al. debiased CKA on full-batch linear Grams, float64."""
    import numpy as np

    def centre(gram):
        n = gram.shape[0]
        np.fill_diagonal(gram, 0)
        means = gram.sum(0) / (n - 2)
        means -= means.sum() / (2 * (n - 1))
        gram -= means[:, None]
        gram -= means[None, :]
        np.fill_diagonal(gram, 0)
        return gram

    k = centre(x @ x.T)
    l_ = centre(y @ y.T)
    return float(k.ravel() @ l_.ravel() / (np.linalg.norm(k) * np.linalg.norm(l_)))


def _child_cka(side: str, tokens: int, states: int, dim: int, per_batch: int, pairs: int) -> None:
    import numpy as np
    import torch

    from loopus_analyze.cka import HSICAccumulator

    start = time.perf_counter()
    if side == "ours":
        acc = HSICAccumulator()
        for batch in _synthetic_states(tokens, states, dim, per_batch):
            acc.update(batch)
        acc.cka()
        elapsed, done, total = time.perf_counter() - start, states * states, states * states
    else:
        batches = list(_synthetic_states(tokens, states, dim, per_batch))
        everything = torch.cat(batches, dim=1).double().numpy()
        del batches
        all_pairs = [(i, j) for i in range(states) for j in range(i + 1, states)]
        load = time.perf_counter() - start
        t0 = time.perf_counter()
        for i, j in all_pairs[:pairs]:
            _reference_cka(everything[i], everything[j])
        per_pair = (time.perf_counter() - t0) / pairs
        elapsed, done, total = load + per_pair * len(all_pairs), pairs, len(all_pairs)
        del everything
        np.zeros(1)
    print(json.dumps({"side": side, "seconds": elapsed, "pairs_timed": done, "pairs_total": total,
                      "peak_rss_mb": _peak_rss_mb()}))


def part_c(tokens: int, states: int, dim: int, per_batch: int, pairs: int) -> dict:
    args = ["--tokens", str(tokens), "--states", str(states), "--dim", str(dim),
            "--per-batch", str(per_batch), "--pairs", str(pairs)]
    ours = _run_child("--child", "cka-ours", *args)
    ref = _run_child("--child", "cka-reference", *args)
    idle = _run_child("--child", "idle")
    return {"ours": ours, "reference": ref, "idle_peak_rss_mb": idle["peak_rss_mb"],
            "speed_ratio_reference_over_ours": ref["seconds"] / ours["seconds"],
            "memory_ratio_reference_over_ours": (ref["peak_rss_mb"] - idle["peak_rss_mb"])
            / max(ours["peak_rss_mb"] - idle["peak_rss_mb"], 1e-9)}


def machine() -> str:
    import torch

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
            f"torch {torch.__version__}"
            f" ({torch.get_num_threads()} threads), Python {platform.python_version()}, "
            f"load average {os.getloadavg()[0]:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default="all", choices=["a", "b", "c", "all"])
    parser.add_argument("--tokens", type=int, default=None, help="token budget (default: DEFAULT_TOKENS)")
    parser.add_argument("--memory-tokens", type=int, default=2048, help="the 1x budget of part b")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--states", type=int, default=31)
    parser.add_argument("--dim", type=int, default=576)
    parser.add_argument("--per-batch", type=int, default=1016)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--child", default=None)
    args = parser.parse_args()
    from loopus_analyze.corpus import DEFAULT_TOKENS

    tokens = args.tokens or DEFAULT_TOKENS
    if args.child == "measure":
        return _child_measure(tokens, args.seq_len, args.batch_size)
    if args.child == "idle":
        import numpy  # noqa: F401
        import torch  # noqa: F401

        from loopus_analyze.cka import HSICAccumulator  # noqa: F401
        return print(json.dumps({"peak_rss_mb": _peak_rss_mb()}))
    if args.child in ("cka-ours", "cka-reference"):
        return _child_cka(args.child.split("-")[1], tokens, args.states, args.dim, args.per_batch, args.pairs)
    results = {"machine": machine(), "command": " ".join([Path(sys.executable).name, *sys.argv])}
    if args.part in ("a", "all"):
        results["a_time"] = part_a(tokens, args.repeat, args.seq_len, args.batch_size)
        print(json.dumps({"a_time": results["a_time"]}, indent=1), flush=True)
    if args.part in ("b", "all"):
        results["b_memory"] = part_b(args.memory_tokens, args.seq_len, args.batch_size)
        print(json.dumps({"b_memory": results["b_memory"]}, indent=1), flush=True)
    if args.part in ("c", "all"):
        results["c_cka"] = part_c(tokens, args.states, args.dim, args.per_batch, args.pairs)
        print(json.dumps({"c_cka": results["c_cka"]}, indent=1), flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()

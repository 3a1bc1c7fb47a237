"""Benchmark the repeat-cost map of ``loopus analyze`` against the naive approach, side by side.

    HF_HUB_OFFLINE=1 python3 benchmarks/bench_functional_map.py [--part a|b|c|d|all] [--windows N] [--every K]

(a) compute, on the report text of a map budget of ``--windows`` windows (3x as many windows of 31
    tokens): ours (:func:`loopus_analyze.functional.measure_map`: base states cached once per batch, the
    second pass of A:B starts at h_B, all inputs of one starting layer stacked) against the naive approach
    (for every split, the modified model -- block run twice, block skipped -- run from scratch with
    :func:`loopus_core.models.layer_surgery`, full logits), on the same held-out windows of the embedded
    default model and the same splits (every valid split, or every K-th with ``--every K``); wall and CPU
    time of each side, their ratio, and the largest difference between the two maps (they must agree).
(b) memory: ours in a fresh subprocess at 1x and 8x a token budget of the selection text
    (``--memory-windows`` windows of 31 tokens; the default ``--map-tokens`` is 5 windows), peak RSS from
    ``ru_maxrss`` (model included); ratio 8x / 1x. The same splits at both budgets.
(c) the head: the map's scoring of variant predictions (:func:`loopus_analyze.lens.head_stats`, a
    vocabulary tile at a time) against scoring from the full logits (``log_softmax`` of all of them, then
    the target, KL and argmax), on the same rows: the base model's final-normed states of the report text
    as ``HEAD_ROWS`` / predictions variants, CPU time of each (best of ``--repeats``) and the largest
    difference of NLL and KL.
(d) a sample of positions for the head (not used, measured): on the report text of the default budget, the
    repeat cost of every block of ``--length`` layers scored on all predictions and on every other one
    (positions 1, 3, 5, ...); the mean width of their 90% intervals (bootstrap over documents, as the report
    computes them) and of the paired intervals against ``--reference``, and the ratio of the two widths.
"""

from __future__ import annotations

import argparse
import contextlib
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


def _setup(windows: int, every: int, text: str = "report"):
    """The embedded model, held-out map windows (``windows`` of the selection text, the budget
    ``--map-tokens`` sets; or the report text's, 3x as many), the splits to map."""
    from loopus_analyze import heldout
    from loopus_analyze.similarity import valid_pairs
    from loopus_core.models import open_model
    from loopus_core.texts import load_texts

    opened = open_model(None)
    texts = heldout.three_ways(load_texts(None), seed=0)
    selection, report = heldout.map_batches(opened.tokenizer, texts, windows * (heldout.MAP_SEQ_LEN - 1), 0)
    batches = report if text == "report" else selection
    pairs = [tuple(p) for p in valid_pairs(opened.parts.num_layers).tolist()][::every]
    return opened, batches, pairs


def _nll_sum(model, batch, valid, targets, order=None) -> float:
    """Summed NLL of the model (layers in ``order``, or as it is) on the valid predictions of a batch."""
    import torch

    from loopus_core.models import layer_surgery

    with layer_surgery(model, order) if order is not None else contextlib.nullcontext():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    logp = torch.log_softmax(logits[:, :-1][valid].float(), -1)
    return float(-logp.gather(1, targets[:, None]).double().sum())


def _naive(model, batches, pairs, num_layers: int) -> dict[tuple[str, int, int], float]:
    """ΔNLL of every split, running the modified model from scratch (full logits, no cache)."""
    import torch

    from loopus_analyze.functional import prediction_mask, repeat_indices, skip_indices

    sums: dict[tuple[str, int, int], float] = {}
    count = 0
    with torch.inference_mode():
        for batch in batches:
            valid = prediction_mask(batch.attention_mask)
            targets = batch.input_ids[:, 1:][valid]
            base = _nll_sum(model, batch, valid, targets)
            count += int(targets.numel())
            for a, b in pairs:
                for kind, order in (("repeat", repeat_indices(num_layers, a, b)),
                                    ("skip", skip_indices(num_layers, a, b))):
                    value = _nll_sum(model, batch, valid, targets, order) - base
                    sums[(kind, a, b)] = sums.get((kind, a, b), 0.0) + value
    return {key: value / count for key, value in sums.items()}


def part_a(windows: int, every: int) -> dict:
    from loopus_analyze.functional import map_entries, measure_map

    opened, batches, pairs = _setup(windows, every)
    model, num_layers = opened.model, opened.parts.num_layers
    measure_map(model, batches[:1], entries=map_entries(num_layers, pairs[:1]))  # warm-up
    times = {}
    wall, cpu = time.perf_counter(), time.process_time()
    ours, _ = measure_map(model, batches, entries=map_entries(num_layers, pairs))
    times["ours"] = (time.perf_counter() - wall, time.process_time() - cpu)
    wall, cpu = time.perf_counter(), time.process_time()
    naive = _naive(model, batches, pairs, num_layers)
    times["naive"] = (time.perf_counter() - wall, time.process_time() - cpu)
    repeat, skip = ours.repeat("delta_nll"), ours.skip("delta_nll")
    diff = max(abs((repeat if kind == "repeat" else skip)[a, b] - value)
               for (kind, a, b), value in naive.items())
    return {"windows": windows, "tokens": ours.tokens, "splits": len(pairs), "every": every,
            "ours_wall_s": times["ours"][0], "ours_cpu_s": times["ours"][1],
            "naive_wall_s": times["naive"][0], "naive_cpu_s": times["naive"][1],
            "ratio_wall": times["naive"][0] / times["ours"][0],
            "ratio_cpu": times["naive"][1] / times["ours"][1],
            "max_abs_difference_delta_nll": diff}


def _child_memory(windows: int, every: int) -> None:
    from loopus_analyze.functional import map_entries, measure_map

    opened, batches, pairs = _setup(windows, every, "selection")
    before = _peak_rss_mb()
    sums, _ = measure_map(opened.model, batches, entries=map_entries(opened.parts.num_layers, pairs))
    print(json.dumps({"tokens": sums.tokens, "batches": len(batches), "peak_rss_mb": _peak_rss_mb(),
                      "peak_before_map_mb": before}))


def _run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def part_b(windows: int, every: int) -> dict:
    one = _run_child("--child", "--windows", str(windows), "--every", str(every))
    eight = _run_child("--child", "--windows", str(8 * windows), "--every", str(every))
    return {"1x": one, "8x": eight, "ratio": eight["peak_rss_mb"] / one["peak_rss_mb"],
            "ratio_above_model": (eight["peak_rss_mb"] - eight["peak_before_map_mb"])
            / max(one["peak_rss_mb"] - one["peak_before_map_mb"], 1e-9)}


def _full_logit_scores(parts, picked, prob, targets, neg_entropy):
    """The reference: NLL, KL and argmax from all of the (variants, N, V) logits at once."""
    import torch

    from loopus_analyze.lens import head_logits

    logq = torch.log_softmax(head_logits(parts, picked), dim=-1)
    nll = -logq.gather(2, targets.expand(picked.shape[0], -1)[..., None])[..., 0]
    return nll, neg_entropy - torch.linalg.vecdot(logq, prob), logq.argmax(-1)


def part_c(windows: int, repeats: int) -> dict:
    import torch

    from loopus_analyze.functional import HEAD_ROWS, prediction_mask
    from loopus_analyze.lens import head_logits, head_stats

    opened, batches, _ = _setup(windows, 1)
    parts, batch = opened.parts, batches[0]
    valid = prediction_mask(batch.attention_mask)
    with torch.inference_mode():
        normed = parts.backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                use_cache=False).last_hidden_state[:, :-1][valid]
        logp = torch.log_softmax(head_logits(parts, normed), dim=-1)
        prob, targets = logp.exp(), batch.input_ids[:, 1:][valid]
        neg_entropy = torch.linalg.vecdot(prob, logp)
        variants = max(1, HEAD_ROWS // normed.shape[0])
        noise = torch.randn(variants, *normed.shape, generator=torch.Generator().manual_seed(0))
        picked = normed + 0.05 * noise  # variants: the base states, perturbed
        times: dict[str, float] = {}
        for side in ("full_logits", "tiled") * repeats:
            cpu = time.process_time()
            if side == "tiled":
                stats = head_stats(parts, picked, prob, targets)
                ours = (-stats.log_q_target, neg_entropy - stats.p_log_q, stats.top)
            else:
                ref = _full_logit_scores(parts, picked, prob, targets, neg_entropy)
            times[side] = min(times.get(side, float("inf")), time.process_time() - cpu)
    return {"rows": int(picked.shape[0] * picked.shape[1]), "variants": variants, "repeats": repeats,
            "full_logits_cpu_s": times["full_logits"], "tiled_cpu_s": times["tiled"],
            "ratio_cpu": times["full_logits"] / times["tiled"],
            "max_abs_difference_nll": float((ours[0] - ref[0]).abs().max()),
            "max_abs_difference_kl": float((ours[1] - ref[1]).abs().max()),
            "argmax_equal": bool(torch.equal(ours[2], ref[2]))}


def part_d(length: int, reference: int) -> dict:
    import numpy as np

    from loopus_analyze import functional, heldout
    from loopus_analyze.intervals import DocumentBootstrap, percentile_interval

    opened, batches, _ = _setup(heldout.DEFAULT_MAP_TOKENS // (heldout.MAP_SEQ_LEN - 1), 1)
    entries = [(a + length, a) for a in range(1, opened.parts.num_layers - length)]
    every_prediction = functional.prediction_mask

    def every_other(mask):
        valid = every_prediction(mask)
        valid[:, 2::2] = False  # keep the predictions from positions 1, 3, 5, ...
        return valid

    out = {}
    for name, rule in (("all", every_prediction), ("every_other", every_other)):
        functional.prediction_mask = rule
        try:
            sums, _ = functional.measure_map(opened.model, batches, entries=entries)
        finally:
            functional.prediction_mask = every_prediction
        resampled = DocumentBootstrap.draw(len(sums.documents)).means(sums.nll - sums.base_nll[:, None, None],
                                                                       sums.count)
        widths, paired = [], []
        base_entry = resampled[:, reference + length, reference]
        for j, s in entries:
            low, high = percentile_interval(resampled[:, j, s])
            widths.append(float(high - low))
            if s != reference:
                low, high = percentile_interval(resampled[:, j, s] - base_entry)
                paired.append(float(high - low))
        out[name] = {"predictions": sums.tokens, "mean_width": float(np.mean(widths)),
                     "mean_paired_width": float(np.mean(paired))}
    out["width_ratio"] = out["every_other"]["mean_width"] / out["all"]["mean_width"]
    out["paired_width_ratio"] = out["every_other"]["mean_paired_width"] / out["all"]["mean_paired_width"]
    return {"length": length, "reference": f"{reference}:{reference + length}", **out}


def machine() -> str:
    import torch

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}, load average {os.getloadavg()[0]:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default="all", choices=["a", "b", "c", "d", "all"])
    parser.add_argument("--windows", type=int, default=2, help="part a: the report text of this map budget "
                        "(in windows of 31 tokens), 3x as many windows")
    parser.add_argument("--memory-windows", type=int, default=5, help="the 1x budget of part b, in windows")
    parser.add_argument("--every", type=int, default=1, help="map every K-th valid split (both sides)")
    parser.add_argument("--repeats", type=int, default=5, help="part c: best of this many timings per side")
    parser.add_argument("--length", type=int, default=13, help="part d: the block length")
    parser.add_argument("--reference", type=int, default=2, help="part d: the start of the reference block")
    parser.add_argument("--child", action="store_true")
    args = parser.parse_args()
    if args.child:
        return _child_memory(args.windows, args.every)
    results = {"machine": machine(), "command": " ".join([Path(sys.executable).name, *sys.argv])}
    parts = {"a": ("a_compute", lambda: part_a(args.windows, args.every)),
             "b": ("b_memory", lambda: part_b(args.memory_windows, args.every)),
             "c": ("c_head", lambda: part_c(args.windows, args.repeats)),
             "d": ("d_sampled_head", lambda: part_d(args.length, args.reference))}
    for part, (key, run) in parts.items():
        if args.part in (part, "all"):
            results[key] = run()
            print(json.dumps({key: results[key]}, indent=1), flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()

"""Benchmark the race over the splits (``loopus analyze``'s selection map) against uniform maps.

    HF_HUB_OFFLINE=1 python3 benchmarks/bench_race.py                       # the embedded model (long)
    HF_HUB_OFFLINE=1 python3 benchmarks/bench_race.py --tiny --seeds 5      # a tiny random Llama (minutes)
    HF_HUB_OFFLINE=1 python3 benchmarks/bench_race.py --tiny --vocab 262144 --seeds 1   # a large vocabulary

For each seed of the selection text (documents and window order): the race with the default rule and
``--map-tokens`` (the final contenders' predictions), then the uniform map of every candidate split on as
many windows as the race's work buys (equal work in layer-token units, CPU seconds of both recorded), and
for seed 0 the uniform map on the race's final windows (every split at ``--map-tokens`` predictions). It
records per method: the pick, the predictions the pick and its neighbours carry, CPU and wall seconds, and
across seeds how often the most common pick was chosen. Writes ``benchmarks/results/bench_race.json``
(``bench_race_tiny.json`` with ``--tiny``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench_functional_map import machine  # noqa: E402


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def uniform(model, rule, batches, windows: int) -> dict:
    """Every candidate on the first ``windows`` windows, and the rule's choice on it."""
    from loopus_analyze import heldout
    from loopus_analyze.functional import measure_map
    from loopus_analyze.race import candidates
    from loopus_analyze.rule import choose

    blocks = candidates(rule)
    entries = [(b, a) for a, b in blocks]
    (sums, _), wall, cpu = _timed(lambda: measure_map(model, batches[:windows], entries=entries, passes=1,
                                                      warmup=heldout.WARMUP))
    choice = choose(rule, sums.repeat("delta_nll"))
    tokens = sums.entry_tokens()
    return {"pick": choice.split, "windows": windows, "tokens_each": int(tokens[choice.end, choice.start]),
            "wall_s": wall, "cpu_s": cpu}


def racing(model, rule, batches, map_tokens: int, seed: int) -> tuple[dict, object]:
    from loopus_analyze import heldout
    from loopus_analyze.race import decide, run_race

    def run():
        r = run_race(model, rule, batches, final_tokens=map_tokens, warmup=heldout.WARMUP)
        return r, decide(model, rule, r, batches, warmup=heldout.WARMUP)

    (race, (choice, confidence, why)), wall, cpu = _timed(run)
    tokens = race.sums.entry_tokens()
    return {"pick": choice.split, "confidence": confidence, "why": why, "wall_s": wall, "cpu_s": cpu,
            "work": race.work, "uniform_work_at_map_tokens": race.uniform_work, "stop": race.stop,
            "contenders": {f"{a}:{b}": int(tokens[b, a]) for a, b in race.contenders},
            "rounds": [r.__dict__ for r in race.rounds]}, race


def equal_work_windows(model, rule, batches, work: float) -> int:
    """The most windows of the uniform map whose work is within ``work``."""
    from loopus_analyze import heldout, race
    from loopus_core.models import model_parts

    parts = model_parts(model)
    blocks, head = race.candidates(rule), race.head_layers(parts)
    windows = 1
    while windows < len(batches) and race.work(batches[:windows + 1], blocks, parts.num_layers, head,
                                               heldout.WARMUP) <= work:
        windows += 1
    return windows


def tiny_setup(seed: int, vocab: int):
    """A random 10-layer Llama with confident predictions and 40 documents sampled from it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from loopus_analyze.corpus import TokenBatch

    torch.manual_seed(5)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=10,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    torch.manual_seed(100 + seed)
    ids = model.generate(torch.ones((40, 1), dtype=torch.long), do_sample=True, top_k=0, max_new_tokens=127,
                         min_new_tokens=127, pad_token_id=0, suppress_tokens=[0, 1, 2])
    batches = [TokenBatch(row[None], torch.ones_like(row[None]), torch.tensor([d]))
               for d, row in enumerate(ids)]
    return model, batches


def embedded_setup(seed: int, map_tokens: int, opened):
    from loopus_analyze import heldout
    from loopus_core.texts import load_texts

    texts = heldout.three_ways(load_texts(None), seed)
    return opened.model, heldout.windows(opened.tokenizer, texts.selection, map_tokens, seed + 11,
                                         "selection")


def main() -> None:
    import torch

    from loopus_analyze import heldout
    from loopus_analyze.rule import Rule

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--vocab", type=int, default=384)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--map-tokens", type=int, default=heldout.DEFAULT_MAP_TOKENS)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    opened = None
    if not args.tiny:
        from loopus_core.models import open_model

        opened = open_model(None)
    rows, full = [], None
    for seed in range(args.seeds):
        model, batches = (tiny_setup(seed, args.vocab) if args.tiny else
                          embedded_setup(seed, args.map_tokens, opened))
        rule = Rule.make(model.config.num_hidden_layers)
        raced, race = racing(model, rule, batches, args.map_tokens, seed)
        same = uniform(model, rule, batches, equal_work_windows(model, rule, batches, race.work))
        rows.append({"seed": seed, "race": raced, "uniform_equal_work": same})
        if seed == 0:
            full = uniform(model, rule, batches, race.final_windows)
        print(json.dumps(rows[-1]["race"]["pick"]), json.dumps(same["pick"]), flush=True)
    results = {
        "machine": machine(), "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": (f"tiny random Llama, 10 layers, vocabulary {args.vocab}" if args.tiny else
                  "embedded default"),
        "map_tokens": args.map_tokens, "seeds": rows, "uniform_at_map_tokens_seed0": full,
        "race_pick_equals_uniform_at_map_tokens_seed0": rows[0]["race"]["pick"] == full["pick"],
        "cpu_ratio_uniform_at_map_tokens_over_race_seed0":
            full["cpu_s"] / max(rows[0]["race"]["cpu_s"], 1e-9),
        "stability": {method: _stability([r[key]["pick"] for r in rows])
                      for method, key in (("race", "race"), ("uniform_equal_work", "uniform_equal_work"))},
        "tokens_of_the_pick": {"race": [r["race"]["contenders"].get(r["race"]["pick"]) for r in rows],
                               "uniform_equal_work": [r["uniform_equal_work"]["tokens_each"] for r in rows]},
    }
    out = Path(__file__).parent / "results" / ("bench_race_tiny.json" if args.tiny else "bench_race.json")
    if args.tiny and args.vocab != 384:
        out = out.with_name(f"bench_race_tiny_vocab{args.vocab}.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=_plain) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "seeds"}, indent=1, default=_plain))


def _stability(picks: list[str]) -> dict:
    common, count = Counter(picks).most_common(1)[0]
    return {"picks": picks, "most_common": common, "share": count / len(picks),
            "stable": count >= max(1, int(np.ceil(0.8 * len(picks))))}


def _plain(value):
    return value.item() if hasattr(value, "item") else str(value)


if __name__ == "__main__":
    main()

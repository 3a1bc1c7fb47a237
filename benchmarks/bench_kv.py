"""KV strategies of the loop block on the embedded default model: memory, decoding speed, and what they cost.

Side by side in one process, the base model and its looped conversion (default split 8:24, or a given looped
checkpoint, e.g. after a short RDS run), at K = 1, 4, 8, 16 loops:

1. cache bytes after the same greedy generation (prompt + new tokens), per strategy, over the base model's
   own ``DynamicCache`` for the same tokens (target for ``last``: <= 1.1x at every K);
2. decoding tokens/s of ``generate`` per strategy and of the base model, interleaved, fastest of the rounds;
   and the cost of the zero-shot ``kl`` exit's per-pass trial decode (a threshold that never stops: the
   overhead alone) against no exit at the same K;
3. the quality cost against ``full``: perplexity and top-1 agreement of teacher-forced token-by-token
   decoding (:func:`loopus_convert.measure.kv_strategy_stats`, what ``loopus eval --kv-strategy`` runs), and
   free-running greedy agreement (the share of generated tokens equal to ``full``'s at the same position,
   and the length of the identical prefix).

Run: HF_HUB_OFFLINE=1 python3 benchmarks/bench_kv.py [--checkpoint DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STRATEGIES = ("full", "last", "first")


def dynamic_cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def greedy(model, prompt: torch.Tensor, new: int, **kwargs):
    return model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        pad_token_id=0,
        return_dict_in_generate=True,
        **kwargs,
    )


def timed_greedy(model, prompt, new, **kwargs):
    start = time.perf_counter()
    out = greedy(model, prompt, new, **kwargs)
    return time.perf_counter() - start, out


def memory_and_speed(base, looped, prompt, loops, args) -> tuple[dict, dict]:
    """Cache bytes per (strategy, K) over the base's, and the fastest decoding time of each variant."""
    variants = {("base", 0): dict()}
    for k in loops:
        for strategy in STRATEGIES:
            variants[(strategy, k)] = dict(num_loops=k, kv_strategy=strategy)
        variants[("full+kl", k)] = dict(
            num_loops=k, max_loops=k, exit_strategy="kl", kl_threshold=1e-30, kv_strategy="full"
        )
    times = {key: [] for key in variants}
    held: dict[tuple[str, int], int] = {}
    greedy(base, prompt, 2)  # warm up
    greedy(looped, prompt, 2, num_loops=1)
    for _ in range(args.repeats):  # interleave every variant in each round
        for key, kwargs in variants.items():
            seconds, out = timed_greedy(
                base if key[0] == "base" else looped, prompt, args.new_tokens, **kwargs
            )
            times[key].append(seconds)
            cache = out.past_key_values
            held[key] = dynamic_cache_bytes(cache) if key[0] == "base" else cache.memory_bytes()
    fastest = {key: min(v) for key, v in times.items()}
    return held, fastest


def greedy_agreement(looped, prompts: torch.Tensor, loops, new: int) -> dict:
    """Per (strategy, K): share of greedy tokens equal to full's at the same position; identical prefix."""
    result = {}
    for k in loops:
        tokens = {
            s: greedy(looped, prompts, new, num_loops=k, kv_strategy=s).sequences[:, -new:]
            for s in STRATEGIES
        }
        for s in STRATEGIES:
            same = tokens[s] == tokens["full"]  # (B, new)
            prefix = torch.where(~same, torch.arange(new), torch.full_like(same, new, dtype=torch.long)).min(
                1
            )
            result[(s, k)] = (float(same.float().mean()), float(prefix.values.float().mean()))
    return result


def report(args, cfg, model_name, loops, held, fastest, quality, agreement, num_blocks) -> None:
    """The three markdown tables (memory and speed, the kl exit's overhead, quality against full)."""
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, {args.threads} "
        f"thread(s), load average {os.getloadavg()[0]:.1f}; model {model_name} (L={cfg.num_base_layers}), "
        f"split {cfg.split_start}:{cfg.split_end}, {args.checkpoint or 'converted, untrained'}"
    )
    print(
        f"memory and speed: 1 x {args.prompt_tokens}-token prompt + {args.new_tokens} greedy new tokens, "
        f"fastest of {args.repeats} interleaved rounds"
    )
    base_bytes, base_tps = held[("base", 0)], args.new_tokens / fastest[("base", 0)]
    print(f"base model: cache {base_bytes / 2**20:.2f} MiB, {base_tps:.1f} tokens/s")
    print("| K | strategy | cache MiB | cache / base | tokens/s | base / looped time |")
    print("|---|---|---:|---:|---:|---:|")
    for k in loops:
        for s in STRATEGIES:
            tps = args.new_tokens / fastest[(s, k)]
            print(
                f"| {k} | {s} | {held[(s, k)] / 2**20:.2f} | {held[(s, k)] / base_bytes:.2f} | {tps:.2f} | "
                f"{base_tps / tps:.2f} |"
            )
    print("kl exit's trial decode per pass (threshold 1e-30: never stops), full cache:")
    print("| K | tokens/s no exit | tokens/s kl | time kl / no exit |")
    print("|---|---:|---:|---:|")
    for k in loops:
        none, kl = fastest[("full", k)], fastest[("full+kl", k)]
        print(f"| {k} | {args.new_tokens / none:.2f} | {args.new_tokens / kl:.2f} | {kl / none:.2f} |")
    print(
        f"quality vs full: {num_blocks} corpus blocks of {args.block_size} tokens, teacher-forced token by "
        f"token after a {quality['prompt_tokens']}-token prompt ({quality['decoded_tokens']} predictions); "
        f"free-running greedy: {args.new_tokens} tokens from each block's first {args.prompt_tokens}"
    )
    print(
        "| K | strategy | perplexity | ppl / full | top-1 = full | greedy tokens = full | identical prefix |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    per = quality["strategies"]
    for k in loops:
        for s in STRATEGIES:
            row, ref = per[s][str(k)], per["full"][str(k)]
            same, prefix = agreement[(s, k)]
            print(
                f"| {k} | {s} | {row['ppl']:.2f} | {row['ppl'] / ref['ppl']:.3f} | {row['agreement']:.3f} | "
                f"{same:.3f} | {prefix:.1f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--split", default="8:24")
    parser.add_argument("--checkpoint", default=None, help="a looped checkpoint of the default model instead")
    parser.add_argument("--loops", default="1,4,8,16")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--blocks", type=int, default=4, help="corpus blocks for perplexity / agreement")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loopus_convert import convert_model, load_looped
    from loopus_convert.measure import kv_strategy_stats
    from loopus_core.models import default_model_dir
    from loopus_train.data import all_blocks

    model_dir = default_model_dir()
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if args.checkpoint:
        looped = load_looped(args.checkpoint)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            looped = load_looped(convert_model(str(model_dir), Path(tmp) / "looped", split=args.split).out)
    loops = [int(k) for k in args.loops.split(",")]
    blocks = all_blocks(tokenizer, None, block_size=args.block_size)[: args.blocks]
    prompt = blocks[:1, : args.prompt_tokens]
    started = time.time()
    with torch.no_grad():
        held, fastest = memory_and_speed(base, looped, prompt, loops, args)
        quality = kv_strategy_stats(looped, blocks, STRATEGIES, loops, batch_size=args.blocks)
        agreement = greedy_agreement(looped, blocks[:, : args.prompt_tokens], loops, args.new_tokens)
    report(args, looped.config, model_dir.name, loops, held, fastest, quality, agreement, len(blocks))
    print(f"{time.time() - started:.0f} s in all")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "held_bytes": {f"{s}@{k}": v for (s, k), v in held.items()},
                    "seconds": {f"{s}@{k}": v for (s, k), v in fastest.items()},
                    "quality": quality,
                    "greedy": {f"{s}@{k}": v for (s, k), v in agreement.items()},
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()

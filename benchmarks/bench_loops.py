"""Cost of K loops next to the layer-count prediction (A + K (B - A) + L - B) / L, embedded default model.

Measures, interleaved and repeated (median): (1) a forward pass over a batch at K loops over the same at one
loop (full logits, and last-position logits only, which leaves the lm_head out as in generation's prefill);
(2) cached greedy decoding tokens/s of the base model over the looped model at K loops. The base model and the
looped model run side by side in one process. Run: HF_HUB_OFFLINE=1 python3 benchmarks/bench_loops.py
``--model-type qwen3_moe`` (any causal-LM type) measures a small random model of that type instead (12 layers,
hidden 256), e.g. to check that an MoE's loops cost what the layer count predicts as a dense model's do;
``--json PATH`` writes the table.
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


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--split", default="4:26")
    parser.add_argument("--loops", default="1,2,4")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--model-type", default=None, help="a small random model of this type")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from loopus_convert import convert_model, load_looped
    from loopus_core.models import default_model_dir
    from loopus_core.split import LayerSplit

    work = tempfile.TemporaryDirectory()
    model_dir = (
        default_model_dir() if args.model_type is None else small_model(args.model_type, Path(work.name))
    )
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    num_layers = base.config.num_hidden_layers
    split = LayerSplit.parse(args.split, num_layers)
    with tempfile.TemporaryDirectory() as tmp:
        looped = load_looped(convert_model(str(model_dir), Path(tmp) / "looped", split=args.split).out)
    loops = [int(k) for k in args.loops.split(",")]
    top = min(40000, base.config.get_text_config().vocab_size)
    ids = torch.randint(100, top, (args.batch, args.length), generator=torch.Generator().manual_seed(0))
    prompt = ids[:1, :16]

    def forward(k: int, keep: int):
        return lambda: looped(ids, num_loops=k, logits_to_keep=keep)

    def decode(model, **kwargs):
        return lambda: model.generate(
            prompt,
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            do_sample=False,
            pad_token_id=0,
            **kwargs,
        )

    with torch.no_grad():
        for fn in [forward(1, 0), decode(base), decode(looped, num_loops=1)]:  # warm up
            fn()
        fwd = {(k, keep): [] for k in loops for keep in (0, 1)}
        dec = {k: [] for k in ["base", *loops]}
        for _ in range(args.repeats):  # interleave every variant in each round
            for k in loops:
                for keep in (0, 1):
                    fwd[(k, keep)].append(timed(forward(k, keep)))
                dec[k].append(timed(decode(looped, num_loops=k)))
            dec["base"].append(timed(decode(base)))
    # the minimum over rounds: the least disturbed by other processes on the machine
    med = {key: min(v) for key, v in fwd.items()}
    dmed = {key: min(v) for key, v in dec.items()}
    layer_params = sum(p.numel() for p in looped.layers[0].parameters())
    head_params = base.get_output_embeddings().weight.numel()
    rows = []
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
        f"{args.threads} thread(s); model {model_dir.name} (L={num_layers}), split {split}, "
        f"fastest of {args.repeats} interleaved rounds"
    )
    print(
        f"forward: batch {args.batch} x {args.length} tokens; decoding: 1 x 16-token prompt + "
        f"{args.new_tokens} new tokens (greedy, cached)"
    )
    print(
        "| K | predicted (A+K(B-A)+L-B)/L | same + lm_head cost | forward K/1 (full logits) |"
        " forward K/1 (last logits) | base tok/s | looped tok/s | base/looped |"
    )
    print("|---|---|---|---|---|---|---|---|")
    base_tps = args.new_tokens / dmed["base"]
    for k in loops:
        predicted = split.layers_at(k) / num_layers
        with_head = (split.layers_at(k) * layer_params + head_params) / (
            num_layers * layer_params + head_params
        )
        tps = args.new_tokens / dmed[k]
        rows.append(
            dict(
                loops=k,
                predicted=predicted,
                forward_full=med[(k, 0)] / med[(1, 0)],
                forward_last=med[(k, 1)] / med[(1, 1)],
                base_over_looped_decoding=base_tps / tps,
            )
        )
        print(
            f"| {k} | {predicted:.2f} | {with_head:.2f} | {med[(k, 0)] / med[(1, 0)]:.2f} | "
            f"{med[(k, 1)] / med[(1, 1)]:.2f} | "
            f"{base_tps:.1f} | {tps:.1f} | {base_tps / tps:.2f} |"
        )
    print(
        f"absolute: forward at K=1 {med[(1, 0)] * 1000:.0f} ms (full logits), {med[(1, 1)] * 1000:.0f} ms "
        f"(last logits); base decoding {dmed['base']:.2f} s, looped K=1 decoding {dmed[1]:.2f} s"
    )
    if args.json is not None:
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"settings": settings, "model": model_dir.name, "rows": rows}, indent=1)
        )
    work.cleanup()


def small_model(model_type: str, root: Path) -> Path:
    """A small random model of ``model_type`` (12 layers, hidden 256) saved under ``root``."""
    from transformers import AutoModelForCausalLM

    from loopus_convert.support import tiny_config

    config = tiny_config(
        model_type,
        num_hidden_layers=12,
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=32,
        vocab_size=4096,
        moe_intermediate_size=256,
    )
    torch.manual_seed(0)
    path = root / model_type
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    return path


if __name__ == "__main__":
    main()

"""Trainer benchmarks: memory flat in the loop-step count, cost per supervised pass, tokens/s.

Measured on the embedded default model (SmolLM2-135M-Instruct, or ``--base`` another base model
directory) converted at 4:26 (loop block of 22 layers), trainable parts as the default recipe (loop, gate,
decoder, head), fp32 on CPU with one intra-op thread, or on ``--device cuda`` (``--precision bf16``
autocasts).

1. Peak memory of one training step (RDS, state detached between steps) at 16 loop steps over 2 loop steps,
   next to full backpropagation through all steps (no detach): on CPU each in a fresh subprocess, the peak
   RSS during the step above the RSS before it (Linux VmHWM after a clear_refs reset), and the bytes autograd
   saved; on a GPU the peak allocated memory during the step (``torch.cuda.max_memory_allocated``).
2. Time per supervised loop pass (loop pass + decoder + losses + backward) against a plain transformers
   forward+backward of the base model with the same layers trainable, interleaved, median of repeats.
3. Tokens/s of a default-recipe training step (20 loop steps, 5 supervised).

Usage: HF_HUB_OFFLINE=1 python benchmarks/bench_train.py [--block-size 64] [--batch-size 1]
       python benchmarks/bench_train.py --device cuda --precision bf16 --block-size 1024 --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PARTS = ("loop", "gate", "decoder", "head")


def converted_default(root: Path, base: Path | None = None) -> Path:
    """``base`` (default: the embedded default model) converted at 4:26 under ``root`` (once)."""
    from loopus_convert import convert_model
    from loopus_core.models import default_model_dir

    out = root / ("smol-4-26" if base is None else f"{Path(base).name}-4-26")
    if not (out / "config.json").is_file():
        convert_model(str(base or default_model_dir()), out, split="4:26")
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def full_bptt(model, ids, steps: list[int]) -> None:
    """The same losses as RDS, but one graph through every loop step (no detach), one backward."""
    from loopus_convert.measure import next_token_ce as lm_loss

    ctx = model.prepare(ids)
    with torch.no_grad():
        h = model.encode(ctx)
    total, prev = 0.0, None
    for t in range(1, max(steps) + 1):
        if t in steps and prev is None:
            with torch.no_grad():
                prev, _ = lm_loss(model.decode(h, ctx), ids)
        h = model.loop_step(h, ctx)
        if t in steps:
            ce, correct = lm_loss(model.decode(h, ctx), ids)
            bce = F.binary_cross_entropy_with_logits(model.confidence_logit(h, ctx).float(), correct)
            total = total + ce + F.silu(ce - prev) + bce
            prev = ce.detach()
        else:
            prev = None
    (total / len(steps)).backward()


def child_memory(ckpt: Path, mode: str, loop_steps: int, block: int, batch: int) -> dict:
    """One training step in this (fresh) process: peak RSS above the start, and autograd's saved bytes."""
    from loopus_convert import load_looped
    from loopus_train.optim import select_trainable
    from loopus_train.rds import rds_micro_batch

    torch.set_num_threads(1)
    model = load_looped(ckpt)
    select_trainable(model, PARTS)
    model.train()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (batch, block), generator=gen)
    steps = [loop_steps - 1, loop_steps] if loop_steps > 1 else [1]  # the last step is supervised: all run
    saved = 0
    seen = {p.untyped_storage().data_ptr() for p in model.parameters()}  # weights (and their views) are not

    def pack(t):  # activations: each storage counted once
        nonlocal saved
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            saved += t.untyped_storage().nbytes()
        return t

    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
    before = _rss("VmRSS")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if mode == "rds":
            rds_micro_batch(model, ids, steps, scale=1 / len(steps))
        else:
            full_bptt(model, ids, steps)
    return {"peak_bytes": _rss("VmHWM") - before, "saved_bytes": saved}


def gpu_memory(ckpt: Path, mode: str, loop_steps: int, block: int, batch: int, amp) -> dict:
    """One training step on the GPU: the peak allocated memory above what the model and its state hold."""
    from loopus_convert import load_looped
    from loopus_train.optim import select_trainable
    from loopus_train.rds import rds_micro_batch

    device = torch.device("cuda")
    model = load_looped(ckpt).to(device)
    select_trainable(model, PARTS)
    model.train()
    ids = torch.randint(3, model.config.vocab_size, (batch, block), device=device)
    steps = [loop_steps - 1, loop_steps] if loop_steps > 1 else [1]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=amp or torch.float32, enabled=amp is not None):
        if mode == "rds":
            rds_micro_batch(model, ids, steps, scale=1 / len(steps), autocast_dtype=amp)
        else:
            full_bptt(model, ids, steps)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del model
    torch.cuda.empty_cache()
    return {"peak_bytes": peak, "saved_bytes": 0}


def memory_table(ckpt: Path, block: int, batch: int, device: torch.device, amp=None) -> dict:
    if device.type == "cuda":
        return {
            f"{mode}-{k}": gpu_memory(ckpt, mode, k, block, batch, amp)
            for mode in ("rds", "full")
            for k in (2, 16)
        }
    results = {}
    for mode in ("rds", "full"):
        for loop_steps in (2, 16):
            cmd = [
                sys.executable,
                __file__,
                "--child",
                mode,
                str(loop_steps),
                str(ckpt),
                "--block-size",
                str(block),
                "--batch-size",
                str(batch),
            ]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
            results[f"{mode}-{loop_steps}"] = json.loads(out.strip().splitlines()[-1])
    return results


def time_per_pass(
    ckpt: Path, base_dir: Path, block: int, batch: int, repeats: int, device: torch.device, amp=None
) -> dict:
    """Median seconds of one supervised RDS pass vs one plain HF forward+backward (same trainable layers)."""
    from transformers import AutoModelForCausalLM

    from loopus_convert import load_looped
    from loopus_train.optim import select_trainable
    from loopus_train.rds import rds_micro_batch

    looped = load_looped(ckpt).to(device)
    select_trainable(looped, PARTS)
    looped.train()
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(device)
    base.requires_grad_(False)
    for i in range(4, base.config.num_hidden_layers):  # what the looped model trains
        base.model.layers[i].requires_grad_(True)
    base.model.norm.requires_grad_(True)
    base.lm_head.requires_grad_(True)
    base.train()
    ids = torch.randint(3, base.config.vocab_size, (batch, block), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    passes = 4
    ours, ref = [], []
    for rep in range(repeats + 1):  # the first round warms up
        looped.zero_grad(set_to_none=True)
        _sync(device)
        t = time.perf_counter()
        rds_micro_batch(looped, ids, list(range(1, passes + 1)), scale=1 / passes, autocast_dtype=amp)
        _sync(device)
        a = (time.perf_counter() - t) / passes
        base.zero_grad(set_to_none=True)
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = base(ids, labels=ids).loss
        loss.backward()
        _sync(device)
        b = time.perf_counter() - t
        if rep:
            ours.append(a)
            ref.append(b)
    return {
        "ours_s": statistics.median(ours),
        "transformers_s": statistics.median(ref),
        "ratio": statistics.median(ours) / statistics.median(ref),
        "repeats": repeats,
    }


def tokens_per_second(ckpt: Path, block: int, batch: int, device: torch.device, amp=None) -> dict:
    """One default-recipe optimizer update (20 loop steps, 5 supervised) with AdamW, timed after a warm-up."""
    from loopus_convert import load_looped
    from loopus_train.config import TrainConfig
    from loopus_train.optim import build_optimizer, select_trainable
    from loopus_train.rds import draw_supervised_steps, rds_micro_batch

    model = load_looped(ckpt).to(device)
    named = select_trainable(model, PARTS)
    model.train()
    opt, _ = build_optimizer(named, TrainConfig(checkpoint="", out=""), device)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (batch, block), generator=gen).to(device)
    times = []
    for update in range(3):
        steps = draw_supervised_steps(0, update, 0, 20, 5)
        _sync(device)
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        rds_micro_batch(model, ids, steps, scale=1 / 5, autocast_dtype=amp)
        torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
        opt.step()
        _sync(device)
        times.append((time.perf_counter() - t, max(steps)))
    measured = times[1:]
    seconds = statistics.mean(t for t, _ in measured)
    return {
        "tokens_per_s": batch * block / seconds,
        "seconds_per_update": seconds,
        "loop_steps_run": [s for _, s in measured],
        "tokens_per_update": batch * block,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=3, metavar=("MODE", "LOOP_STEPS", "CKPT"))
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "loopus-bench"))
    parser.add_argument("--base", default=None, help="base model directory (default: the embedded default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    args = parser.parse_args()
    if args.child:
        mode, loop_steps, ckpt = args.child
        print(json.dumps(child_memory(Path(ckpt), mode, int(loop_steps), args.block_size, args.batch_size)))
        return
    from loopus_core.models import default_model_dir

    device = torch.device(args.device)
    amp = torch.bfloat16 if args.precision == "bf16" else None
    if device.type == "cpu":
        torch.set_num_threads(1)
    base = Path(args.base) if args.base else default_model_dir()
    ckpt = converted_default(Path(args.work), Path(args.base) if args.base else None)
    mem = memory_table(ckpt, args.block_size, args.batch_size, device, amp)
    mib = {k: round(v["peak_bytes"] / 2**20, 1) for k, v in mem.items()}
    saved = {k: round(v["saved_bytes"] / 2**20, 1) for k, v in mem.items()}
    report = {
        "machine": (
            f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, {args.precision}"
            if device.type == "cuda"
            else f"{os.cpu_count()} CPUs, torch {torch.__version__}, 1 intra-op thread, fp32"
        ),
        "block_size": args.block_size,
        "batch_size": args.batch_size,
        "peak_mib": mib,
        "saved_activation_mib": saved,
        "rds_peak_ratio_16_over_2": mem["rds-16"]["peak_bytes"] / mem["rds-2"]["peak_bytes"],
        "full_peak_ratio_16_over_2": mem["full-16"]["peak_bytes"] / mem["full-2"]["peak_bytes"],
        "time_per_supervised_pass": time_per_pass(
            ckpt, base, args.block_size, args.batch_size, args.repeats, device, amp
        ),
        "default_recipe": tokens_per_second(ckpt, args.block_size, args.batch_size, device, amp),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

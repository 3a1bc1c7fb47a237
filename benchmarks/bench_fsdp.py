"""FSDP2 benchmark: per-rank memory of parameters + gradients + optimizer state, 2 ranks over 1 process.

Runs the real trainer (``loopus_train.train.train``) on the embedded default model converted at 4:26 (loop,
gate, decoder and head trained, fp32, CPU, gloo) for two updates, once in one process and once under
``torchrun --nproc-per-node 2``, and counts on every rank the bytes of what that rank holds (its shards of
DTensors, the whole tensors otherwise):

* after the second update: parameters, gradients (reduce-scattered) and AdamW state (exp_avg, exp_avg_sq);
* just before the second update's last backward pass, where the unsharded gradients of the earlier backward
  passes wait for the single synchronisation of the update (``set_requires_gradient_sync``): parameters,
  accumulated unsharded gradients and AdamW state. This is the cost of syncing once per update.

Also the process's peak RSS (VmHWM), which includes activations and the Python / torch runtime.

Usage: HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/bench_fsdp.py [--block-size 64]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _local_bytes(tensor) -> int:
    if tensor is None:
        return 0
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def _optimizer_bytes(optimizer) -> int:
    return sum(_local_bytes(v) for s in optimizer.state.values() for v in s.values() if hasattr(v, "numel"))


def _accumulated_grad_bytes(model) -> int:
    """Unsharded gradients FSDP keeps between backward passes without synchronisation (FSDP internals)."""
    from torch.distributed.fsdp import FSDPModule

    total = 0
    for module in model.modules():
        if isinstance(module, FSDPModule):
            for group in module._get_fsdp_state()._fsdp_param_groups:
                for param in group.fsdp_params:  # fp32: kept as the unsharded parameter's .grad
                    accumulated = param.unsharded_accumulated_grad
                    if accumulated is None and hasattr(param, "_unsharded_param"):
                        accumulated = param._unsharded_param.grad
                    total += _local_bytes(accumulated)
    return total


def _hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(args) -> None:
    """One rank (or the one process) of the measured run; writes its numbers to ``args.record``-RANK.json."""
    import torch

    from loopus_train import train as train_module
    from loopus_train.config import TrainConfig

    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    seen: dict = {"update": 0}
    real_sync, real_clip = train_module.gradient_sync, train_module.clip_gradients

    def sync(model, dist, enabled):
        if enabled and seen["update"] == 1:  # before the second update's last backward pass
            optimizer = seen["optimizer"]
            seen["before_sync"] = {
                "params": sum(_local_bytes(p) for p in model.parameters()),
                "accumulated_grads": _accumulated_grad_bytes(model),
                "optimizer": _optimizer_bytes(optimizer),
            }
        return real_sync(model, dist, enabled)

    def clip(params, max_norm):
        seen["update"] += 1
        return real_clip(params, max_norm)

    def save(out, model, tokenizer, state, *rest):  # measure instead of writing a checkpoint
        grads = sum(_local_bytes(p.grad) for p in model.parameters() if p.grad is not None)
        seen["after_update"] = {
            "params": sum(_local_bytes(p) for p in model.parameters()),
            "grads": grads,
            "optimizer": _optimizer_bytes(state.optimizer),
        }
        return Path(out) / "not-written"

    real_build = train_module.build_optimizer

    def build(named, cfg, device):
        optimizer, names = real_build(named, cfg, device)
        seen["optimizer"] = optimizer
        return optimizer, names

    train_module.gradient_sync, train_module.clip_gradients = sync, clip
    train_module.save_checkpoint, train_module.build_optimizer = save, build
    cfg = TrainConfig(
        checkpoint=args.ckpt,
        out=str(Path(args.out) / f"run-{os.environ.get('WORLD_SIZE', '1')}"),
        block_size=args.block_size,
        batch_size=2,
        grad_accum=2,
        steps=2,
        loop_steps=4,
        supervised=2,
        eval_every=1000,
        save_every=1000,
        device="cpu",
    )
    train_module.train(cfg)
    seen.pop("optimizer")
    seen["peak_rss_mib"] = _hwm_mib()
    Path(f"{args.record}-{rank}.json").write_text(json.dumps(seen))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--ckpt")
    parser.add_argument("--out")
    parser.add_argument("--record")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "loopus-bench"))
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    from bench_train import converted_default

    work = Path(args.work)
    ckpt = converted_default(work)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    results = {}
    for world in (1, 2):
        out = Path(tempfile.mkdtemp(dir=work, prefix=f"fsdp-{world}-"))
        record = out / "record"
        script = [__file__, "--child", "--ckpt", str(ckpt), "--out", str(out), "--record", str(record)]
        script += ["--block-size", str(args.block_size)]
        launcher = (
            ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"] if world == 2 else []
        )
        subprocess.run(
            [sys.executable, *launcher, *script], env=env, check=True, capture_output=True, text=True
        )
        results[world] = [json.loads((out / f"record-{r}.json").read_text()) for r in range(world)]
    mib = 2**20

    def total(entry, keys):
        return sum(entry[k] for k in keys)

    after_keys, before_keys = ("params", "grads", "optimizer"), ("params", "accumulated_grads", "optimizer")
    one, two = results[1][0], results[2]
    report = {
        "one_process_mib": {k: round(v / mib, 1) for k, v in one["after_update"].items()},
        "two_ranks_mib": [{k: round(v / mib, 1) for k, v in r["after_update"].items()} for r in two],
        "after_update_ratio": max(total(r["after_update"], after_keys) for r in two)
        / total(one["after_update"], after_keys),
        "before_sync_one_process_mib": round(
            (one["after_update"]["params"] + one["after_update"]["grads"] + one["after_update"]["optimizer"])
            / mib,
            1,
        ),
        "before_sync_two_ranks_mib": [
            {k: round(v / mib, 1) for k, v in r["before_sync"].items()} for r in two
        ],
        "before_sync_ratio": max(total(r["before_sync"], before_keys) for r in two)
        / total(one["after_update"], after_keys),
        "peak_rss_mib": {"one": round(one["peak_rss_mib"]), "two": [round(r["peak_rss_mib"]) for r in two]},
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

"""Run ``loopus ARGS`` in this process (also under torchrun) and record, at every update's gradient clipping,
the full gradient norm of each trained parameter and how many gradient reductions FSDP ran since the last
update (RECORD.json), and the whole gradient vector of each update, every trained parameter's full gradient
flattened and concatenated in parameter order (RECORD.json.pt, a list of float32 tensors): the seam of the
engine tests (no test hook lives in the trainer itself).

    python tests/train/fsdp_driver.py RECORD.json finetune CKPT --out RUN ...
    torchrun --nproc-per-node 2 tests/train/fsdp_driver.py RECORD.json finetune CKPT --out RUN ...
"""

from __future__ import annotations

import json
import os
import sys

import torch


def main() -> None:
    record_path = sys.argv[1]
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group as group

    from loopus_train import train as train_module

    reductions = {"count": 0}
    real_reduce = group.foreach_reduce

    def counting_reduce(*args, **kwargs):
        reductions["count"] += 1
        return real_reduce(*args, **kwargs)

    group.foreach_reduce = counting_reduce
    updates, vectors = [], []
    real_clip = train_module.clip_gradients

    def recording_clip(params, max_norm):
        norms, parts = [], []
        for p in params:
            grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            norms.append(float(grad.norm()) if grad is not None else None)
            parts.append(
                torch.zeros(p.shape).flatten() if grad is None else grad.detach().float().cpu().flatten()
            )
        updates.append({"reductions": reductions["count"], "grad_norms": norms})
        vectors.append(torch.cat(parts))
        reductions["count"] = 0
        return real_clip(params, max_norm)

    train_module.clip_gradients = recording_clip
    from loopus.cli import main as cli

    sys.argv = ["loopus", *sys.argv[2:]]
    try:
        cli()
    finally:
        if os.environ.get("RANK", "0") == "0":
            with open(record_path, "w") as fh:
                json.dump(updates, fh)
            torch.save(vectors, record_path + ".pt")


if __name__ == "__main__":
    main()

"""The depth task's arms through the product: ``loopus convert`` + ``loopus finetune`` on answer labels.

Every arm is the pretrained chain model converted by :func:`loopus_convert.convert.convert_model` (what
``loopus convert`` calls) and fine-tuned by :func:`loopus_train.train.train` with a
:class:`loopus_train.config.TrainConfig` (what ``loopus finetune`` calls) on a JSONL file of pre-tokenised
``input_ids`` / ``labels`` records of the training split (labels on the answers only, :meth:`Codec.record`).
The trainer packs the records whole, several to a block (position ids restart per record, so each record
attends only to itself), and runs RDS on the answer labels:

    RDS arm (gate residual or official):  --loop-steps 4 --supervised 2 --train loop,gate,decoder,head
    plain arm (the converted model at one loop = the base):  --loop-steps 1 --supervised 1 --beta 0
        --conf-weight 0 --train loop,decoder  (the same layers as RDS, minus gate and head)

Compute units: real tokens x layer passes, 1 per pass without grad and 3 per pass with forward + backward
(the encoder is frozen: one pass without grad). RDS's passes follow the supervised steps the trainer draws
(:func:`loopus_train.rds.draw_supervised_steps`, a pure function of seed and update), so an RDS run's
compute is counted exactly and the plain arm at equal compute runs as many updates as spend it. A seed sets
the trainer's ``--seed`` (data order, supervised-step draws) and the torch seed of the conversion (the
gate's random init); the pretrained model is shared by every seed.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from loopus_train.config import TrainConfig
from loopus_train.rds import draw_supervised_steps

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneSettings:
    """The fine-tuning of every arm (defaults: the recorded run)."""

    split: str = "1:5"
    gates: tuple[str, ...] = ("residual", "official")
    parts: tuple[str, ...] = ("loop", "gate", "decoder", "head")
    plain_parts: tuple[str, ...] = ("loop", "decoder")
    depths: tuple[int, ...] = (0, 1, 2, 3, 4, 5)
    deep: int = 2
    steps: int = 150  # RDS updates (the research protocol had 400: the budget fits 3 seeds in an hour)
    records_per_block: int = 4
    blocks: int = 16  # blocks per update: 64 programs
    lr: float = 1e-3
    plain_lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3)
    min_lr_ratio: float = 0.1
    wd: float = 0.01
    warmup: int = 15
    loop_steps: int = 4
    supervised: int = 2
    beta: float = 1.0
    conf_weight: float = 1.0
    seeds: tuple[int, ...] = (1, 2, 3)
    held_out: float = 0.01  # the trainer's own held-out records (training-split programs)

    @property
    def programs_per_update(self) -> int:
        return self.records_per_block * self.blocks


def write_records(path: Path, records: list[dict], keys: tuple[str, ...] = ("input_ids", "labels")) -> Path:
    """``records`` as JSONL with only ``keys`` (the trainer's pre-tokenised format by default)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps({k: r[k] for k in keys}) + "\n")
    return path


def layer_counts(split: str, layers: int) -> tuple[int, int, int]:
    """(encoder, loop block, decoder) layer counts of ``A:B`` in a model of ``layers`` layers."""
    a, b = (int(x) for x in split.split(":"))
    return a, b - a, layers - b


def rds_units(s: FinetuneSettings, seed: int, steps: int, tokens: int, counts: tuple[int, int, int]) -> float:
    """Compute units of an RDS run of ``steps`` updates of ``tokens`` real tokens (see the module
    docstring): the encoder once, unsupervised passes 1, the previous-CE decoder pass 1, supervised 3."""
    n_enc, n_loop, n_dec = counts
    total = 0.0
    for update in range(steps):
        sup = set(draw_supervised_steps(seed, update, 0, s.loop_steps, s.supervised))
        units, known = n_enc, False
        for step in range(1, max(sup) + 1):
            if step not in sup:
                units, known = units + n_loop, False
                continue
            units += (0 if known or s.beta == 0 else n_dec) + 3 * (n_loop + n_dec)
            known = True
        total += units * tokens
    return total


def plain_units_per_update(tokens: int, counts: tuple[int, int, int]) -> float:
    """Compute units of one plain update (one loop pass, encoder frozen)."""
    n_enc, n_loop, n_dec = counts
    return float(tokens * (n_enc + 3 * (n_loop + n_dec)))


def convert_arm(base_dir: Path, out: Path, split: str, gate: str, seed: int) -> Path:
    """``loopus convert base_dir --split split --gate-init gate --out out`` with torch seeded by ``seed``."""
    from loopus_convert.convert import convert_model

    torch.manual_seed(seed)
    convert_model(str(base_dir), out, split=split, gate_init=gate, dtype="float32", force=True)
    return out


def train_config(ckpt: Path, out: Path, data: Path, s: FinetuneSettings, arm: dict) -> TrainConfig:
    """The ``loopus finetune`` settings of one arm (``arm``: mode, lr, steps, seed)."""
    rds = arm["mode"] == "rds"
    return TrainConfig(
        checkpoint=str(ckpt),
        out=str(out),
        data=str(data),
        block_size=s.records_per_block * arm["record_len"],
        batch_size=s.blocks,
        steps=arm["steps"],
        lr=arm["lr"],
        min_lr=s.min_lr_ratio * arm["lr"],
        warmup=min(s.warmup, max(0, arm["steps"] - 1)),
        weight_decay=s.wd,
        adam_beta2=0.98,
        loop_steps=s.loop_steps if rds else 1,
        supervised=s.supervised if rds else 1,
        beta=s.beta if rds else 0.0,
        conf_weight=s.conf_weight if rds else 0.0,
        train_parts=s.parts if rds else s.plain_parts,
        precision="fp32",
        seed=arm["seed"],
        held_out=s.held_out,
        eval_every=arm["steps"],
        eval_blocks=2,
        eval_loops=(1,),
        save_every=arm["steps"],
        keep=1,
        device="cpu",
        data_workers=1,
    )


def run_arm(base_dir: Path, work: Path, data: Path, s: FinetuneSettings, arm: dict) -> dict:
    """Convert and fine-tune one arm into ``work``; its record (settings, updates, tokens, units, wall
    time, the trainer's last CE) with the trained checkpoint's path."""
    from loopus_train.train import train

    gate = arm.get("gate", "residual")
    t0 = time.time()
    ckpt = convert_arm(base_dir, work / "converted", s.split, gate, arm["seed"])
    cfg = train_config(ckpt, work / "run", data, s, arm)
    seen: list[dict] = []
    result = train(cfg, argv=["benchmarks.evidence"], callback=lambda e: seen.append(e))
    steps = [e for e in seen if e.get("event") == "step"]
    return {
        **arm,
        "config": cfg.identity(),
        "checkpoint": str(result.checkpoint),
        "programs": arm["steps"] * s.programs_per_update,
        "tokens": arm["steps"] * s.programs_per_update * arm["record_len"],
        "wall_s": round(time.time() - t0, 1),
        "last_ce": steps[-1]["ce"] if steps else None,
        "trained": list(cfg.train_parts),
    }

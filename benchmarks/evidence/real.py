"""Part 2 of the evidence: the real model fine-tuned with ``loopus finetune`` (its Python API), per row.

Rows: RDS at the split ``loopus analyze`` recommends, at the paper-style split (2 encoder layers, 1 decoder
layer: ``2:L-1``) and at the old CKA-only recommendation 11:21; the base model; the base fine-tuned plainly
on the same tokens (one loop, every layer trained, ``--loop-steps 1 --supervised 1``). Every row trains on
the same number of updates x sequences x tokens of the same data and is evaluated on the trainer's own
held-out documents: perplexity at K = 1, 2, 4, 8 and under the confidence-head exit. Tokens, layer passes
and wall time are measured per row.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.evidence.damped import recommended_split
from benchmarks.evidence.heldout import held_out_blocks
from loopus_convert import convert_model, load_looped
from loopus_convert.measure import early_exit_stats, loss_per_loops
from loopus_train.config import TrainConfig
from loopus_train.train import train

log = logging.getLogger(__name__)

PLAIN_PARTS = ("encoder", "loop", "decoder")


@dataclass
class RealSettings:
    """The budget per row and the evaluation."""

    model: str | None = None  # None: the embedded default model
    analysis_dir: Path | None = None  # where ``loopus analyze`` of the model is cached (shared with damped)
    analyze_tokens: int | None = None
    analyze_probes: bool = True
    splits: tuple[str, ...] = ("auto", "paper", "11:21")
    updates: int = 32  # the recorded results/real.json
    batch: int = 1
    block_size: int = 64
    lr: float = 1e-4
    loop_steps: int = 4
    supervised: int = 2
    eval_loops: tuple[int, ...] = (1, 2, 4, 8)
    thresholds: tuple[float, ...] = (0.6, 0.9)
    eval_blocks: int = 2
    eval_block_size: int = 128
    with_plain: bool = True


def resolve(split: str, num_layers: int, s: RealSettings, work: Path) -> tuple[str, str | None]:
    """(split, analysis path) for convert_model: ``paper`` is ``2:L-1``, ``auto`` the analysis' pick."""
    if split == "paper":
        return f"2:{num_layers - 1}", None
    if split == "auto":
        rec = recommended_split(s.model, s.analysis_dir or work, s.analyze_tokens, s.analyze_probes)
        return rec["split"], None
    return split, None


def train_row(s: RealSettings, checkpoint: Path, out: Path, plain: bool) -> dict:
    """``loopus finetune`` of one converted checkpoint; its tokens and wall time."""
    cfg = TrainConfig(
        checkpoint=str(checkpoint),
        out=str(out),
        block_size=s.block_size,
        batch_size=s.batch,
        steps=s.updates,
        lr=s.lr,
        min_lr=0.1 * s.lr,
        warmup=max(1, s.updates // 10),
        loop_steps=1 if plain else s.loop_steps,
        supervised=1 if plain else s.supervised,
        train_parts=PLAIN_PARTS if plain else TrainConfig.train_parts,
        eval_every=s.updates,
        eval_blocks=1,
        eval_loops=(1,),
        eval_thresholds=(0.9,),
        save_every=s.updates,
        keep=1,
        device="cpu",
        precision="fp32",
        data_workers=1,
    )
    t0 = time.time()
    result = train(cfg, argv=["benchmarks.evidence"])
    return {
        "checkpoint": str(result.checkpoint),
        "updates": s.updates,
        "tokens": s.updates * s.batch * s.block_size,
        "train_wall_s": round(time.time() - t0, 1),
        "loop_steps": cfg.loop_steps,
        "supervised": cfg.supervised,
        "parts": list(cfg.train_parts),
    }


def evaluate_row(path: str, blocks: torch.Tensor, s: RealSettings, loops: tuple[int, ...]) -> dict:
    """Held-out perplexity per K and under the confidence exit (at most max(loops) passes)."""
    model = load_looped(path)
    t0 = time.time()
    per = loss_per_loops(model, blocks, loops, batch_size=4)
    row = {"ppl": {k: v["ppl"] for k, v in per["loops"].items()}, "calibration": per["calibration"]}
    if max(loops) > 1:
        exits = early_exit_stats(model, blocks, s.thresholds, max_loops=max(loops), batch_size=4)
        row["exit"] = exits["thresholds"]
    row["eval_wall_s"] = round(time.time() - t0, 1)
    return row


def run_real(s: RealSettings, work: Path) -> dict:
    """Convert, fine-tune and evaluate every row (see the module docstring)."""
    from transformers import AutoConfig, AutoTokenizer

    from loopus_core.models import default_model_dir

    work.mkdir(parents=True, exist_ok=True)
    source = s.model or str(default_model_dir())
    layers = AutoConfig.from_pretrained(source).num_hidden_layers
    blocks = held_out_blocks(AutoTokenizer.from_pretrained(source), None, s.eval_block_size, s.eval_blocks)
    out = {"model": source, "eval_tokens": blocks.shape[0] * (blocks.shape[1] - 1), "rows": {}}
    for split in s.splits:
        name, analysis = resolve(split, layers, s, work)
        same = [k for k, v in out["rows"].items() if v["split"] == name]
        if same:  # a fixed split the analysis recommends too: one row
            out["rows"][same[0]]["from"] += f", {split}"
            continue
        conv = convert_model(s.model, work / f"conv_{split}", split=name, analysis=analysis, force=True)
        row = {"split": f"{conv.split.start}:{conv.split.end}", "from": split}
        row["train"] = train_row(s, work / f"conv_{split}", work / f"run_{split}", plain=False)
        row.update(evaluate_row(row["train"]["checkpoint"], blocks, s, s.eval_loops))
        out["rows"][f"rds {split}"] = row
    base_conv = work / "conv_base"
    convert_model(s.model, base_conv, split=f"1:{layers - 1}", force=True)
    out["rows"]["base"] = {"split": "-", **evaluate_row(str(base_conv), blocks, s, (1,))}
    if s.with_plain:
        row = {"split": "-", "train": train_row(s, base_conv, work / "run_plain", plain=True)}
        row.update(evaluate_row(row["train"]["checkpoint"], blocks, s, (1,)))
        out["rows"]["plain"] = row
    return out

"""Part 3 of the evidence: looping without training (the training-free looped transformers baseline).

The default model is converted at a split with the identity gate, so one loop pass is exactly the block
``f``. A fixed damped update replaces the gate:

    h_{k} = h_{k-1} + a * (f(h_{k-1}) - h_{k-1}),   k = 1..K

(``a = 1`` is plain looping, ``K = 1, a = 1`` the base model). Held-out perplexity per (split, K, a) against
the base model's on the same blocks. ``f`` is the model's own ``loop_step`` (identity gate: Abar = 1 in fp32).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.evidence.heldout import held_out_blocks
from loopus_convert import loop_base_model
from loopus_convert.measure import next_token_ce
from loopus_core.models import default_model_dir

log = logging.getLogger(__name__)


@dataclass
class DampedSettings:
    """Splits (``auto`` = the one ``loopus analyze`` recommends), loop counts, damping factors, eval text."""

    model: str | None = None  # None: the embedded default model
    splits: tuple[str, ...] = ("auto", "11:21")
    loops: tuple[int, ...] = (1, 2, 3, 4)
    alphas: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    block_size: int = 256
    max_blocks: int = 4  # 1020 held-out tokens: eval-only, but ~10 min per split on a loaded 2-core CPU
    batch_size: int = 4
    analyze_tokens: int | None = None  # None: analyze's default budget
    analyze_probes: bool = True


def recommended_split(model: str | None, work: Path, tokens: int | None, probes: bool) -> dict:
    """``loopus analyze`` of ``model`` (cached in ``work/analysis``): its split, confidence and reason."""
    import json

    from loopus_analyze.analyze import run_analysis

    cached = work / "analysis" / "analysis.json"
    if not cached.exists():
        run_analysis(model, out=work / "analysis", tokens=tokens, device="cpu", probes=probes)
    record = json.loads(cached.read_text())
    return {"split": record["split"], "confidence": record.get("confidence"), "path": str(cached)}


@torch.no_grad()
def damped_ppl(
    looped, blocks: torch.Tensor, loops: tuple[int, ...], alphas: tuple[float, ...], batch: int
) -> dict:
    """Perplexity per (a, K): ``{a: {K: ppl}}`` over ``blocks`` (N, T)."""
    sums = {a: dict.fromkeys(loops, 0.0) for a in alphas}
    for start in range(0, len(blocks), batch):
        ids = blocks[start : start + batch]
        ctx = looped.prepare(ids)
        h0 = looped.encode(ctx)
        for a in alphas:
            h = h0
            ctx.passes_done = 0
            for k in range(1, max(loops) + 1):
                h = h + a * (looped.loop_step(h, ctx) - h)
                if k in loops:
                    sums[a][k] += float(next_token_ce(looped.decode(h, ctx), ids, "sum")[0])
    tokens = blocks.shape[0] * (blocks.shape[1] - 1)
    return {a: {k: math.exp(v / tokens) for k, v in per.items()} for a, per in sums.items()}


@torch.no_grad()
def base_ppl(base, blocks: torch.Tensor, batch: int) -> float:
    """The base model's perplexity over ``blocks``."""
    total = 0.0
    for start in range(0, len(blocks), batch):
        ids = blocks[start : start + batch]
        total += float(next_token_ce(base(input_ids=ids).logits, ids, "sum")[0])
    return math.exp(total / (blocks.shape[0] * (blocks.shape[1] - 1)))


def run_damped(s: DampedSettings, work: Path) -> dict:
    """Base perplexity and the damped-loop perplexities at every split."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work.mkdir(parents=True, exist_ok=True)
    path = s.model or str(default_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    blocks = held_out_blocks(tokenizer, None, s.block_size, s.max_blocks)
    out = {
        "model": path,
        "blocks": list(blocks.shape),
        "tokens": blocks.shape[0] * (blocks.shape[1] - 1),
        "base_ppl": base_ppl(base, blocks, s.batch_size),
        "splits": {},
    }
    for split in s.splits:
        name = split
        if split == "auto":
            out["analysis"] = recommended_split(s.model, work, s.analyze_tokens, s.analyze_probes)
            name = out["analysis"]["split"]
        if name in out["splits"]:  # the recommendation may be one of the fixed splits
            out["splits"][name]["from"] += f", {split}"
            continue
        looped = loop_base_model(base, name, num_loops=1, gate_init="identity")
        log.info("damped looping at %s", name)
        ppl = damped_ppl(looped, blocks, s.loops, s.alphas, s.batch_size)
        out["splits"][name] = {"from": split, "ppl": ppl}
    return out

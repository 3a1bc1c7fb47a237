"""Pretrain a small ``LlamaForCausalLM`` from scratch on variable chains (answer-only loss); save it HF-style.

The recipe the research found (/work/research/depth/RESULTS.md, run pt_c): 6 layers, hidden 64, 4 heads,
MLP 3x, tied embeddings; AdamW (betas 0.9/0.98, decay 0.01 on matrices), linear warmup then cosine to 0.1x,
clip 1.0, depths 0-3. The statement tokens start factorised: ``e(x=y) = (L[x] + R[y]) / sqrt(2)`` with random
``L``, ``R`` and ``R[digit]`` = the digit's embedding, so matching a right-hand side to an earlier left-hand
side is a linear map from the first update (without it the model sits at chance beyond depth 0).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.evidence.task import BOS, DIGITS, EOS, PAD, Codec, Sampler
from loopus_train.optim import lr_at, no_decay

log = logging.getLogger(__name__)


@dataclass
class PretrainSettings:
    """Model and schedule of the pretraining (defaults: the research's pt_c)."""

    layers: int = 6
    hidden: int = 64
    heads: int = 4
    mlp_ratio: int = 3
    names: int = 20
    n: int = 16
    depths: tuple[int, ...] = (0, 1, 2, 3)
    steps: int = 2000
    batch: int = 128
    lr: float = 2e-3
    wd: float = 0.01
    warmup: int = 100
    seed: int = 0


def build_model(s: PretrainSettings, vocab: int) -> LlamaForCausalLM:
    """A fresh Llama of the settings' shape (seeded by ``s.seed``)."""
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=s.hidden,
        intermediate_size=s.hidden * s.mlp_ratio,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        rope_theta=10000.0,
    )
    torch.manual_seed(s.seed)
    return LlamaForCausalLM(cfg)


@torch.no_grad()
def factor_init(model: LlamaForCausalLM, codec: Codec, std: float = 0.02) -> None:
    """Statement tokens start as ``e(x=y) = (L[x] + R[y]) / sqrt(2)``, ``R[digit]`` = its embedding."""
    emb = model.get_input_embeddings().weight
    dim = emb.shape[1]
    lhs = {x: torch.randn(dim) * std for x in codec.names}
    rhs = {y: torch.randn(dim) * std for y in codec.names}
    rhs.update({d: emb[codec.token_id[d]].clone() for d in DIGITS})
    for x in codec.names:
        for y in list(codec.names) + list(DIGITS):
            emb[codec.token_id[f"{x}={y};"]] = (lhs[x] + rhs[y]) / math.sqrt(2)


def answer_ce(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy (fp32) over the answer positions (labels != -100) and each sequence's fraction of
    correct argmax answers (B,): the confidence head's target."""
    mask = labels != -100
    ce = torch.nn.functional.cross_entropy(logits[mask].float(), labels[mask])
    right = (logits.detach().argmax(-1) == labels) & mask
    return ce, right.sum(1).float() / mask.sum(1).clamp_min(1).float()


def adamw(named: list[tuple[str, torch.nn.Parameter]], lr: float, wd: float) -> torch.optim.AdamW:
    """AdamW (betas 0.9 / 0.98), weight decay on matrices only (loopus_train's ``no_decay`` rule)."""
    decay = [p for n, p in named if not no_decay(n, p)]
    rest = [p for n, p in named if no_decay(n, p)]
    groups = [{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98))


def pretrain(s: PretrainSettings, out: Path) -> dict:
    """Train from scratch and save model + tokenizer to ``out``; returns {steps, wall_s, final_loss}."""
    codec = Codec(s.names)
    model = build_model(s, len(codec.vocab)).train()
    factor_init(model, codec)
    opt = adamw(list(model.named_parameters()), s.lr, s.wd)
    train = Sampler(s.seed, s.n, "train", codec)
    t0, loss = time.time(), float("nan")
    for step in range(s.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, lr=s.lr, min_lr=0.1 * s.lr, warmup=s.warmup, total=s.steps)
        b = train.batch(s.batch, list(s.depths))
        ce, _ = answer_ce(model(input_ids=b["input_ids"]).logits, b["labels"])
        opt.zero_grad(set_to_none=True)
        ce.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss = float(ce.detach())
        if (step + 1) % 100 == 0:
            log.info("pretrain step %d/%d loss %.4f (%.0f s)", step + 1, s.steps, loss, time.time() - t0)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    codec.tokenizer().save_pretrained(out)
    return {"settings": asdict(s), "steps": s.steps, "wall_s": round(time.time() - t0, 1), "final_loss": loss}

"""Logit lens: read every state through the model's own final norm and unembedding.

For state ``h_s`` of a token (nostalgebraist 2020; tuned-lens ``nn/unembed.py``)::

    lens_s = softmax(cap(lm_head(final_norm(h_s))))

with the norm's statistics RECOMPUTED from ``h_s`` itself (applying the norm module to ``h_s``; reusing the
last layer's cached scale makes early layers look near-uniform, TransformerLens #1076), and ``cap`` the
model's final logit soft-capping where it has one (``c · tanh(z / c)``). The last state's lens is therefore
exactly the model's output distribution ``p``. Per token and state::

    KL(p || lens_s)  = Σ_v p_v (log p_v - log lens_s,v)       (nats; 0 for the last state)
    top-1 agreement  = [argmax lens_s == argmax p]
    entropy          = -Σ_v lens_s,v log lens_s,v             (nats)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from loopus_core.models import ModelParts

HEAD_TILE = 2048  # vocabulary columns per matmul of head_stats: a tile's logits stay in cache


def head_logits(parts: ModelParts, normed: torch.Tensor) -> torch.Tensor:
    """float32 logits of final-normed states (..., D): lm_head, then the model's logit soft-capping
    (``c · tanh(z / c)``) where it has one: what the model's own forward computes from its last state."""
    return _soft_cap(parts, parts.lm_head(normed.to(parts.lm_head.weight.dtype)).float())


def _soft_cap(parts: ModelParts, logits: torch.Tensor) -> torch.Tensor:
    cap = getattr(parts.model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def _head_tiles(parts: ModelParts, normed: torch.Tensor, tile: int):
    """``(first column, float32 logits (..., <= tile))`` over the vocabulary: the numbers of
    :func:`head_logits`, a tile at a time (a head that is not a plain ``nn.Linear`` comes as one tile)."""
    head = parts.lm_head
    if not isinstance(head, torch.nn.Linear):
        yield 0, head_logits(parts, normed)
        return
    x = normed.to(head.weight.dtype)
    for first in range(0, head.weight.shape[0], tile):
        rows = slice(first, first + tile)
        bias = None if head.bias is None else head.bias[rows]
        yield first, _soft_cap(parts, torch.nn.functional.linear(x, head.weight[rows], bias).float())


@dataclass
class HeadStats:
    """What scoring needs of the next-token distributions q = softmax(z) of final-normed states (each
    (..., N)): ``log_q_target`` = log q(target), ``p_log_q`` = Σ_v p_v log q_v for reference probabilities
    p (for KL(p || q)), ``top`` = argmax z."""

    log_q_target: torch.Tensor
    p_log_q: torch.Tensor
    top: torch.Tensor


def head_stats(parts: ModelParts, normed: torch.Tensor, prob: torch.Tensor, targets: torch.Tensor,
               tile: int = HEAD_TILE) -> HeadStats:
    """:class:`HeadStats` of final-normed states (..., N, D), with ``prob`` (N, V) and ``targets`` (N,).

    The head runs over vocabulary tiles of ``tile`` columns, with an online logsumexp and argmax (first
    maximum on ties, as ``argmax``), so the (..., N, V) logits are never held at once: a tile is scored
    while it is still in cache (benchmarks/README.md: the map's head). With ``lse`` = logsumexp z,
    ``log q(target) = z(target) - lse`` and ``Σ_v p_v log q_v = Σ_v p_v z_v - lse Σ_v p_v`` (the mass of
    ``prob`` as it is, not 1: in float32 it misses 1 by enough to shift a KL by 1e-4).
    """
    shape = normed.shape[:-1]
    zeros = {"device": normed.device, "dtype": torch.float32}
    best, total = torch.full(shape, -torch.inf, **zeros), torch.zeros(shape, **zeros)
    target, p_dot = torch.zeros(shape, **zeros), torch.zeros(shape, **zeros)
    top = torch.zeros(shape, dtype=torch.long, device=normed.device)
    for first, z in _head_tiles(parts, normed, tile):
        width = z.shape[-1]
        p_dot += torch.linalg.vecdot(z, prob[:, first:first + width])
        inside = (targets >= first) & (targets < first + width)
        picked = z.gather(-1, (targets - first).clamp(0, width - 1).expand(shape)[..., None])[..., 0]
        target += torch.where(inside, picked, 0.0)
        peak, where = z.max(dim=-1)
        higher = torch.maximum(best, peak)
        total = total * torch.exp(best - higher) + torch.exp(z - higher[..., None]).sum(dim=-1)
        top = torch.where(peak > best, where + first, top)
        best = higher
    lse = best + total.log()
    return HeadStats(target - lse, p_dot - lse * prob.float().sum(dim=-1), top)


def lens_logits(parts: ModelParts, h: torch.Tensor) -> torch.Tensor:
    """Logits of states ``h`` (..., D) through the final norm (recomputed) and lm_head, soft-capped."""
    return head_logits(parts, parts.norm(h.to(parts.lm_head.weight.dtype)))


def lens_sums(parts: ModelParts, h: torch.Tensor) -> dict[str, np.ndarray]:
    """Sums over tokens of KL(final || lens_s), top-1 agreement and lens entropy for every state.

    ``h`` is (S, m, D), the last state being the last decoder layer's own output (before the final norm).
    Returns ``{"kl", "top1", "entropy"}``, each (S,) float64 sums over the m tokens. All states go through
    one lm_head matmul; with ``z`` the lens logits, ``lse = logsumexp(z)`` and ``q = softmax(z)``::

        KL(p || q) = Σ p log p - p·z + lse,      H(q) = lse - q·z

    so each state needs one softmax, one logsumexp and two dot products over the vocabulary.
    """
    count, m, _ = h.shape
    z = lens_logits(parts, h.reshape(count * m, -1)).reshape(count, m, -1)  # (S, m, V)
    lse = torch.logsumexp(z, dim=-1)  # (S, m)
    q = torch.softmax(z, dim=-1)
    p = q[-1]  # the model's own distribution, (m, V)
    p_log_p = (p * (z[-1] - lse[-1, :, None])).sum(dim=-1)  # (m,)
    kl = (p_log_p - (z * p).sum(dim=-1) + lse).double().clamp_min(0.0)  # (S, m)
    kl[-1] = 0.0  # exactly: the last state's lens is p itself
    entropy = (lse - (q * z).sum(dim=-1)).double()
    top1 = (z.argmax(dim=-1) == z[-1].argmax(dim=-1)).double()
    return {"kl": kl.sum(dim=-1).cpu().numpy(), "top1": top1.sum(dim=-1).cpu().numpy(),
            "entropy": entropy.sum(dim=-1).cpu().numpy()}

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

import numpy as np
import torch

from loopus_core.models import ModelParts


def head_logits(parts: ModelParts, normed: torch.Tensor) -> torch.Tensor:
    """float32 logits of final-normed states (..., D): lm_head, then the model's logit soft-capping
    (``c · tanh(z / c)``) where it has one: what the model's own forward computes from its last state."""
    logits = parts.lm_head(normed.to(parts.lm_head.weight.dtype)).float()
    cap = getattr(parts.model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


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

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

from loopus_analyze.models import ModelParts


def lens_logits(parts: ModelParts, h: torch.Tensor) -> torch.Tensor:
    """Logits of states ``h`` (..., D) through the final norm (recomputed) and lm_head, soft-capped."""
    weight = parts.lm_head.weight
    logits = parts.lm_head(parts.norm(h.to(weight.dtype))).float()
    cap = getattr(parts.model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def lens_sums(parts: ModelParts, h: torch.Tensor) -> dict[str, np.ndarray]:
    """Sums over tokens of KL(final || lens_s), top-1 agreement and lens entropy for every state.

    ``h`` is (S, m, D), the last state being the last decoder layer's own output (before the final norm).
    Returns ``{"kl", "top1", "entropy"}``, each (S,) float64 sums over the m tokens. One state at a time, so
    memory is m x vocab.
    """
    final = torch.log_softmax(lens_logits(parts, h[-1]), dim=-1)  # (m, V)
    p_final = final.exp()
    top_final = final.argmax(dim=-1)
    count = h.shape[0]
    kl = np.zeros(count)
    top1 = np.zeros(count)
    entropy = np.zeros(count)
    for s in range(count):
        logp = final if s == count - 1 else torch.log_softmax(lens_logits(parts, h[s]), dim=-1)
        kl[s] = (p_final * (final - logp)).sum(dim=-1).double().clamp_min(0.0).sum().item()
        top1[s] = (logp.argmax(dim=-1) == top_final).sum().item()
        entropy[s] = -(logp.exp() * logp).nan_to_num(0.0).sum(dim=-1).double().sum().item()
    return {"kl": kl, "top1": top1, "entropy": entropy}

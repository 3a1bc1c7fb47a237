"""How token states move through depth: angular drift and distance, relative update norms, outliers.

All functions take one batch of stacked token states ``h`` of shape (S, n, D) (state s, token i) and return
SUMS over tokens in float64, so that a caller streams batches and divides by the token count at the end.

Angular distance between two vectors (Gromov et al. 2024, "The unreasonable ineffectiveness of the deeper
layers")::

    d(a, b) = arccos(a·b / (|a| |b|)) / π   in [0, 1]   (0: same direction, 1/2: orthogonal)
"""

from __future__ import annotations

import math

import numpy as np
import torch


def _unit(h: torch.Tensor) -> torch.Tensor:
    """Float32 unit vectors along the last dim; zero vectors stay zero."""
    h = h.float()
    return h / h.norm(dim=-1, keepdim=True).clamp_min(1e-30)


def _angle(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Angular distance of unit vectors, ``2 atan2(|u - v|, |u + v|) / π``: accurate at every angle
    (``arccos`` of a rounded cosine loses half the digits near 0), exactly 0 for identical vectors."""
    return 2.0 * torch.atan2((u - v).norm(dim=-1), (u + v).norm(dim=-1)) / math.pi


def angular_distance_sums(h: torch.Tensor) -> np.ndarray:
    """Σ_i d(h[s, i], h[t, i]) for all state pairs: (S, n, D) -> (S, S) float64, symmetric, zero diagonal.

    ``sums[s, s+k] / n`` is Gromov's d(s, s+k). Cosines of all pairs per token come from one float32 batched
    matmul ((n, S, D) @ (n, D, S)); arccos and the sum are float64. Near-identical states are resolved to
    about 1e-4 here; :func:`consecutive_angular_sums` gives the adjacent pairs exactly.
    """
    u = _unit(h).transpose(0, 1)  # (n, S, D)
    cos = torch.bmm(u, u.transpose(1, 2)).double().clamp_(-1.0, 1.0)  # (n, S, S)
    out = (torch.arccos(cos) / math.pi).sum(dim=0)
    out.fill_diagonal_(0.0)
    out = (out + out.T) / 2
    return out.cpu().numpy()


def consecutive_angular_sums(h: torch.Tensor) -> np.ndarray:
    """Σ_i d(h[s, i], h[s+1, i]) for s = 0..S-2: (S, n, D) -> (S-1,) float64 (the raw drift sums)."""
    u = _unit(h)
    return _angle(u[:-1], u[1:]).double().sum(dim=-1).cpu().numpy()


def centred_drift_sums(h: torch.Tensor) -> np.ndarray:
    """Consecutive angular distance after subtracting each state's mean token vector (over the batch).

    Removes the anisotropic common direction of the residual stream, which makes raw cosines of LLM states
    read close to 1 everywhere. (S, n, D) -> (S-1,) sums over tokens.
    """
    h = h.float()
    return consecutive_angular_sums(h - h.mean(dim=1, keepdim=True, dtype=torch.float64).float())


def relative_update_sums(h: torch.Tensor) -> np.ndarray:
    """Σ_i |h[s+1, i] - h[s, i]| / |h[s, i]|: (S, n, D) -> (S-1,) float64 (zero-norm states count as 0)."""
    h = h.float()
    num = (h[1:] - h[:-1]).norm(dim=-1)
    den = h[:-1].norm(dim=-1)
    ratio = torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(num))
    return ratio.double().sum(dim=-1).cpu().numpy()


def massive_activation_stats(h: torch.Tensor, median_tokens: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Per state: max |h| over tokens and channels, and that max over the median |h| (Sun et al. 2024).

    (S, n, D) -> (max_abs (S,), ratio_to_median (S,)). The median is taken over the first ``median_tokens``
    tokens (the batch is already a random mix of documents). A ratio in the hundreds or thousands marks the
    "massive activations" of attention sinks, which fake similarity in cosine and CKA measures.
    """
    a = h.float().abs()
    max_abs = a.reshape(h.shape[0], -1).max(dim=-1).values.double()
    median = a[:, :median_tokens].reshape(h.shape[0], -1).median(dim=-1).values.double()
    ratio = torch.where(median > 0, max_abs / median.clamp_min(1e-30), torch.zeros_like(max_abs))
    return max_abs.cpu().numpy(), ratio.cpu().numpy()

"""Massive activations, and the views of the states that they cannot fool.

Massive activations (Sun, Chen, Kolter & Liu 2024, "Massive activations in large language models"): a few
fixed channels take values hundreds to thousands of times the median magnitude, at a few tokens
(delimiters, the first token), over a stretch of middle states. Such a token dominates a linear Gram (its
squared norm is orders of magnitude above the others'), so raw-state CKA and cosine read those few tokens
rather than what the layers do (SmolLM2-135M: max / median |h| ~ 1000 at states 3-10, CKA ~ 1 among them).

Detection on a batch of token states h (S, n, D), first position excluded::

    ratio[s, c]           = max_i |h[s, i, c]| / median_{i, c'} |h[s, i, c']|
    channel c is massive  iff  ratio[s, c] >= MASSIVE_RATIO at some state s
    token i is massive    iff  |h[s, i, c]| >= MASSIVE_RATIO * median |h[s]| for some s and c

The channels found on the first measuring batch are held fixed for the whole pass (one feature space for
every batch); the pass also records every channel that crosses the threshold later, the largest ratio of
each, and which token ids carry massive values.

Views of the states, each measured with the same debiased CKA and drift:

- ``raw``: as they are;
- ``normed``: as the next layer reads them: state s through layer s's input norm, the last state through
  the final norm (not available for post-norm families such as OLMo2, whose layers read the raw stream);
- ``no_massive``: the massive channels set to zero.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from loopus_core.models import ModelParts

MASSIVE_RATIO = 100.0  # max |h_c| / median |h| at or above this marks a massive channel (Sun et al.: ~1e3)
MEDIAN_TOKENS = 256
VIEWS = ("raw", "normed", "no_massive")


def median_magnitude(magnitude: torch.Tensor, tokens: int = MEDIAN_TOKENS) -> torch.Tensor:
    """|h| (S, n, D) -> (S,): the median of each state over its first ``tokens`` tokens (the batch is
    already a random mix of documents) and all channels."""
    return magnitude[:, :tokens].reshape(magnitude.shape[0], -1).median(dim=-1).values.clamp_min(1e-30)


def channel_ratios(magnitude: torch.Tensor, median: torch.Tensor) -> torch.Tensor:
    """|h| (S, n, D) -> (S, D) float64: each channel's largest |value| over tokens / its state's median."""
    return magnitude.amax(dim=1).double() / median.double()[:, None]


def massive_token_mask(magnitude: torch.Tensor, median: torch.Tensor,
                       ratio: float = MASSIVE_RATIO) -> torch.Tensor:
    """|h| (S, n, D) -> (n,) bool: tokens with a value at or above ``ratio`` x the median of some state."""
    return (magnitude.amax(dim=-1) >= ratio * median[:, None]).any(dim=0)


def normed_view(parts: ModelParts, h: torch.Tensor) -> torch.Tensor | None:
    """State s of ``h`` (S, n, D) through the norm layer s reads it with (the final norm for the last
    state), or None when the family's layers read the raw stream."""
    norms = [parts.input_norm(s) for s in range(h.shape[0])]
    if any(norm is None for norm in norms):
        return None
    dtype = parts.lm_head.weight.dtype
    return torch.stack([norm(h[s].to(dtype)).float() for s, norm in enumerate(norms)])


def without_channels(h: torch.Tensor, channels: list[int]) -> torch.Tensor:
    """``h`` (S, n, D) with ``channels`` set to zero (a copy; ``h`` itself when there are none)."""
    if not channels:
        return h
    out = h.clone()
    out[..., channels] = 0.0
    return out


class MassiveTracker:
    """The massive channels (fixed on the first batch) and what the whole pass saw."""

    def __init__(self, states: int, ratio: float = MASSIVE_RATIO) -> None:
        self.ratio = ratio
        self.channels: list[int] | None = None
        self.max_ratio: np.ndarray | None = None  # (S, D) over the pass
        self.tokens = Counter()
        self.massive_count = 0
        self.count = 0
        self.states = states

    def add(self, h: torch.Tensor, token_ids: torch.Tensor) -> list[int]:
        """Add a batch (S, n, D) with the token ids of its n tokens; returns the fixed massive channels."""
        magnitude = h.float().abs()
        median = median_magnitude(magnitude)
        ratios = channel_ratios(magnitude, median).cpu().numpy()
        self.max_ratio = ratios if self.max_ratio is None else np.maximum(self.max_ratio, ratios)
        if self.channels is None:
            self.channels = sorted(int(c) for c in np.flatnonzero((ratios >= self.ratio).any(axis=0)))
        mask = massive_token_mask(magnitude, median, self.ratio).cpu()
        self.tokens.update(int(t) for t in token_ids[mask].tolist())
        self.massive_count += int(mask.sum())
        self.count += int(mask.numel())
        return self.channels

    def summary(self, tokenizer=None, top: int = 8) -> dict:
        """Channels (fixed and seen), each seen channel's largest ratio per state, the massive tokens."""
        seen = [] if self.max_ratio is None else sorted(
            int(c) for c in np.flatnonzero((self.max_ratio >= self.ratio).any(axis=0)))
        tokens = []
        for token, count in self.tokens.most_common(top):
            text = tokenizer.decode([token]) if tokenizer is not None else None
            tokens.append({"id": token, "text": text, "count": count})
        return {
            "threshold": self.ratio,
            "channels": list(self.channels or []),
            "channels_seen": seen,
            "channel_ratio": {str(c): self.max_ratio[:, c] for c in seen} if seen else {},
            "token_share": self.massive_count / self.count if self.count else 0.0,
            "tokens": tokens,
        }

"""Linear CKA between layer states: debiased minibatch CKA (the primary estimator) and biased CKA beside it.

Notation: a batch gives, for every state ``s`` of ``S``, a token-state matrix ``X_s`` of shape (n, D) (the
same n tokens for every state). ``K_s = X̄_s X̄_sᵀ`` is the linear Gram matrix of the column-centred states
``X̄_s = X_s - mean_tokens(X_s)`` (centring in float64, the Gram in float32 on centred data: centring first
removes the large shared mean direction of LLM residual streams, which is what makes the float32 three-term
HSIC of other libraries return NaN).

Debiased HSIC (Song et al. 2012; Nguyen, Raghu, Kornblith 2021) through U-centring (Székely & Rizzo 2014)::

    Ũ_ij = K_ij - r_i/(n-2) - r_j/(n-2) + Σ/((n-1)(n-2))   for i != j,   Ũ_ii = 0
    where K̃ = K with a zero diagonal, r_i = Σ_j K̃_ij, Σ = Σ_ij K̃_ij
    HSIC₁(K, L) = <Ũ(K), Ũ(L)>_F / (n (n-3))

HSIC₁ is unbiased, HSIC₁(K, K) >= 0, and Ũ is invariant to adding ``a_i + b_j`` to K (so centring the
features with any mean vector gives the same value). Biased HSIC (Gretton et al. 2005)::

    HSIC₀(K, L) = <H K H, H L H>_F / (n-1)²,   H = I - 11ᵀ/n

Minibatch CKA accumulates per-batch HSIC terms and normalises once (Nguyen et al. 2021)::

    CKA(s, t) = mean_b HSIC(K_s^b, K_t^b) / sqrt(mean_b HSIC(K_s^b, K_s^b) · mean_b HSIC(K_t^b, K_t^b))

One batch costs S Grams (S·n²·D multiply-adds, float32) and one (S × n²)(n² × S) matmul per estimator in
float64. All accumulators are float64.
"""

from __future__ import annotations

import numpy as np
import torch


def column_centre(states: torch.Tensor) -> torch.Tensor:
    """Subtract each state's mean token vector (mean over dim -2, computed in float64); keeps the dtype."""
    mean = states.mean(dim=-2, keepdim=True, dtype=torch.float64)
    return (states.double() - mean).to(states.dtype)


def gram_matrices(states: torch.Tensor) -> torch.Tensor:
    """Linear Grams ``K_s = X̄_s X̄_sᵀ`` of the column-centred states: (S, n, D) -> (S, n, n) float32."""
    centred = column_centre(states.float())
    return torch.bmm(centred, centred.transpose(1, 2))


def u_centre(grams: torch.Tensor) -> torch.Tensor:
    """U-centred Grams Ũ(K) (see the module docstring), float64, zero diagonal: (S, n, n) -> (S, n, n).

    Needs n >= 4.
    """
    n = grams.shape[-1]
    if n < 4:
        raise ValueError(f"U-centring needs at least 4 tokens, got {n}")
    k = grams.double().clone()
    k.diagonal(dim1=-2, dim2=-1).zero_()
    rows = k.sum(dim=-1, keepdim=True)  # (S, n, 1)
    total = rows.sum(dim=-2, keepdim=True)  # (S, 1, 1)
    k -= rows / (n - 2)
    k -= rows.transpose(-1, -2) / (n - 2)
    k += total / ((n - 1) * (n - 2))
    k.diagonal(dim1=-2, dim2=-1).zero_()
    return k


def double_centre(grams: torch.Tensor) -> torch.Tensor:
    """``H K H`` in float64: (S, n, n) -> (S, n, n)."""
    k = grams.double()
    k = k - k.mean(dim=-1, keepdim=True)
    return k - k.mean(dim=-2, keepdim=True)


def hsic_debiased(grams: torch.Tensor) -> np.ndarray:
    """All pairs of debiased HSIC₁ terms of one batch: (S, n, n) Grams -> (S, S) float64 array."""
    n = grams.shape[-1]
    u = u_centre(grams).reshape(grams.shape[0], -1)  # (S, n²)
    return (u @ u.T).cpu().numpy() / (n * (n - 3))


def hsic_biased(grams: torch.Tensor) -> np.ndarray:
    """All pairs of biased HSIC₀ terms of one batch: (S, n, n) Grams -> (S, S) float64 array."""
    n = grams.shape[-1]
    h = double_centre(grams).reshape(grams.shape[0], -1)  # (S, n²)
    return (h @ h.T).cpu().numpy() / (n - 1) ** 2


def cka_from_hsic(hsic: np.ndarray) -> np.ndarray:
    """Normalise an (S, S) HSIC matrix (or the mean of per-batch ones) into CKA: H_st / sqrt(H_ss H_tt).

    A state with zero self-HSIC (constant states) gets CKA 0 with everything and 1 with itself, instead of
    NaN. The diagonal is exactly 1 and the result is symmetric.
    """
    hsic = np.asarray(hsic, dtype=np.float64)
    hsic = (hsic + hsic.T) / 2
    scale = np.sqrt(np.clip(np.diag(hsic), 0.0, None))
    denom = np.outer(scale, scale)
    with np.errstate(divide="ignore", invalid="ignore"):
        cka = np.where(denom > 0, hsic / np.where(denom > 0, denom, 1.0), 0.0)
    np.fill_diagonal(cka, 1.0)
    return cka


def minibatch_cka(hsic_batches: np.ndarray) -> np.ndarray:
    """Minibatch CKA from per-batch HSIC terms (num_batches, S, S): normalise the batch mean."""
    return cka_from_hsic(np.asarray(hsic_batches, dtype=np.float64).mean(axis=0))


def linear_cka(x: torch.Tensor, y: torch.Tensor, *, debiased: bool = True) -> float:
    """CKA between two token-state matrices of the same n tokens, (n, D1) and (n, D2), as one batch."""
    grams = torch.stack([gram_matrices(x[None])[0], gram_matrices(y[None])[0]])
    hsic = hsic_debiased(grams) if debiased else hsic_biased(grams)
    return float(cka_from_hsic(hsic)[0, 1])


class HSICAccumulator:
    """Streams batches of stacked states (S, n, D) into per-batch debiased and biased HSIC terms.

    ``update`` keeps only the (S, S) terms of each batch (float64), so memory does not grow with the number
    of tokens; :meth:`cka` and :meth:`cka_biased` give the minibatch CKA matrices so far.
    """

    def __init__(self, biased: bool = True) -> None:
        self.debiased_terms: list[np.ndarray] = []
        self.biased_terms: list[np.ndarray] = []
        self.biased = biased

    def update(self, states: torch.Tensor | None = None, *, grams: torch.Tensor | None = None) -> None:
        """Add one batch, given as states (S, n, D) or as precomputed Grams (S, n, n); n >= 4."""
        if grams is None:
            grams = gram_matrices(states)
        self.debiased_terms.append(hsic_debiased(grams))
        if self.biased:
            self.biased_terms.append(hsic_biased(grams))

    def cka(self) -> np.ndarray:
        """The debiased minibatch CKA matrix (S, S)."""
        return minibatch_cka(np.stack(self.debiased_terms))

    def cka_biased(self) -> np.ndarray:
        """The biased minibatch CKA matrix (S, S)."""
        return minibatch_cka(np.stack(self.biased_terms))

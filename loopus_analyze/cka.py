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

Both estimators expand into the same sufficient statistics of a batch (:class:`GramStats`): the Frobenius
products <K_s, K_t> (one (S × n²)(n² × S) matmul in float64, over row chunks), the diagonals and the row
sums of the Grams. One batch costs S Grams (S·n²·D multiply-adds, float32) and that one matmul; all
accumulators are float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def column_centre(states: torch.Tensor) -> torch.Tensor:
    """Subtract each state's mean token vector (mean over dim -2 computed in float64), in float32.

    The mean is exact to float64; its rounding to float32 shifts every token by the same tiny vector, which
    neither the U-centred nor the double-centred HSIC can see.
    """
    mean = states.mean(dim=-2, keepdim=True, dtype=torch.float64)
    return states.float() - mean.float()


def gram_matrices(states: torch.Tensor) -> torch.Tensor:
    """Linear Grams ``K_s = X̄_s X̄_sᵀ`` of the column-centred states: (S, n, D) -> (S, n, n) float32."""
    centred = column_centre(states)
    return torch.bmm(centred, centred.transpose(1, 2))


def gram_matrices_centred_by(states: torch.Tensor, count: int,
                             without: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Grams of states (S, m, D) centred with the mean of their first ``count`` tokens: (S, m, m) float32,
    and the Grams of the same features without the channels ``without``.

    The top-left (count, count) block equals :func:`gram_matrices` of those tokens; the U-centred HSIC of
    the whole is unaffected by the choice of centring vector. A linear Gram is a sum over channels, so the
    full Gram is the channel-free one plus the rank-k Gram of the k left-out channels: one Gram product for
    both (adding the large channels last loses nothing; subtracting them from the full Gram would cancel).
    """
    mean = states[:, :count].mean(dim=-2, keepdim=True, dtype=torch.float64).float()
    centred = states.float() - mean
    if not without:
        grams = torch.bmm(centred, centred.transpose(1, 2))
        return grams, grams
    left_out = centred[..., without]
    rest = centred.clone()
    rest[..., without] = 0.0
    partial = torch.bmm(rest, rest.transpose(1, 2))
    return partial + torch.bmm(left_out, left_out.transpose(1, 2)), partial


def gram_inner_products(grams: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """``P_st = <K_s, K_t>_F`` for all pairs, (S, r, c) -> (S, S) float64.

    One (S × r·c)(r·c × S) matmul, done over chunks of ``chunk`` rows in float64, so the float64 copy alive
    at a time is S × chunk × c.
    """
    count = grams.shape[0]
    out = torch.zeros(count, count, dtype=torch.float64, device=grams.device)
    for start in range(0, grams.shape[1], chunk):
        block = grams[:, start:start + chunk].reshape(count, -1).double()
        out += block @ block.T
    return out


@dataclass
class GramStats:
    """Sufficient statistics of one batch's Grams for both HSIC estimators (all float64).

    ``inner`` (S, S) = <K_s, K_t>_F, ``diag`` (S, n) = diag(K_s), ``rowsum`` (S, n) = K_s 1, ``n`` tokens.
    """

    inner: torch.Tensor
    diag: torch.Tensor
    rowsum: torch.Tensor
    n: int

    @classmethod
    def of(cls, grams: torch.Tensor) -> GramStats:
        """The statistics of Grams (S, n, n)."""
        return cls(gram_inner_products(grams), grams.diagonal(dim1=-2, dim2=-1).double(),
                   grams.sum(dim=-1, dtype=torch.float64), grams.shape[-1])

    @classmethod
    def extend(cls, block: GramStats, grams: torch.Tensor) -> GramStats:
        """Statistics of the whole Grams (S, m, m) when ``block`` holds those of their top-left n × n block:
        only the border rows and columns need new inner products."""
        n = block.n
        border = gram_inner_products(grams[:, n:, :n]) * 2 + gram_inner_products(grams[:, n:, n:])
        return cls(block.inner + border, grams.diagonal(dim1=-2, dim2=-1).double(),
                   grams.sum(dim=-1, dtype=torch.float64), grams.shape[-1])

    def debiased(self) -> np.ndarray:
        """All pairs of HSIC₁, expanded from <Ũ(K), Ũ(L)> (Song et al. 2012, eq. 5) with K̃ = K - diag K::

            HSIC₁ = [tr(K̃L̃) + 1ᵀK̃1 · 1ᵀL̃1 / ((n-1)(n-2)) - 2/(n-2) · (K̃1)ᵀ(L̃1)] / (n(n-3))
            tr(K̃L̃) = <K, L> - diag(K)·diag(L),   K̃1 = K1 - diag(K)

        Evaluated in float64 on Grams of column-centred features, where no term is large (the float32
        cancellation behind NaN CKA comes from a shared mean direction, which centring removed).
        """
        n = self.n
        if n < 4:
            raise ValueError(f"debiased HSIC needs at least 4 tokens, got {n}")
        rows = self.rowsum - self.diag  # (S, n)
        totals = rows.sum(dim=-1)  # (S,)
        value = (self.inner - self.diag @ self.diag.T + torch.outer(totals, totals) / ((n - 1) * (n - 2))
                 - 2.0 / (n - 2) * (rows @ rows.T))
        return (value / (n * (n - 3))).cpu().numpy()

    def biased(self) -> np.ndarray:
        """All pairs of HSIC₀ = tr(KHLH)/(n-1)² = [<K, L> - 2/n (K1)ᵀ(L1) + 1ᵀK1 · 1ᵀL1 / n²] / (n-1)²."""
        n = self.n
        totals = self.rowsum.sum(dim=-1)
        value = self.inner - 2.0 / n * (self.rowsum @ self.rowsum.T) + torch.outer(totals, totals) / n**2
        return (value / (n - 1) ** 2).cpu().numpy()


def hsic_debiased(grams: torch.Tensor) -> np.ndarray:
    """All pairs of debiased HSIC₁ terms of one batch: (S, n, n) Grams -> (S, S) float64 array."""
    return GramStats.of(grams).debiased()


def hsic_biased(grams: torch.Tensor) -> np.ndarray:
    """All pairs of biased HSIC₀ terms of one batch: (S, n, n) Grams -> (S, S) float64 array."""
    return GramStats.of(grams).biased()


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

    def update(self, states: torch.Tensor | None = None, *, grams: torch.Tensor | None = None,
               stats: GramStats | None = None) -> None:
        """Add one batch: states (S, n, D), or their Grams (S, n, n), or their :class:`GramStats`; n >= 4."""
        if stats is None:
            stats = GramStats.of(grams if grams is not None else gram_matrices(states))
        self.debiased_terms.append(stats.debiased())
        if self.biased:
            self.biased_terms.append(stats.biased())

    def cka(self) -> np.ndarray:
        """The debiased minibatch CKA matrix (S, S)."""
        return minibatch_cka(np.stack(self.debiased_terms))

    def cka_biased(self) -> np.ndarray:
        """The biased minibatch CKA matrix (S, S)."""
        return minibatch_cka(np.stack(self.biased_terms))

"""An interval for every reported number: a bootstrap over documents of means over predictions.

A number measured on held-out text is a mean over predictions, ``m = sum_d S_d / sum_d n_d`` (document d
contributes the sum S_d over its n_d predictions). Tokens of one document are correlated, so the unit of
resampling is the document: draw the documents with replacement R times (weights w_r, a multinomial count
per document), recompute ``m_r = sum_d w_rd S_d / sum_d w_rd n_d``, and report the 5% and 95% percentiles
of the m_r (a 90% percentile interval; Efron & Tibshirani 1993, ch. 13). A number read on some documents only
(the race and the report give their blocks different windows) leaves out the resamples that drew none of
them. Numbers compared with each other
(block X against block Y on the same predictions) use the same weights, so their difference gets a paired
interval, much narrower than the two intervals side by side when the blocks err on the same tokens.

A decision taken on a few documents (the race's eliminations, from 3 documents on) uses a t interval
instead (:func:`t_interval`): with D documents a percentile bootstrap has few distinct resamples (10 for 3
documents) and its 98% interval is no such thing, while the t quantile on D - 1 degrees of freedom widens
the interval as a small sample needs (the standard error is the ratio mean's, clustered by document).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

DEFAULT_RESAMPLES = 1000
LEVEL = 0.90


@dataclass(frozen=True)
class DocumentBootstrap:
    """Resampling weights (R, D) over the D documents of one held-out text."""

    weights: np.ndarray

    @classmethod
    def draw(cls, documents: int, resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> DocumentBootstrap:
        """R multinomial draws of ``documents`` documents with replacement (seeded)."""
        rng = np.random.default_rng(seed)
        if documents == 0:
            return cls(np.zeros((resamples, 0)))
        picks = rng.integers(0, documents, size=(resamples, documents))
        weights = np.zeros((resamples, documents))
        np.add.at(weights, (np.arange(resamples)[:, None], picks), 1.0)
        return cls(weights)

    @property
    def resamples(self) -> int:
        return self.weights.shape[0]

    def means(self, sums: np.ndarray, count: np.ndarray) -> np.ndarray:
        """Resampled means (R, ...) of per-document ``sums`` (D, ...) over per-document ``count``: (D,), or
        (D, ...) like ``sums`` when each number has its own predictions (entries measured on different
        batches)."""
        count = np.asarray(count, dtype=np.float64)
        flat = np.asarray(sums, dtype=np.float64).reshape(len(count), -1)
        totals = self.weights @ count.reshape(len(count), -1)  # (R, 1) or (R, n)
        with np.errstate(invalid="ignore", divide="ignore"):  # a resample without any of its documents: NaN
            out = np.where(totals > 0, (self.weights @ flat) / np.maximum(totals, 1.0), np.nan)
        return out.reshape((self.resamples, *np.shape(sums)[1:]))


def percentile_interval(resampled: np.ndarray, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """The central ``level`` percentile interval over the first axis: (low, high), each of shape [1:]."""
    tail = (1.0 - level) / 2.0 * 100.0
    with warnings.catch_warnings():  # a number never measured is NaN in every resample: its interval too
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanpercentile(resampled, tail, axis=0), np.nanpercentile(resampled, 100.0 - tail, axis=0)


def estimate(value: float, resampled: np.ndarray, level: float = LEVEL) -> dict:
    """A reported number: ``{"value", "low", "high"}`` (the point estimate on all documents and its
    percentile interval from the resampled values)."""
    low, high = percentile_interval(np.asarray(resampled, dtype=np.float64), level)
    return {"value": float(value), "low": float(low), "high": float(high)}


def t_interval(sums: np.ndarray, count: np.ndarray, level: float) -> tuple[float, float, float]:
    """``(value, low, high)`` of the mean ``sum(sums) / sum(count)`` over D documents (``sums``, ``count``:
    (D,), the documents that were read), with a ``level`` t interval on D - 1 degrees of freedom around the
    document-clustered standard error ``sqrt(D / (D - 1) * sum_d (S_d - m n_d)^2) / sum_d n_d``."""
    from scipy.stats import t  # lazy: scipy is slow to import

    sums, count = np.asarray(sums, dtype=np.float64), np.asarray(count, dtype=np.float64)
    documents, total = len(count), float(count.sum())
    value = float(sums.sum() / max(total, 1.0))
    if documents < 2 or total <= 0:
        return value, -np.inf, np.inf
    spread = np.sqrt(documents / (documents - 1) * np.sum((sums - value * count) ** 2)) / total
    half = float(t.ppf(0.5 + level / 2.0, documents - 1)) * spread
    return value, value - half, value + half

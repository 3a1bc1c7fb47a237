"""What similarity says about the split ``A:B``: the exact CKA search, curve change points, the bootstrap.

The recommendation itself comes from the repeat-cost map (:mod:`loopus_analyze.rule`); this module gives
the similarity views that explain it (or disagree with it), and the minimum block sizes every split obeys.

The state/layer mapping (read this before touching an index)
-----------------------------------------------------------
A model with ``L`` decoder layers has ``L + 1`` token states: state 0 is the embeddings output (the input of
layer 0) and state ``s`` is the output of layer ``s - 1``. Layer ``i`` maps state ``i`` to state ``i + 1``.

The search partitions the states into three *disjoint* contiguous segments and maps them to a split by one
rule: **a layer belongs to the loop block iff both its input and its output state lie in the middle
segment**. With segments::

    encoder states [0, A - 1]      decoder states [B + 1, L]
    loop states    [A, B]          (the input of layer A .. the output of layer B - 1)

the loop block is layers ``A .. B - 1``, i.e. exactly what ``--split A:B`` means (``LayerSplit``). Layer
``A - 1`` (encoder state -> loop state) is the last encoder layer, layer ``B`` (loop state -> decoder
state) the first decoder layer: the transition layers stay outside the loop, and the loop maps the
plateau onto itself, which is what makes it repeatable.

Minimum sizes (the defaults, all documented in the report): encoder >= 1 layer (segment of >= 1 state),
decoder >= 1 layer (>= 1 state), loop >= 2 layers (>= 3 states). So ``1 <= A``, ``A + 2 <= B``,
``B <= L - 1``, and a model needs ``L >= 4`` layers.

The objective
-------------
Kernel segmentation of the state x state debiased-CKA matrix ``K`` into three segments, maximising the
size-weighted within-block similarity ``sum_S (1/|S|) sum_{i,j in S} K_ij``. This is the kernel
change-point cost of ``ruptures.KernelCPD`` with the CKA matrix as the kernel (cost of a segment =
``sum_{i in S} K_ii - (1/|S|) sum_{i,j in S} K_ij``; with a unit diagonal the two orderings coincide). Every
segment's block sum comes from a 2-D prefix sum in O(1), so the exact search over all ``(A, B)`` is O(L^2).
The reported *score* is the objective divided by ``L + 1`` (the size-weighted mean within-segment CKA).

The 1-D curves (drift, logit-lens KL, probe selectivity) get an exact two-change-point least-squares
segmentation for agreement, with the same mapping: per-layer curves split the layers directly, per-state
curves use the state rule above.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from loopus_analyze.cka import minibatch_cka
from loopus_core.errors import LoopusError
from loopus_core.split import parse_pair

log = logging.getLogger(__name__)

MIN_ENCODER_LAYERS = 1
MIN_LOOP_LAYERS = 2
MIN_DECODER_LAYERS = 1
AGREE_LAYERS = 2  # a change point within this many layers of the recommendation "agrees"


@dataclass(frozen=True)
class SearchResult:
    """Every valid split's objective, best first; ``scores[i]`` belongs to ``splits[i]``."""

    num_layers: int
    splits: list[tuple[int, int]]  # (A, B), best first
    scores: np.ndarray  # (n,) objective / (L + 1), best first
    surface: np.ndarray  # (L + 1, L + 1) score at [A, B], NaN where invalid

    @property
    def best(self) -> tuple[int, int]:
        return self.splits[0]

    @property
    def split(self) -> str:
        """The best split as the ``A:B`` text that ``--split`` takes."""
        return f"{self.best[0]}:{self.best[1]}"


def check_layer_count(num_layers: int) -> None:
    """A model too shallow for encoder + loop + decoder is a user error, said once and clearly."""
    need = MIN_ENCODER_LAYERS + MIN_LOOP_LAYERS + MIN_DECODER_LAYERS
    if num_layers < need:
        raise LoopusError(
            f"the model has {num_layers} decoder layers; choosing a split needs at least {need} "
            f"(encoder >= {MIN_ENCODER_LAYERS}, loop >= {MIN_LOOP_LAYERS}, decoder >= {MIN_DECODER_LAYERS})"
        )


def valid_pairs(num_layers: int) -> np.ndarray:
    """All ``(A, B)`` allowed by the minimum sizes, as an (n, 2) int array."""
    pairs = [
        (a, b)
        for a in range(MIN_ENCODER_LAYERS, num_layers + 1)
        for b in range(a + MIN_LOOP_LAYERS, num_layers - MIN_DECODER_LAYERS + 1)
    ]
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def _prefix(matrix: np.ndarray) -> np.ndarray:
    """2-D prefix sums with a zero border: ``P[i, j] = sum(M[:i, :j])``."""
    n = matrix.shape[0]
    prefix = np.zeros((n + 1, n + 1), dtype=np.float64)
    prefix[1:, 1:] = np.cumsum(np.cumsum(matrix, axis=0), axis=1)
    return prefix


def _block_sum(prefix: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Sum of ``M[lo:hi, lo:hi]`` (vectorised over arrays of ``lo``/``hi``)."""
    return prefix[hi, hi] - prefix[lo, hi] - prefix[hi, lo] + prefix[lo, lo]


def clean_similarity(matrix: np.ndarray) -> np.ndarray:
    """A float64 symmetric copy with NaN/inf replaced by 0 (and a unit diagonal where it was not finite)."""
    sim = np.array(matrix, dtype=np.float64)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"similarity matrix must be square, got shape {sim.shape}")
    bad = ~np.isfinite(sim)
    if bad.any():
        log.warning("similarity matrix has %d non-finite entries; treating them as 0", int(bad.sum()))
        diag_bad = np.flatnonzero(bad.diagonal())
        sim[bad] = 0.0
        sim[diag_bad, diag_bad] = 1.0
    return (sim + sim.T) / 2.0


def objective(similarity: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """``sum_S (1/|S|) sum_{i,j in S} K_ij / (L + 1)`` for each ``(A, B)`` in ``pairs``.

    Segments are states ``[0, A)``, ``[A, B + 1)``, ``[B + 1, L + 1)`` (see the module docstring).
    """
    n_states = similarity.shape[0]
    prefix = _prefix(similarity)
    a = pairs[:, 0]
    b1 = pairs[:, 1] + 1
    zero = np.zeros_like(a)
    end = np.full_like(a, n_states)
    total = (
        _block_sum(prefix, zero, a) / a
        + _block_sum(prefix, a, b1) / (b1 - a)
        + _block_sum(prefix, b1, end) / (end - b1)
    )
    return total / n_states


def search_split(similarity: np.ndarray) -> SearchResult:
    """The exact best split under size-weighted within-block similarity, with every alternative ranked.

    ``similarity`` is the (L+1, L+1) state x state CKA matrix. Ties are broken towards the smaller ``A``
    then the smaller ``B`` (a stable sort over pairs listed in that order).
    """
    sim = clean_similarity(similarity)
    num_layers = sim.shape[0] - 1
    check_layer_count(num_layers)
    pairs = valid_pairs(num_layers)
    scores = objective(sim, pairs)
    order = np.argsort(-scores, kind="stable")
    surface = np.full((num_layers + 1, num_layers + 1), np.nan)
    surface[pairs[:, 0], pairs[:, 1]] = scores
    return SearchResult(
        num_layers=num_layers,
        splits=[(int(pairs[i, 0]), int(pairs[i, 1])) for i in order],
        scores=scores[order],
        surface=surface,
    )


# ------------------------------------------------------------------------------------- 1-D change points


def two_change_points(signal: np.ndarray, min_sizes: tuple[int, int, int] = (1, 1, 1)) -> tuple[int, int]:
    """Exact least-squares segmentation of a 1-D signal into three constant pieces.

    Returns cuts ``(c1, c2)`` with pieces ``[0, c1)``, ``[c1, c2)``, ``[c2, n)``, each at least
    ``min_sizes`` long, minimising the total within-piece sum of squared deviations (O(n^2), exact).
    """
    x = np.asarray(signal, dtype=np.float64)
    x = np.where(np.isfinite(x), x, np.nanmean(x) if np.isfinite(x).any() else 0.0)
    n = len(x)
    s1 = np.concatenate([[0.0], np.cumsum(x)])
    s2 = np.concatenate([[0.0], np.cumsum(x * x)])

    def sse(lo: int, hi: int) -> float:
        m = hi - lo
        total = s1[hi] - s1[lo]
        return (s2[hi] - s2[lo]) - total * total / m

    best: tuple[float, int, int] | None = None
    for c1 in range(min_sizes[0], n - min_sizes[1] - min_sizes[2] + 1):
        for c2 in range(c1 + min_sizes[1], n - min_sizes[2] + 1):
            cost = sse(0, c1) + sse(c1, c2) + sse(c2, n)
            if best is None or cost < best[0] - 1e-12:
                best = (cost, c1, c2)
    if best is None:
        raise ValueError(f"signal of length {n} too short for pieces of at least {min_sizes}")
    return best[1], best[2]


def layer_curve_split(curve: np.ndarray) -> tuple[int, int]:
    """(A, B) from a per-layer curve (index i = layer i): pieces are the encoder, loop and decoder layers."""
    return two_change_points(curve, (MIN_ENCODER_LAYERS, MIN_LOOP_LAYERS, MIN_DECODER_LAYERS))


def state_curve_split(curve: np.ndarray) -> tuple[int, int]:
    """(A, B) from a per-state curve (index s = state s), with the state rule of the module docstring."""
    c1, c2 = two_change_points(curve, (MIN_ENCODER_LAYERS, MIN_LOOP_LAYERS + 1, MIN_DECODER_LAYERS))
    return c1, c2 - 1


@dataclass
class ChangePoint:
    """Where one 1-D signal puts the split, and how far that is from the recommendation."""

    signal: str
    description: str
    split: str
    start: int
    end: int
    distance: int | None = None  # max(|dA|, |dB|) to the recommended split, filled in later
    agrees: bool | None = None


def curve_change_points(measurements) -> list[ChangePoint]:
    """Change points of drift, logit-lens KL and probe selectivity, where those curves were measured."""
    found: list[ChangePoint] = []
    num_layers = int(measurements.num_layers)

    def add(signal: str, description: str, curve, per_layer: bool) -> None:
        if curve is None:
            return
        arr = np.asarray(curve, dtype=np.float64)
        expected = num_layers if per_layer else num_layers + 1
        if arr.shape != (expected,) or not np.isfinite(arr).any() or np.nanstd(arr) == 0:
            return
        a, b = layer_curve_split(arr) if per_layer else state_curve_split(arr)
        found.append(ChangePoint(signal, description, f"{a}:{b}", a, b))

    add("drift", "angular drift between consecutive states (per layer)", measurements.drift, True)
    add("drift_centred", "drift on mean-centred states (per layer)",
        getattr(measurements, "drift_centred", None), True)
    add("lens_kl", "logit-lens KL to the final prediction (per state)",
        getattr(measurements, "lens_kl", None), False)
    probes = getattr(measurements, "probes", None) or {}
    for task in ("current", "next"):
        result = probes.get(task)
        if result and "selectivity" in result:
            add(f"probe_{task}", f"{task}-token probe selectivity (per state)", result["selectivity"], False)
    return found


# ------------------------------------------------------------------------------------------- bootstrap


@dataclass
class Bootstrap:
    """How stable the best split is when the measuring batches are resampled with replacement."""

    resamples: int
    counts: dict[str, int]  # split -> how many resamples chose it
    start_interval: tuple[int, int] | None  # 5%..95% of A over resamples
    end_interval: tuple[int, int] | None

    def frequency(self, split: str) -> float:
        return self.counts.get(split, 0) / self.resamples if self.resamples else 0.0

    def near_frequency(self, split: str, within: int = 1) -> float:
        """Share of resamples whose best split is within ``within`` layers of ``split`` (both ends)."""
        if not self.resamples:
            return 0.0
        a, b = parse_pair(split)
        near = 0
        for text, count in self.counts.items():
            x, y = parse_pair(text)
            if abs(x - a) <= within and abs(y - b) <= within:
                near += count
        return near / self.resamples

    @property
    def modal(self) -> str | None:
        return max(self.counts, key=self.counts.get) if self.counts else None


def bootstrap_splits(hsic_batches: np.ndarray | None, *, resamples: int = 200, seed: int = 0) -> Bootstrap:
    """Resample batches with replacement, recompute the CKA matrix and re-run the exact search each time.

    With fewer than two batches there is nothing to resample: an empty :class:`Bootstrap` comes back.
    """
    if hsic_batches is None or len(hsic_batches) < 2:
        return Bootstrap(0, {}, None, None)
    hsic = np.asarray(hsic_batches, dtype=np.float64)
    num_batches = hsic.shape[0]
    num_layers = hsic.shape[1] - 1
    pairs = valid_pairs(num_layers)
    rng = np.random.default_rng(seed)
    counts: dict[str, int] = {}
    starts, ends = [], []
    for _ in range(resamples):
        pick = rng.integers(0, num_batches, size=num_batches)
        sim = clean_similarity(minibatch_cka(hsic[pick]))
        best = int(np.argmax(objective(sim, pairs)))  # first maximum = the same tie rule as search_split
        a, b = int(pairs[best, 0]), int(pairs[best, 1])
        counts[f"{a}:{b}"] = counts.get(f"{a}:{b}", 0) + 1
        starts.append(a)
        ends.append(b)
    return Bootstrap(resamples, dict(sorted(counts.items(), key=lambda kv: -kv[1])), _interval(starts),
                     _interval(ends))


def _interval(values: list[int]) -> tuple[int, int]:
    """The 5%..95% range of integer values, as values that occurred."""
    return int(np.percentile(values, 5, method="lower")), int(np.percentile(values, 95, method="higher"))


# ------------------------------------------------------------------------------------------ summary


SEARCH_RULE = (
    "States 0..L are cut into three disjoint runs: encoder states 0..A-1, loop states A..B, decoder states "
    "B+1..L; a layer is in the loop iff its input and output state are both loop states, so the loop is "
    f"layers A..B-1 (--split A:B). Minimum sizes: encoder {MIN_ENCODER_LAYERS} layer, loop "
    f"{MIN_LOOP_LAYERS} layers, decoder {MIN_DECODER_LAYERS} layer. Score = size-weighted mean "
    "within-run debiased CKA, maximised exactly over all (A, B)."
)


def block_similarity(similarity: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Mean similarity among the loop states A..B of each ``(A, B)`` in ``pairs`` (n,)."""
    sim = clean_similarity(similarity)
    prefix = _prefix(sim)
    lo, hi = pairs[:, 0], pairs[:, 1] + 1
    return _block_sum(prefix, lo, hi) / (hi - lo) ** 2


def agreement(points: list[ChangePoint], start: int, end: int) -> list[ChangePoint]:
    """Fill in each change point's distance to the split ``start:end`` and whether it agrees."""
    for cp in points:
        cp.distance = max(abs(cp.start - start), abs(cp.end - end))
        cp.agrees = cp.distance <= AGREE_LAYERS
    return points


def similarity_evidence(measurements, *, resamples: int = 200, seed: int = 0) -> tuple[
    SearchResult, Bootstrap, list[ChangePoint]
]:
    """The similarity side of the analysis: exact CKA search, its bootstrap over batches, curve change
    points."""
    check_layer_count(int(measurements.num_layers))
    search = search_split(measurements.cka_debiased)
    boot = bootstrap_splits(getattr(measurements, "hsic_batches", None), resamples=resamples, seed=seed)
    return search, boot, curve_change_points(measurements)

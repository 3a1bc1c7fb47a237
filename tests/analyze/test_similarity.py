"""The split search on synthetic similarity matrices: planted blocks, the A:B round trip, change points,
bootstrap, and the confidence rule."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest

from loopus_analyze.cka import minibatch_cka as cka_from_hsic  # per-batch HSIC terms -> CKA
from loopus_analyze.similarity import (
    ChangePoint,
    agreement,
    block_similarity,
    bootstrap_splits,
    layer_curve_split,
    search_split,
    similarity_evidence,
    state_curve_split,
    two_change_points,
    valid_pairs,
)
from loopus_core.errors import LoopusError
from loopus_core.split import LayerSplit


def planted_states(num_layers: int, loop: range, rng=None, noise: float = 0.0) -> np.ndarray:
    """A state x state similarity with the loop layers' states (loop.start .. loop.stop) as one block.

    Encoder states 0..A-1 and decoder states B+1..L form the other two blocks (the documented mapping).
    """
    labels = np.zeros(num_layers + 1, dtype=int)
    labels[loop.start:loop.stop + 1] = 1
    labels[loop.stop + 1:] = 2
    sim = np.where(labels[:, None] == labels[None, :], 0.9, 0.15)
    if noise:
        e = rng.normal(0, noise, sim.shape)
        sim = sim + (e + e.T) / 2
    np.fill_diagonal(sim, 1.0)
    return sim


PLANTS = [(24, range(4, 20)), (30, range(2, 27)), (8, range(1, 7)), (8, range(3, 5)), (12, range(5, 11)),
          (6, range(1, 3))]


@pytest.mark.parametrize(("num_layers", "loop"), PLANTS)
def test_recovers_planted_block_and_round_trips(num_layers, loop):
    result = search_split(planted_states(num_layers, loop))
    parsed = LayerSplit.parse(result.split, num_layers)
    assert parsed.loop == loop
    assert parsed.encoder == range(0, loop.start)
    assert parsed.decoder == range(loop.stop, num_layers)
    assert result.best == (loop.start, loop.stop)


def test_recovers_planted_block_under_noise():
    rng = np.random.default_rng(0)
    for num_layers, loop in PLANTS:
        result = search_split(planted_states(num_layers, loop, rng, noise=0.08))
        assert LayerSplit.parse(result.split, num_layers).loop == loop


def test_objective_matches_brute_force():
    """The prefix-sum objective equals a direct evaluation of sum_S (1/|S|) sum_{i,j in S} K_ij."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(11, 5))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sim = x @ x.T  # PSD, unit diagonal
    result = search_split(sim)
    n = sim.shape[0]
    brute = {}
    for a, b in itertools.product(range(n), repeat=2):
        if 1 <= a and a + 2 <= b <= n - 2:
            segs = [range(0, a), range(a, b + 1), range(b + 1, n)]
            brute[(a, b)] = sum(sim[np.ix_(s, s)].sum() / len(s) for s in segs) / n
    assert len(brute) == len(result.splits)
    for (a, b), score in zip(result.splits, result.scores, strict=True):
        assert score == pytest.approx(brute[(a, b)], abs=1e-12)
    assert result.best == max(brute, key=brute.get)
    assert np.all(np.diff(result.scores) <= 1e-15)
    assert result.surface[result.best] == pytest.approx(result.scores[0])


def test_minimum_sizes_are_respected():
    result = search_split(np.eye(9))  # no structure: any split is allowed, check all respect the rule
    for a, b in result.splits:
        assert a >= 1 and b - a >= 2 and b <= 7


def test_too_few_layers_is_a_loopus_error():
    with pytest.raises(LoopusError, match="at least 4"):
        search_split(np.eye(4))  # 3 layers


def test_nan_entries_do_not_break_the_search():
    sim = planted_states(12, range(3, 9))
    sim[5, 6] = sim[6, 5] = np.nan
    assert search_split(sim).split == "3:9"


def test_two_change_points_on_steps():
    signal = np.array([5.0, 5, 1, 1, 1, 1, 1, 4, 4])
    assert two_change_points(signal) == (2, 7)
    # per-layer drift: high at layers 0-1 and 7: encoder 0..1, loop 2..6, decoder 7
    drift = np.array([0.6, 0.5, 0.1, 0.1, 0.12, 0.1, 0.1, 0.7])
    assert layer_curve_split(drift) == (2, 7)
    assert LayerSplit.parse("2:7", 8).loop == range(2, 7)
    # per-state curve: states 0..1 encoder, 2..7 loop, 8 decoder -> loop layers 2..6
    lens = np.array([9.0, 9, 3, 3, 3, 3, 3, 3, 0])
    assert state_curve_split(lens) == (2, 7)


def _hsic_from_states(num_layers: int, loop: range, batches: int, rng, noise: float) -> np.ndarray:
    """Per-batch 'HSIC' matrices whose CKA is the planted similarity plus batch noise (PSD per batch)."""
    base = planted_states(num_layers, loop)
    vals, vecs = np.linalg.eigh(base)
    root = vecs * np.sqrt(np.clip(vals, 0, None))
    out = []
    for _ in range(batches):
        feat = root + rng.normal(0, noise, root.shape)
        out.append(feat @ feat.T)
    return np.stack(out)


def test_cka_from_hsic_has_unit_diagonal():
    rng = np.random.default_rng(2)
    h = _hsic_from_states(10, range(2, 8), 6, rng, 0.05)
    cka = cka_from_hsic(h)
    assert np.allclose(np.diag(cka), 1.0)
    assert np.allclose(cka, cka.T)


def test_bootstrap_is_stable_on_a_clear_block_and_unstable_on_noise():
    rng = np.random.default_rng(3)
    clear = bootstrap_splits(_hsic_from_states(16, range(3, 13), 12, rng, 0.05), resamples=100, seed=0)
    assert clear.resamples == 100
    assert clear.frequency("3:13") >= 0.95
    assert clear.modal == "3:13"
    assert clear.start_interval == (3, 3) and clear.end_interval == (13, 13)
    noise = rng.normal(size=(12, 17, 40))
    noisy = bootstrap_splits(np.einsum("bik,bjk->bij", noise, noise), resamples=100, seed=0)
    assert max(noisy.counts.values()) < 95
    assert bootstrap_splits(None).resamples == 0
    assert bootstrap_splits(np.zeros((1, 9, 9))).resamples == 0


def _fake_measurements(num_layers: int, loop: range, rng) -> SimpleNamespace:
    hsic = _hsic_from_states(num_layers, loop, 8, rng, 0.03)
    drift = np.full(num_layers, 0.1)
    drift[:loop.start] = 0.6
    drift[loop.stop:] = 0.7
    lens = np.full(num_layers + 1, 3.0)
    lens[:loop.start] = 9.0
    lens[loop.stop + 1:] = 0.0
    return SimpleNamespace(num_layers=num_layers, cka_debiased=cka_from_hsic(hsic), hsic_batches=hsic,
                           drift=drift, drift_centred=drift, lens_kl=lens, probes={})


def test_similarity_evidence_on_a_clear_block():
    meas = _fake_measurements(12, range(3, 10), np.random.default_rng(4))
    search, boot, points = similarity_evidence(meas, resamples=50)
    assert search.split == "3:10" and boot.modal == "3:10"
    assert {p.signal for p in points} == {"drift", "drift_centred", "lens_kl"}
    assert all(p.split == "3:10" for p in points)


def test_change_point_agreement_with_a_split():
    points = [ChangePoint("drift", "", "6:8", 6, 8), ChangePoint("lens_kl", "", "2:9", 2, 9)]
    agreement(points, 2, 10)
    assert [p.distance for p in points] == [4, 1]
    assert [p.agrees for p in points] == [False, True]


def test_block_similarity_is_the_mean_among_the_loop_states():
    rng = np.random.default_rng(5)
    sim = rng.uniform(size=(9, 9))
    sim = (sim + sim.T) / 2
    pairs = valid_pairs(8)
    got = block_similarity(sim, pairs)
    for (a, b), value in zip(pairs.tolist(), got, strict=True):
        assert value == pytest.approx(sim[a:b + 1, a:b + 1].mean())

"""The bootstrap over documents: ratio-of-sums means, coverage, paired differences."""

from __future__ import annotations

import numpy as np
import pytest

from loopus_analyze.intervals import DocumentBootstrap, estimate, percentile_interval


def test_weights_resample_documents_with_replacement():
    boot = DocumentBootstrap.draw(7, resamples=50, seed=1)
    assert boot.weights.shape == (50, 7) and np.all(boot.weights.sum(axis=1) == 7)
    assert np.all(boot.weights == np.round(boot.weights))
    assert not np.all(boot.weights == 1)


def test_means_are_ratios_of_weighted_sums():
    sums = np.array([[2.0, 10.0], [6.0, 0.0], [1.0, 1.0]])  # (D, 2)
    count = np.array([2.0, 3.0, 1.0])
    boot = DocumentBootstrap(np.array([[1.0, 1.0, 1.0], [2.0, 0.0, 1.0]]))
    means = boot.means(sums, count)
    assert means[0] == pytest.approx([9.0 / 6.0, 11.0 / 6.0])
    assert means[1] == pytest.approx([5.0 / 5.0, 21.0 / 5.0])


def test_interval_covers_the_truth_at_about_the_nominal_rate():
    rng = np.random.default_rng(0)
    covered = 0
    trials = 200
    for _ in range(trials):
        count = rng.integers(10, 40, size=30).astype(float)
        doc_means = rng.normal(0.3, 0.2, size=30)  # between-document spread
        sums = doc_means * count + rng.normal(0, 0.5, size=30) * np.sqrt(count)
        boot = DocumentBootstrap.draw(30, resamples=400, seed=int(rng.integers(1 << 30)))
        low, high = percentile_interval(boot.means(sums, count))
        covered += low <= 0.3 <= high
    assert 0.82 <= covered / trials <= 0.97


def test_paired_difference_is_narrower_when_blocks_err_on_the_same_documents():
    rng = np.random.default_rng(1)
    count = np.full(20, 30.0)
    shared = rng.normal(0, 1.0, size=20) * count  # document difficulty, common to both blocks
    a = 0.5 * count + shared + rng.normal(0, 1, 20)
    b = 0.6 * count + shared + rng.normal(0, 1, 20)
    boot = DocumentBootstrap.draw(20, resamples=500, seed=2)
    ma, mb = boot.means(a, count), boot.means(b, count)
    paired = estimate((b - a).sum() / count.sum(), mb - ma)
    unpaired = [estimate(0.0, m) for m in (ma, mb)]
    assert paired["low"] > 0  # b is costlier, and the paired interval says so
    assert paired["high"] - paired["low"] < 0.2 * (unpaired[0]["high"] - unpaired[0]["low"])

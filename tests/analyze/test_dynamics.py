"""Angular drift, distances, relative updates and massive-activation statistics on constructed states."""

from __future__ import annotations

import numpy as np
import torch

from loopus_analyze.dynamics import (
    angular_distance_sums,
    centred_drift_sums,
    consecutive_angular_sums,
    massive_activation_stats,
    relative_update_sums,
)


def test_identical_states_have_zero_drift_and_distance():
    h = torch.randn(1, 40, 16).repeat(4, 1, 1)
    assert np.all(consecutive_angular_sums(h) == 0.0)
    assert np.all(relative_update_sums(h) == 0.0)
    assert np.abs(angular_distance_sums(h)).max() < 1e-3 * 40


def test_known_angles():
    # state 1 is state 0 rotated by 90 degrees in a plane, state 2 is state 0 negated
    x = torch.randn(25, 2)
    rot = torch.stack([-x[:, 1], x[:, 0]], dim=1)
    h = torch.stack([x, rot, -x])
    assert np.allclose(consecutive_angular_sums(h) / 25, [0.5, 0.5], atol=1e-5)
    dist = angular_distance_sums(h) / 25
    assert np.allclose(dist, [[0, 0.5, 1.0], [0.5, 0, 0.5], [1.0, 0.5, 0]], atol=1e-3)
    assert np.allclose(dist, dist.T)


def test_relative_update_and_centred_drift():
    x = torch.randn(30, 8)
    h = torch.stack([x, 1.5 * x])
    assert np.allclose(relative_update_sums(h) / 30, [0.5], atol=1e-6)
    # a shared offset changes the raw angle but not the centred one
    shifted = torch.stack([x + 50.0, x + 50.0 + 0.01 * torch.randn(30, 8)])
    assert consecutive_angular_sums(shifted)[0] / 30 < 1e-3
    assert np.allclose(centred_drift_sums(torch.stack([x + 7.0, 2 * x - 3.0])), [0.0], atol=1e-4)


def test_massive_activation_ratio():
    h = torch.ones(2, 10, 16)
    h[1, 3, 5] = 1000.0
    max_abs, ratio = massive_activation_stats(h)
    assert np.allclose(max_abs, [1.0, 1000.0])
    assert np.allclose(ratio, [1.0, 1000.0])

"""Debiased / biased linear CKA against known properties and a straightforward full-batch reference."""

from __future__ import annotations

import numpy as np
import torch

from loopus_analyze.cka import (
    HSICAccumulator,
    gram_matrices,
    gram_matrices_centred_by,
    linear_cka,
    minibatch_cka,
)


def reference_cka(x: np.ndarray, y: np.ndarray, debiased: bool) -> float:
    """Kornblith et al. ``cka(gram_linear(x), gram_linear(y), debiased)`` written out in float64."""

    def centre(gram: np.ndarray) -> np.ndarray:
        gram = gram.copy()
        n = gram.shape[0]
        if debiased:
            np.fill_diagonal(gram, 0)
            means = gram.sum(0) / (n - 2)
            means -= means.sum() / (2 * (n - 1))
            gram -= means[:, None]
            gram -= means[None, :]
            np.fill_diagonal(gram, 0)
        else:
            means = gram.mean(0)
            means -= means.mean() / 2
            gram -= means[:, None]
            gram -= means[None, :]
        return gram

    k, l_ = centre(x @ x.T), centre(y @ y.T)
    return float((k.ravel() @ l_.ravel()) / (np.linalg.norm(k) * np.linalg.norm(l_)))


def test_invariant_to_orthogonal_transform_and_scale():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 48, generator=gen)
    q, _ = torch.linalg.qr(torch.randn(48, 48, generator=gen))
    y = 3.7 * x @ q
    assert abs(linear_cka(x, y) - 1.0) < 1e-5
    assert abs(linear_cka(x, y, debiased=False) - 1.0) < 1e-5


def test_independent_data_reads_zero_debiased_and_high_biased():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 2048, generator=gen)
    y = torch.randn(64, 2048, generator=gen)
    assert abs(linear_cka(x, y)) < 0.05
    assert linear_cka(x, y, debiased=False) > 0.7


def test_one_batch_equals_full_batch_reference():
    rng = np.random.default_rng(2)
    base = rng.normal(size=(120, 40))
    states = np.stack([base, base @ rng.normal(size=(40, 40)) + 0.5 * rng.normal(size=(120, 40)),
                       rng.normal(size=(120, 40))])
    acc = HSICAccumulator()
    acc.update(torch.tensor(states, dtype=torch.float32))
    for s in range(3):
        for t in range(3):
            assert abs(acc.cka()[s, t] - reference_cka(states[s], states[t], True)) < 1e-4
            assert abs(acc.cka_biased()[s, t] - reference_cka(states[s], states[t], False)) < 1e-4


def test_large_shared_mean_gives_no_nan_and_the_centred_answer():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(256, 128))
    y = x @ rng.normal(size=(128, 128)) + rng.normal(size=(256, 128))
    direction = rng.normal(size=128)
    shift = 1e4 * direction / np.linalg.norm(direction)
    expected = reference_cka(x, y, True)
    f32 = torch.float32
    got = linear_cka(torch.tensor(x + shift, dtype=f32), torch.tensor(y + shift, dtype=f32))
    assert np.isfinite(got)
    assert abs(got - expected) < 1e-3


def test_matrix_is_symmetric_with_unit_diagonal_over_several_batches():
    gen = torch.Generator().manual_seed(4)
    acc = HSICAccumulator()
    for _ in range(3):
        base = torch.randn(50, 16, generator=gen)
        states = torch.stack([base, base + 0.3 * torch.randn(50, 16, generator=gen),
                              torch.randn(50, 16, generator=gen)])
        acc.update(states)
    cka = acc.cka()
    assert np.allclose(cka, cka.T)
    assert np.allclose(np.diag(cka), 1.0)
    assert cka[0, 1] > 0.8 and abs(cka[0, 2]) < 0.2
    # minibatch CKA normalises the MEAN of per-batch HSIC terms, not the mean of per-batch CKAs
    terms = np.stack(acc.debiased_terms)
    assert np.allclose(minibatch_cka(terms), cka)


def test_gram_matrices_are_double_centred():
    states = torch.randn(2, 30, 8) + 100.0
    grams = gram_matrices(states).double()
    assert grams.sum(dim=-1).abs().max() < 1e-2 * grams.abs().max()


def test_grams_without_channels_come_with_the_full_grams():
    g = torch.Generator().manual_seed(3)
    states = torch.randn(3, 40, 16, generator=g) + 5.0
    states[:, :4, 2] = 300.0  # a massive channel at a few tokens
    full, without = gram_matrices_centred_by(states, 30, [2, 7])
    plain, same = gram_matrices_centred_by(states, 30)
    assert same is plain and torch.allclose(full, plain, rtol=1e-5, atol=1e-2)
    zeroed = states.clone()
    zeroed[..., [2, 7]] = 0.0
    expected, _ = gram_matrices_centred_by(zeroed, 30)
    assert torch.allclose(without, expected, rtol=1e-5, atol=1e-3)
    assert torch.allclose(full[:, :30, :30], gram_matrices(states[:, :30]), rtol=1e-5, atol=1e-2)

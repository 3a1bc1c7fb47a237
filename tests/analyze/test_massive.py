"""Massive activations: detection, the views that remove them, and that those views are not fooled."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loopus_analyze.cka import linear_cka
from loopus_analyze.collect import measure
from loopus_analyze.corpus import make_batches
from loopus_analyze.massive import (
    MASSIVE_RATIO,
    MassiveTracker,
    channel_ratios,
    massive_token_mask,
    median_magnitude,
    normed_view,
    without_channels,
)
from loopus_core.models import model_parts, open_model
from loopus_core.texts import load_texts


def planted_states(seed: int = 0, n: int = 512, d: int = 64) -> torch.Tensor:
    """Two independent states (2, n, D) that share one massive channel (5) at the same 8 tokens."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2, n, d, generator=g)
    h[:, :8, 5] = 1000.0
    return h


def test_detection_finds_the_channel_and_the_tokens():
    h = planted_states().abs()
    median = median_magnitude(h)
    ratios = channel_ratios(h, median)
    assert ratios.shape == (2, 64)
    assert set(np.flatnonzero((ratios >= MASSIVE_RATIO).any(dim=0).numpy())) == {5}
    mask = massive_token_mask(h, median)
    assert mask[:8].all() and not mask[8:].any()


def test_raw_cka_is_fooled_and_the_view_without_the_channel_is_not():
    h = planted_states()
    raw = linear_cka(h[0], h[1])
    clean = without_channels(h, [5])
    assert raw > 0.9  # two independent states look the same: the shared massive tokens dominate
    assert abs(linear_cka(clean[0], clean[1])) < 0.05
    assert torch.equal(h[:, :, 5], planted_states()[:, :, 5])  # a copy: the input is unchanged
    assert without_channels(h, []) is h


def test_tracker_fixes_the_channels_on_the_first_batch():
    tracker = MassiveTracker(2)
    h = planted_states()
    ids = torch.arange(h.shape[1])
    assert tracker.add(h, ids) == [5]
    later = torch.randn(2, 256, 64)
    later[:, 3, 9] = 500.0
    assert tracker.add(later, ids[:256]) == [5]  # held fixed
    summary = tracker.summary()
    assert summary["channels"] == [5] and summary["channels_seen"] == [5, 9]
    assert summary["token_share"] == pytest.approx(9 / 768)
    assert summary["tokens"][0] == {"id": 3, "text": None, "count": 2}  # token 3 in both batches
    assert len(summary["channel_ratio"]["9"]) == 2


def test_normed_view_is_what_the_next_layer_reads(tiny_model_dirs):
    parts = model_parts(open_model(str(tiny_model_dirs["llama"])).model)
    h = torch.randn(parts.num_layers + 1, 10, 64)
    view = normed_view(parts, h)
    with torch.no_grad():
        assert torch.allclose(view[2], parts.layers[2].input_layernorm(h[2]))
        assert torch.allclose(view[-1], parts.norm(h[-1]))
    olmo = model_parts(open_model(str(tiny_model_dirs["olmo2"])).model)
    assert normed_view(olmo, h) is None  # post-norm: the layers read the raw stream


@pytest.mark.parametrize("family", ["llama", "olmo2"])
def test_the_pass_measures_every_view(tiny_model_dirs, family):
    opened = open_model(str(tiny_model_dirs[family]))
    batches = make_batches(opened.tokenizer, load_texts(None), tokens=240, seq_len=16, batch_size=4, seed=0)
    m = measure(opened.model, opened.tokenizer, batches, probes=False)
    assert set(m.views) == ({"normed", "no_massive"} if family == "llama" else {"no_massive"})
    for values in m.views.values():
        assert values["cka"].shape == (9, 9) and np.allclose(np.diag(values["cka"]), 1.0)
        assert values["drift"].shape == (8,) and np.all(values["drift"] >= 0)
    assert {"channels", "channels_seen", "tokens", "token_share"} <= set(m.massive_activations)

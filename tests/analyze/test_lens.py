"""Logit lens: the last state reads exactly the model's own logits; known answers on constructed states;
the tiled head scores what the full logits give."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from loopus_analyze.lens import head_logits, head_stats, lens_logits, lens_sums
from loopus_core.models import model_parts


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text"])
def test_last_state_lens_is_the_model_output(tiny_model_dirs, family):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[family]).eval()
    parts = model_parts(model)
    captured = {}
    handle = parts.layers[-1].register_forward_hook(
        lambda m, a, out: captured.update(h=out[0] if isinstance(out, tuple) else out))
    ids = torch.randint(3, 384, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        logits = model(input_ids=ids).logits
        lens = lens_logits(parts, captured["h"])
    handle.remove()
    assert torch.allclose(lens, logits, atol=1e-5)


def test_kl_top1_entropy_known_answers(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    parts = model_parts(model)
    final = torch.randn(10, 64, generator=torch.Generator().manual_seed(1))
    # state 0: zero vectors -> RMSNorm gives 0 -> uniform lens; state 1 = the final state
    h = torch.stack([torch.zeros(10, 64), final, final])
    with torch.inference_mode():
        sums = lens_sums(parts, h)
    mean = {k: v / 10 for k, v in sums.items()}
    vocab = model.config.vocab_size
    assert np.allclose(mean["kl"][1:], 0.0, atol=1e-6)
    assert np.allclose(mean["top1"][1:], 1.0)
    assert abs(mean["entropy"][0] - math.log(vocab)) < 1e-4
    assert mean["kl"][0] > 0.0
    # KL(final || uniform) = log V - H(final)
    assert abs(mean["kl"][0] - (math.log(vocab) - mean["entropy"][2])) < 1e-4


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text"])
@pytest.mark.parametrize("variant", ["plain", "soft-capped, with a bias"])
def test_tiled_head_equals_the_full_logits(tiny_model_dirs, family, variant):
    """log q(target), Σ p log q and argmax over vocabulary tiles (one tile, tiles that do not divide the
    vocabulary) equal those of the full logits of :func:`head_logits` (``prob`` of mass not exactly 1, as
    float32 probabilities are); all-zero states tie everywhere and take the first id."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[family]).eval()
    parts = model_parts(model)
    if variant != "plain":
        model.config.final_logit_softcapping = 3.0
        head = torch.nn.Linear(parts.lm_head.in_features, parts.lm_head.out_features, bias=True)
        head.weight.data.copy_(parts.lm_head.weight.data)
        torch.nn.init.normal_(head.bias, std=0.5, generator=torch.Generator().manual_seed(3))
        parts.lm_head = head
    g = torch.Generator().manual_seed(2)
    normed = torch.randn(3, 7, parts.lm_head.in_features, generator=g)
    normed[1, 2] = 0.0  # every logit equal (no bias): a tie across all tiles
    vocab = parts.lm_head.out_features
    prob = torch.softmax(torch.randn(7, vocab, generator=g) * 2, dim=-1) * 1.001
    targets = torch.randint(0, vocab, (7,), generator=g)
    with torch.inference_mode():
        logq = torch.log_softmax(head_logits(parts, normed), -1)
        for tile in (vocab, 100, 37):
            stats = head_stats(parts, normed, prob, targets, tile=tile)
            picked = logq.gather(-1, targets.expand(3, -1)[..., None])[..., 0]
            assert torch.allclose(stats.log_q_target, picked, atol=1e-5)
            assert torch.allclose(stats.p_log_q, torch.linalg.vecdot(logq, prob), atol=1e-5)
            assert torch.equal(stats.top, logq.argmax(-1))
    if variant == "plain":
        assert int(stats.top[1, 2]) == 0

"""Logit lens: the last state reads exactly the model's own logits; known answers on constructed states."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from loopus_analyze.lens import lens_logits, lens_sums
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

"""The embedded default model (SmolLM2-135M-Instruct, real weights): lossless conversion, same greedy text.

Converted with ``--split auto`` at the split that the session's ``loopus analyze`` of the default model
recommends (the ``default_analysis`` fixture).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loopus_convert import convert_model, load_looped

pytestmark = pytest.mark.slow


def test_default_model_one_loop_is_the_base_model(default_model_dir, default_analysis, tmp_path):
    report_dir = default_analysis[3]
    out = convert_model(None, tmp_path / "smollm-looped", split="auto", analysis=report_dir).out
    looped = load_looped(out)
    recommended = default_analysis[1]["split"]
    assert f"{looped.config.split_start}:{looped.config.split_end}" == recommended
    assert looped.lm_head.weight is looped.model.embed_tokens.weight  # tied embeddings stay tied
    base = AutoModelForCausalLM.from_pretrained(default_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer("The capital of France is Paris. The capital of Germany is", return_tensors="pt")
    with torch.no_grad():
        expected = base(**prompt).logits
        got = looped(**prompt, num_loops=1).logits
        assert (got - expected).abs().max().item() <= 1e-4
        kwargs = dict(max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        base_text = base.generate(**prompt, **kwargs)
        looped_text = looped.generate(**prompt, num_loops=1, **kwargs)
    assert torch.equal(base_text, looped_text)
    assert [int(r[0]) for r in looped.loop_record] == [1] * 16

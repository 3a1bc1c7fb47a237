"""The embedded default model (SmolLM2-135M-Instruct, real weights): lossless conversion, same greedy text.

The split is fixed at 4:26 here (a reasonable middle block of its 30 layers); no analysis.json helper exists
yet to read the recommended split from.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loopus_convert import convert_model, load_looped

pytestmark = pytest.mark.slow
SPLIT = "4:26"


def test_default_model_one_loop_is_the_base_model(default_model_dir, tmp_path):
    out = convert_model(str(default_model_dir), tmp_path / "smollm-looped", split=SPLIT).out
    looped = load_looped(out)
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

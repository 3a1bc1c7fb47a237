import json

import pytest
import torch

from loopus_core.errors import LoopusError
from loopus_core.models import layer_surgery, model_parts, open_model
from tests.tiny_models import FAMILIES as TINY_FAMILIES


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_open_and_reach_parts(tiny_model_dirs, family):
    opened = open_model(str(tiny_model_dirs[family]))
    parts = opened.parts
    assert parts.num_layers == 8
    assert opened.tokenizer is not None
    assert opened.fingerprint.startswith("sha256")
    # The parts reproduce the model: hooks on the last layer + final norm + lm_head give the logits.
    ids = torch.randint(3, 300, (2, 7))
    captured = {}
    handle = parts.layers[-1].register_forward_hook(
        lambda m, a, out: captured.__setitem__("h", out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        logits = opened.model(ids).logits
        again = parts.lm_head(parts.norm(captured["h"]))
    handle.remove()
    assert torch.allclose(logits, again, atol=1e-5)


def test_layer_surgery_repeats_and_restores(tiny_llama_dir):
    model = open_model(str(tiny_llama_dir)).model
    ids = torch.randint(3, 300, (1, 9))
    with torch.no_grad():
        before = model(ids, use_cache=False).logits
        with layer_surgery(model, list(range(6)) + list(range(2, 6)) + [6, 7]):
            assert model.config.num_hidden_layers == 12
            twice = model(ids, use_cache=False).logits
        after = model(ids, use_cache=False).logits
    assert model_parts(model).num_layers == 8 and model.config.num_hidden_layers == 8
    assert torch.equal(before, after)
    assert not torch.allclose(before, twice)


def test_missing_path(tmp_path):
    with pytest.raises(LoopusError, match="does not exist"):
        open_model(str(tmp_path / "nope"))


def test_directory_without_model(tmp_path):
    with pytest.raises(LoopusError, match="config.json is missing"):
        open_model(str(tmp_path))


def test_non_causal_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(LoopusError, match="not a decoder-only causal language model") as info:
        open_model(str(tmp_path))
    assert "bidirectional encoder" in str(info.value)


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ({"model_type": "t5"}, "it is an encoder-decoder"),
        ({"model_type": "bart"}, "it is an encoder-decoder"),
        ({"model_type": "roberta"}, "it is a bidirectional encoder"),
        ({"model_type": "qwen3_next", "num_hidden_layers": 4}, "linear_attention) carry a recurrent state"),
    ],
)
def test_refused_types_say_why(tmp_path, config, reason):
    """An encoder, an encoder-decoder and a hybrid with recurrent-state layers: one line with the reason and
    the model type, from the config alone (no weights read)."""
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoopusError, match=f"'{config['model_type']}'") as info:
        open_model(str(tmp_path))
    assert reason in str(info.value) and "\n" not in str(info.value)


def test_hub_id_offline_suggests_local_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LoopusError, match="pass the local directory"):
        open_model("HuggingFaceTB/definitely-not-cached-model")


def test_bad_dtype_and_device(tiny_llama_dir):
    with pytest.raises(LoopusError, match="--dtype"):
        open_model(str(tiny_llama_dir), dtype="float8")
    with pytest.raises(LoopusError, match="--device"):
        open_model(str(tiny_llama_dir), device="tpu")


@pytest.mark.slow
def test_embedded_default_model_opens(default_model_dir):
    opened = open_model(None)
    assert opened.name == "SmolLM2-135M-Instruct"
    assert opened.parts.num_layers == 30
    tok = opened.tokenizer
    ids = tok("The capital of France is", return_tensors="pt")
    out = opened.model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])

"""Saving and loading looped checkpoints; Auto classes with and without remote code; the official format."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import loopus_convert
from loopus_convert import import_official, load_looped
from tests.convert.conftest import CONFORMANCE, random_ids


def test_save_then_load_is_bit_identical(looped_llama_dir, tmp_path):
    model = load_looped(looped_llama_dir)
    with torch.no_grad():  # a trained-looking model: gate and head away from their init
        model.gate.delta_proj.weight.normal_(0, 0.5)
        model.gate.delta_proj.bias.normal_(0, 1)
        model.confidence_head.proj.weight.normal_(0, 0.3)
    from loopus_convert.checkpoint import save_looped

    out = save_looped(model, tmp_path / "saved")
    again = load_looped(out)
    auto = AutoModelForCausalLM.from_pretrained(out).eval()  # registered by `import loopus_convert`
    assert isinstance(auto, loopus_convert.LoopusForCausalLM)
    ids = random_ids(2, 14, seed=6)
    with torch.no_grad():
        for k in (1, 2, 4):
            expected = model(ids, num_loops=k)
            for other in (again, auto):
                got = other(ids, num_loops=k)
                assert torch.equal(got.logits, expected.logits)
                assert torch.equal(got.confidence, expected.confidence)


def test_save_pretrained_writes_a_self_contained_checkpoint(looped_llama, tmp_path):
    """The trainer's plain save_pretrained also copies the model files and writes auto_map."""
    looped_llama.save_pretrained(tmp_path / "trained")
    config = json.loads((tmp_path / "trained" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_loopus.LoopusForCausalLM"
    assert (tmp_path / "trained" / "modeling_loopus.py").is_file()
    assert (tmp_path / "trained" / "configuration_loopus.py").is_file()
    ids = random_ids(1, 6, seed=17)
    with torch.no_grad():
        again = load_looped(tmp_path / "trained")(ids, num_loops=2).logits
        assert torch.equal(again, looped_llama(ids, num_loops=2).logits)


def test_checkpoint_layout(looped_llama_dir):
    config = json.loads((looped_llama_dir / "config.json").read_text())
    assert config["model_type"] == "loopus" and config["base_config"]["model_type"] == "llama"
    assert (config["split_start"], config["split_end"], config["num_loops"]) == (2, 6, 2)
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_loopus.LoopusForCausalLM"
    from loopus_convert.checkpoint import read_header as _read_header

    header, _ = _read_header(looped_llama_dir / "model.safetensors")
    assert "model.layers.3.self_attn.q_proj.weight" in header and "gate.A_log" in header
    assert "confidence_head.proj.weight" in header and "lm_head.weight" in header
    for name in ("modeling_loopus.py", "configuration_loopus.py", "tokenizer.json", "generation_config.json"):
        assert (looped_llama_dir / name).is_file()
    assert "loopus_analyze" not in (looped_llama_dir / "modeling_loopus.py").read_text()


def test_tied_embeddings_stay_tied(tiny_model_dirs, tmp_path):
    from loopus_convert import convert_model

    out = convert_model(str(tiny_model_dirs["gpt2"]), tmp_path / "gpt2", split="1:7").out
    model = load_looped(out)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_remote_code_loads_without_loopus(looped_llama_dir, tmp_path):
    """trust_remote_code=True alone (loopus not importable) gives the same logits."""
    ids = random_ids(1, 8, seed=7)
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(looped_llama_dir)!r}, trust_remote_code=True)\n"
        "m.eval()\n"
        "assert 'loopus_convert' not in sys.modules and 'loopus_analyze' not in sys.modules\n"
        f"ids = torch.tensor({ids.tolist()})\n"
        "with torch.no_grad():\n"
        "    torch.save(m(ids, num_loops=3).logits, sys.argv[1])\n"
    )
    target = tmp_path / "logits.pt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    subprocess.run(
        [sys.executable, "-c", script, str(target)],
        check=True,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        timeout=300,
    )
    with torch.no_grad():
        expected = load_looped(looped_llama_dir)(ids, num_loops=3).logits
    assert torch.equal(torch.load(target), expected)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_official_conformance_vectors(family):
    vectors = np.load(CONFORMANCE / family / "vectors.npz")
    model = import_official(CONFORMANCE / family / "official")
    ids = torch.tensor(vectors["input_ids"])
    mask = torch.tensor(vectors["attention_mask"])
    with torch.no_grad():
        for n in range(1, 5):
            out = model(ids, attention_mask=mask, num_loops=n, exit_strategy="none")
            assert np.abs(out.logits.numpy() - vectors[f"logits_n{n}"]).max() <= 1e-4
            assert np.abs(out.confidence.numpy().T - vectors["q_logit"][:n]).max() <= 1e-4
        base = AutoModelForCausalLM.from_pretrained(CONFORMANCE / family / "base").eval()
        assert np.abs(base(ids, attention_mask=mask).logits.numpy() - vectors["base_logits"]).max() <= 1e-4


def test_official_checkpoint_converts_through_the_cli(cli, tmp_path):
    out = tmp_path / "imported"
    code, stdout, stderr = cli("convert", CONFORMANCE / "llama" / "official", "--out", out)
    assert code == 0, stderr
    assert "official" in stdout
    vectors = np.load(CONFORMANCE / "llama" / "vectors.npz")
    model = load_looped(out)
    assert (model.config.split_start, model.config.split_end, model.config.num_loops) == (1, 5, 4)
    with torch.no_grad():
        logits = model(torch.tensor(vectors["input_ids"]), num_loops=4, exit_strategy="none").logits
    assert np.abs(logits.numpy() - vectors["logits_n4"]).max() <= 1e-4

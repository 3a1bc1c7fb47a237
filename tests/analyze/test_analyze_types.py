"""``loopus analyze`` end to end (tiny budget) on tiny models of 20 causal-LM types of six layouts: dense,
MoE, sliding / hybrid attention, soft-capped or scaled logits, learned positions, parallel blocks. The same
derived family facts as the converter (``loopus_core.models.model_parts``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from loopus_convert.support import tiny_config

LAYERS = 6
LAYOUTS = {
    "dense": ("llama", "qwen3", "smollm3", "olmo3", "granite"),
    "moe": ("mixtral", "qwen3_moe", "olmoe", "deepseek_v3"),
    "sliding or hybrid attention": ("gemma3_text", "cohere2", "ministral", "llama4_text"),
    "soft-capped or scaled logits": ("gemma2", "cohere"),
    "learned positions": ("gpt2", "opt", "gpt_bigcode"),
    "parallel blocks": ("gptj", "falcon", "phi"),
}
TYPES = [t for types in LAYOUTS.values() for t in types]
FAST = (
    "--tokens",
    "256",
    "--seq-len",
    "32",
    "--map-tokens",
    "400",
    "--device",
    "cpu",
    "--seed",
    "0",
    "--no-probes",
)


def test_twenty_types_of_six_layouts():
    assert len(set(TYPES)) >= 20 and len(LAYOUTS) == 6


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.families
@pytest.mark.parametrize("model_type", TYPES)
def test_analyze_runs_on_the_type(cli, tiny_tokenizer_dir, tmp_path, model_type, figures_not_drawn):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    path = tmp_path / model_type
    config = tiny_config(model_type, num_hidden_layers=LAYERS, vocab_size=384)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_tokenizer_dir).save_pretrained(path)
    out = tmp_path / "report"
    code, stdout, stderr = cli("analyze", path, "--out", out, *FAST)
    assert code == 0, stderr
    analysis = json.loads((out / "analysis.json").read_text())
    assert analysis["model"]["model_type"] == config.model_type
    cka = np.array(analysis["measurements"]["cka_debiased"], dtype=float)
    assert cka.shape == (LAYERS + 1, LAYERS + 1) and not np.isnan(cka).any()
    start, end = map(int, analysis["split"].split(":"))
    assert 1 <= start < end <= LAYERS - 1
    assert (out / "report.html").is_file()

"""The looped model: lossless conversion for every family, the gate, the confidence feature, checkpointing."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from loopus_convert import LoopusConfig, LoopusForCausalLM, convert_model, load_looped, loop_base_model
from tests.convert.conftest import random_ids
from tests.tiny_models import tiny_config


@pytest.mark.parametrize("family", ["llama"])
def test_one_loop_reproduces_the_base_model(family, tiny_model_dirs, tmp_path):
    """Right after `convert`, one loop gives the base model's fp32 logits (with padding, too). Every other
    type: tests/convert/test_families.py (the same claims, through convert_model, on all of them)."""
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[family]).eval()
    out = convert_model(str(tiny_model_dirs[family]), tmp_path / "looped", split="2:6").out
    looped = load_looped(out)
    ids = random_ids(2, 24, seed=1)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding on the second row
    with torch.no_grad():
        expected = base(ids, attention_mask=mask).logits
        got = looped(ids, attention_mask=mask, num_loops=1)
    assert (got.logits - expected).abs().max().item() <= 1e-4
    assert got.loops_used.tolist() == [1, 1]
    # more loops really changes the function (the block runs again)
    with torch.no_grad():
        twice = looped(ids, attention_mask=mask, num_loops=2).logits
    assert (twice - expected).abs().max().item() > 1e-3


def test_k_loops_is_the_block_applied_k_times_with_the_gate(looped_llama):
    """forward(num_loops=K) == prepare -> encode -> loop_step x K -> decode (the public stage API)."""
    model = looped_llama
    ids = random_ids(2, 16, seed=2)
    with torch.no_grad():
        ctx = model.prepare(ids)
        h = model.encode(ctx)
        for _ in range(3):
            h = model.loop_step(h, ctx)
        manual = model.decode(h, ctx)
        assert torch.equal(manual, model(ids, num_loops=3).logits)
        assert model.confidence_logit(h, ctx).shape == (2,)


def test_identity_gate_is_exact_and_still_learns():
    gate_cfg = LoopusConfig(base_config=tiny_config("llama").to_dict(), split_start=1, split_end=3)
    model = LoopusForCausalLM(gate_cfg)
    gate = model.gate
    u, h_old = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    out = gate(u, h_old)
    assert torch.equal(out, u)  # Abar == 1 exactly in fp32
    out.pow(2).sum().backward()
    assert gate.delta_proj.bias.grad.abs().max().item() > 0  # gradients flow despite Abar == 1
    assert gate.dt_input_proj.weight.shape == (math.ceil(64 / 16), 64)


def test_official_gate_init_is_s4d():
    config = LoopusConfig(
        base_config=tiny_config("llama").to_dict(), split_start=1, split_end=3, gate_init="official"
    )
    gate = LoopusForCausalLM(config).gate
    assert torch.allclose(gate.A_log.exp(), torch.arange(1, 65, dtype=torch.float32))
    dt = torch.nn.functional.softplus(gate.delta_proj.bias)
    assert dt.min().item() >= 1e-3 * 0.999 and dt.max().item() <= 1e-1 * 1.001
    u, h_old = torch.randn(1, 4, 64), torch.randn(1, 4, 64)
    with torch.no_grad():
        assert not torch.allclose(
            gate(u, h_old), u
        )  # not the identity: a fresh official model is not the base


def test_config_validation():
    base = tiny_config("llama").to_dict()
    for bad in (
        dict(split_start=4, split_end=4),
        dict(split_start=0, split_end=9),
        dict(num_loops=0),
        dict(gate_init="zero"),
        dict(exit_strategy="sometimes"),
        dict(exit_threshold=1.5),
    ):
        with pytest.raises(ValueError):
            LoopusConfig(base_config=base, **{"split_start": 1, "split_end": 3, **bad})


def test_module_groups_cover_the_model_once(looped_llama):
    model = looped_llama
    groups = [model.encoder_modules(), model.loop_modules(), model.decoder_modules()]
    params = [{id(p) for m in group for p in m.parameters()} for group in groups]
    assert not (params[0] & params[1]) and not (params[1] & params[2])
    everything = {id(p) for p in model.parameters()}
    head = {id(p) for p in model.confidence_head.parameters()}
    assert params[0] | params[1] | params[2] | head == everything
    assert model.gate in model.loop_modules() and model.lm_head in model.decoder_modules()


def test_confidence_feature_is_the_last_valid_token(looped_llama):
    """Right padding: the feature is the last real token, the same function in training and inference."""
    model = looped_llama
    ids = random_ids(2, 10, seed=3)
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    with torch.no_grad():
        ctx = model.prepare(ids, mask)
        h = model.loop_step(model.encode(ctx), ctx)
        feature = model.confidence_feature(h, ctx)
        assert torch.equal(feature[0], h[0, 6]) and torch.equal(feature[1], h[1, 9])
        out = model(ids, attention_mask=mask, num_loops=1)
    assert torch.allclose(out.confidence[:, 0], model.confidence_head(feature), atol=1e-6)


def test_gradient_checkpointing_is_really_active(looped_llama):
    """With checkpointing on, the encoder, loop and decoder layers run again during backward."""
    model = looped_llama.train()
    calls = {"n": 0}
    # count MLP calls by wrapping forward (module hooks do not fire during torch's checkpoint replay)
    for layer in model.layers:

        def counted(*args, _forward=layer.mlp.forward, **kwargs):
            calls["n"] += 1
            return _forward(*args, **kwargs)

        layer.mlp.forward = counted
    ids = random_ids(2, 12, seed=4)

    def forward_backward() -> tuple[int, int]:
        calls["n"] = 0
        loss = model(ids, labels=ids, num_loops=2).loss
        during_forward = calls["n"]
        loss.backward()
        return during_forward, calls["n"] - during_forward

    forward_calls, plain_backward = forward_backward()
    assert forward_calls == 2 + 2 * 4 + 2 and plain_backward == 0
    model.gradient_checkpointing_enable()
    forward_calls, recomputed = forward_backward()
    assert forward_calls == 12 and recomputed == 12  # every layer pass recomputed in backward


def test_wrapping_an_in_memory_model_shares_its_modules():
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_config("qwen3")).eval()
    looped = loop_base_model(base, "1:7", num_loops=1)
    assert looped.lm_head is base.lm_head and looped.model is base.model
    ids = random_ids(1, 9, seed=5)
    with torch.no_grad():
        assert (looped(ids).logits - base(ids).logits).abs().max().item() <= 1e-5


def test_convert_to_bfloat16(tiny_llama_dir, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16).eval()
    out = convert_model(str(tiny_llama_dir), tmp_path / "bf16", split="2:6", dtype="bfloat16").out
    looped = load_looped(out, dtype="bfloat16")
    assert looped.gate.A_log.dtype == torch.bfloat16
    ids = random_ids(1, 12, seed=15)
    with torch.no_grad():
        assert torch.equal(looped(ids, num_loops=1).logits, base(ids).logits)


def test_checkpoint_the_fast_path_cannot_map_goes_through_transformers(
    tiny_model_dirs, tmp_path, monkeypatch
):
    """A tensor the looped model has no place for but transformers knows to ignore (GPT-2's old causal-mask
    buffer ``attn.bias``): converted through the transformers loader instead. (An unknown extra tensor is
    an error: tests/convert/test_defects.py::test_item02_*.)"""
    import shutil

    from safetensors.torch import load_file, save_file

    odd = tmp_path / "odd"
    shutil.copytree(tiny_model_dirs["gpt2"], odd)
    tensors = load_file(odd / "model.safetensors")
    tensors["transformer.h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 8, 8))
    save_file(tensors, odd / "model.safetensors", metadata={"format": "pt"})
    import loopus_convert.convert as convert

    real_open, loaded = convert.open_model, []

    def spy(source, **kwargs):
        loaded.append(source)
        return real_open(source, **kwargs)

    monkeypatch.setattr(convert, "open_model", spy)
    out = convert_model(str(odd), tmp_path / "looped", split="2:6").out
    assert loaded == [str(odd)]  # the transformers loader, not the streaming copy
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["gpt2"]).eval()
    ids = random_ids(1, 10, seed=16)
    with torch.no_grad():
        assert (load_looped(out)(ids).logits - base(ids).logits).abs().max().item() <= 1e-5

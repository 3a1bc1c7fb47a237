"""The selective gate: lossless at one loop, ordinary gradients from the first update, learns to damp."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from benchmarks.bench_gate import kl_to, overshoot_task
from loopus_convert import LoopusConfig, LoopusForCausalLM, convert_model, load_looped, loop_base_model
from loopus_convert.measure import gate_report
from loopus_convert.modeling_loopus import SelectiveGate
from loopus_train.optim import select_trainable
from loopus_train.rds import draw_supervised_steps, rds_micro_batch
from tests.convert.conftest import random_ids
from tests.tiny_models import tiny_config

TRAIN_PARTS = ("loop", "gate", "decoder", "head")


def _grad_norm(params) -> float:
    grads = [p.grad.detach().flatten() for p in params if p.grad is not None]
    return float(torch.cat(grads).norm()) if grads else 0.0


def first_update_ratio(base, split: str, gate_init: str, ids: torch.Tensor) -> float:
    """||grad of the gate|| / ||grad of the loop layers|| on the trainer's first RDS micro-batch (4 steps,
    2 supervised) from a fresh conversion (it shares the base's modules: their gradients are reset first)."""
    model = loop_base_model(base, split, gate_init=gate_init).train()
    select_trainable(model, TRAIN_PARTS)
    model.zero_grad(set_to_none=True)
    rds_micro_batch(model, ids, draw_supervised_steps(0, 0, 0, 4, 2))
    loop = [p for i in model.loop_range for p in model.layers[i].parameters()]
    return _grad_norm(model.gate.parameters()) / _grad_norm(loop)


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()


# ------------------------------------------------------------------------------------------ lossless


# the default (residual) init on every type: tests/convert/test_families.py; identity on three layouts
@pytest.mark.parametrize(
    ("gate_init", "family"),
    [("residual", "llama"), *[("identity", f) for f in ("llama", "gemma3_text", "gpt2")]],
)
def test_lossless_inits_reproduce_the_base_model(family, gate_init, tiny_model_dirs):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[family]).eval()
    ids = random_ids(2, 12, seed=3)
    with torch.no_grad():
        expected = base(ids).logits
        looped = loop_base_model(base, "2:6", gate_init=gate_init)
        assert (looped(ids, num_loops=1).logits - expected).abs().max().item() <= 1e-4


def test_residual_gate_is_exactly_the_identity_at_init_and_follows_its_formula():
    gate = SelectiveGate(64, 4, "residual")
    gate.reset()
    u, h_old = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    assert torch.equal(gate(u, h_old), u)  # lambda == 0 exactly, not to rounding
    with torch.no_grad():  # trained-looking: Abar = 1 - tanh(exp(A_log) * pre), h = u + lam (h_old - u)
        for p in gate.parameters():
            p.normal_(0, 0.5)
    pre = gate.delta_proj(gate.dt_input_proj(u - h_old))
    lam = torch.tanh(pre * gate.A_log.exp())
    assert torch.allclose(gate(u, h_old), u + lam * (h_old - u), atol=1e-5)
    assert torch.allclose(gate.mix_weight(u - h_old), 1 - lam)
    a_bar = gate.mix_weight(u - h_old)
    assert 0 <= a_bar.min() and a_bar.max() <= 2  # (0, 2), closed where tanh rounds to +-1


def test_a_config_without_gate_init_keeps_the_official_form(tiny_llama_dir, tmp_path):
    """Checkpoints from before ``residual`` existed: their gate_init is identity or official (the
    softplus form) and they load and run unchanged; a config lacking the field means identity."""
    out = convert_model(str(tiny_llama_dir), tmp_path / "old", split="2:6", gate_init="identity").out
    model = load_looped(out)
    with torch.no_grad():  # a trained-looking identity-form gate
        model.gate.delta_proj.weight.normal_(0, 0.5)
        model.gate.delta_proj.bias.normal_(0, 1)
    model.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    assert config["gate_init"] == "identity"
    del config["gate_init"]
    (out / "config.json").write_text(json.dumps(config))
    again = load_looped(out)
    assert again.gate.gate_init == "identity"
    ids = random_ids(1, 9, seed=4)
    with torch.no_grad():
        pre = model.gate.delta_proj(model.gate.dt_input_proj(torch.ones(1, 1, 64)))
        official = torch.exp(-F.softplus(pre) * model.gate.A_log.exp())
        assert torch.equal(again.gate.mix_weight(torch.ones(1, 1, 64)), official)
        assert torch.equal(again(ids, num_loops=3).logits, model(ids, num_loops=3).logits)


# ------------------------------------------------------------------------------------------ learning


def test_residual_gate_gradient_is_within_100x_of_the_loop_layers_at_the_first_update(tiny_llama):
    ids = random_ids(2, 64, seed=5)
    residual = first_update_ratio(tiny_llama, "2:6", "residual", ids)
    identity = first_update_ratio(tiny_llama, "2:6", "identity", ids)
    assert 1e-2 <= residual <= 1e2
    assert identity < 1e-6  # the defect of the identity init: the softplus slope ~1e-8 starves the gate


def test_residual_gate_gradient_is_ordinary_on_the_default_model(default_model_dir):
    """On the embedded SmolLM2 at split 10:20 (real weights: updates of real size) the gate's gradient is of
    the loop layers' order; the identity init gives ~1e-8 of it."""
    from transformers import AutoTokenizer

    from loopus_core.texts import load_texts

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    ids = torch.tensor(tokenizer(" ".join(load_texts(None)[:4]))["input_ids"][:64]).reshape(2, 32)
    residual = first_update_ratio(base, "10:20", "residual", ids)
    identity = first_update_ratio(base, "10:20", "identity", ids)
    assert 1e-2 <= residual <= 1e2
    assert identity < 1e-6


@pytest.mark.parametrize("gate_init", ["residual", "identity"])
def test_gate_learns_to_damp_an_overshooting_block(tiny_llama, gate_init):
    """The loop block overshoots (residual branches x2); trained alone for 40 Adam updates to match the base
    model, the residual gate moves Abar off 1 and cuts the loss at one and two loops; the identity gate
    does not move (its gradients are ~1e-8)."""
    ids = random_ids(8, 32, seed=6)
    with torch.no_grad():
        target = tiny_llama(ids).logits.log_softmax(-1)
    model = overshoot_task(tiny_llama, "2:6", gate_init)
    model.requires_grad_(False)
    model.gate.requires_grad_(True)
    optimizer = torch.optim.Adam(model.gate.parameters(), lr=1e-2)
    with torch.no_grad():
        before = [float(kl_to(model, ids, target, k)) for k in (1, 2)]
    for _ in range(40):
        optimizer.zero_grad()
        kl_to(model, ids, target, 1).backward()
        optimizer.step()
    with torch.no_grad():
        after = [float(kl_to(model, ids, target, k)) for k in (1, 2)]
    report = gate_report(model, ids, 2)["passes"]
    if gate_init == "residual":
        assert after[0] < 0.5 * before[0] and after[1] < before[1]
        assert report[0]["mean"] < 0.8  # damped, ~1 / scale
    else:
        assert after == pytest.approx(before, rel=1e-6, abs=1e-9)
        assert report[0]["min"] == report[0]["max"] == 1.0


# ------------------------------------------------------------------------------------------ the report


def test_gate_report_is_abar_per_pass(looped_llama):
    """The report's statistics are those of mix_weight(u - h_old) at each pass, computed by hand."""
    model = looped_llama
    with torch.no_grad():
        for p in model.gate.parameters():
            p.normal_(0, 0.3)
    blocks = random_ids(3, 10, seed=7)
    report = gate_report(model, blocks, 3, batch_size=2)
    assert [p["pass"] for p in report["passes"]] == [1, 2, 3] and report["tokens"] == 30
    with torch.no_grad():
        ctx = model.prepare(blocks)
        h = model.encode(ctx)
        for entry in report["passes"]:
            u = model._run_layers(h, ctx, model.loop_range)
            a_bar = model.gate.mix_weight(u - h).double()
            h = model.gate(u, h)
            assert entry["mean"] == pytest.approx(float(a_bar.mean()), rel=1e-5)
            assert entry["std"] == pytest.approx(float(a_bar.std(unbiased=False)), rel=1e-4)
            assert entry["min"] == pytest.approx(float(a_bar.min()), rel=1e-6)
            assert entry["max"] == pytest.approx(float(a_bar.max()), rel=1e-6)
    assert not model.gate._forward_hooks  # the hook is removed


def test_gate_report_at_conversion(tiny_llama_dir, tmp_path):
    """Abar is exactly 1 at every pass after a residual conversion; the official init damps (S4D)."""
    blocks = random_ids(2, 8, seed=8)
    residual = load_looped(convert_model(str(tiny_llama_dir), tmp_path / "r", split="2:6").out)
    for entry in gate_report(residual, blocks, 4)["passes"]:
        assert entry["mean"] == entry["min"] == entry["max"] == 1.0 and entry["std"] == 0.0
    config = LoopusConfig(base_config=tiny_config("llama").to_dict(), split_start=2, split_end=6,
                          gate_init="official")  # fmt: skip
    official = LoopusForCausalLM(config).eval()
    first = gate_report(official, blocks, 1)["passes"][0]
    assert first["max"] < 1.0 and 0.0 < first["min"] and first["std"] > 0.01

"""The official code's newer knobs (latent noise per loop step, randomised initial state) and GPU readiness
(SDPA attention, --compile wiring, bf16 autocast with fp32 master weights)."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from loopus_train.config import TrainConfig
from loopus_train.distributed import Distributed
from loopus_train.evaluate import run_eval
from loopus_train.optim import select_trainable
from loopus_train.rds import latent_noise, rds_micro_batch
from loopus_train.state import list_checkpoints
from loopus_train.train import _load_model
from tests.train.conftest import read_metrics, run_subprocess, tiny_args
from tests.train.standin import StandInLooped


def _relative_rms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per token: RMS(a - b) / RMS(b)."""
    return (a - b).pow(2).mean(-1).sqrt() / b.pow(2).mean(-1).sqrt()


def test_latent_noise_is_gaussian_at_the_asked_fraction_of_each_tokens_rms():
    torch.manual_seed(0)
    h = torch.randn(4, 64, 512) * torch.rand(4, 64, 1) * 10  # tokens of very different norms
    assert latent_noise(h, 0.0) is h
    noisy = latent_noise(h, 0.05)
    ratio = _relative_rms(noisy, h)
    assert torch.allclose(ratio, torch.full_like(ratio, 0.05), rtol=0.15)  # 512 channels per token
    assert abs(float(((noisy - h) / h.pow(2).mean(-1, keepdim=True).sqrt()).mean())) < 0.005  # zero mean


class _Recording(StandInLooped):
    """The stand-in, recording what the encoder returns and what each loop pass reads and returns."""

    def __init__(self) -> None:
        super().__init__()
        self.encoded, self.inputs, self.outputs = None, [], []

    def encode(self, ctx):
        self.encoded = super().encode(ctx).detach().clone()
        return self.encoded

    def loop_step(self, h, ctx):
        out = super().loop_step(h, ctx)
        self.inputs.append(h.detach().clone())
        self.outputs.append(out.detach().clone())
        return out


def _trace(**noise):
    model = _Recording()
    select_trainable(model, ("loop", "gate", "decoder", "head"))
    ids = torch.randint(0, 48, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    rds_micro_batch(model, ids, [2, 4], passes=2, **noise)
    return model


def test_noise_knobs_act_where_the_official_code_puts_them():
    plain = _trace()
    assert torch.equal(plain.inputs[0], plain.encoded)
    assert all(torch.equal(i, o) for i, o in zip(plain.inputs[1:], plain.outputs, strict=False))
    # --init-noise-std: only the loop's initial state h0 is perturbed, by the asked fraction of its RMS
    start = _trace(init_noise_std=0.1)
    assert abs(float(_relative_rms(start.inputs[0], start.encoded).mean()) - 0.1) < 0.03
    assert all(torch.equal(i, o) for i, o in zip(start.inputs[1:], start.outputs, strict=False))
    # --noise-std: every loop pass's output (the gate's mix) is perturbed before the next pass reads it
    step = _trace(noise_std=0.1)
    assert torch.equal(step.inputs[0], step.encoded)
    gaps = [float(_relative_rms(i, o).mean()) for i, o in zip(step.inputs[1:], step.outputs, strict=False)]
    assert len(gaps) == 5 and all(0.07 < g < 0.13 for g in gaps)  # 4 steps, passes 2 at steps 2 and 4


def test_evaluation_is_noise_free(looped_tiny):
    from loopus_convert import load_looped

    model = load_looped(looped_tiny)
    held = torch.randint(3, 384, (2, 16), generator=torch.Generator().manual_seed(2))
    plain = TrainConfig(checkpoint="", out="", loop_steps=3, eval_loops=(1, 3), eval_thresholds=(0.9,))
    noisy = TrainConfig(**{**plain.__dict__, "noise_std": 0.5, "init_noise_std": 0.5})
    assert run_eval(model, held, noisy, None) == run_eval(model, held, plain, None)


def test_a_noisy_run_changes_the_losses_and_still_resumes_exactly(looped_tiny, train_text, tmp_path):
    flags = dict(noise_std=0.05, init_noise_std=0.05)
    plain, noisy, out = tmp_path / "plain", tmp_path / "noisy", tmp_path / "run"
    assert run_subprocess(tiny_args(looped_tiny, train_text, plain, steps=2, save_every=2)).returncode == 0
    assert run_subprocess(tiny_args(looped_tiny, train_text, noisy, **flags)).returncode == 0
    assert read_metrics(noisy)[0]["loss"] != read_metrics(plain)[0]["loss"]
    killed = run_subprocess(
        tiny_args(looped_tiny, train_text, out, **flags), {"LOOPUS_TEST_KILL": "after-save:4"}
    )
    assert killed.returncode == -9
    resumed = run_subprocess(tiny_args(looped_tiny, train_text, out, resume=True, **flags))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    mine, ref = read_metrics(out), read_metrics(noisy)
    assert [r["loss"] for r in mine[4:]] == [r["loss"] for r in ref[4:]]  # the RNG states were restored


def test_models_attend_through_sdpa(looped_tiny):
    from loopus_convert.checkpoint import load_with_tokenizer

    model, _ = load_with_tokenizer(looped_tiny)
    assert model.config._attn_implementation == "sdpa"
    assert model.base_config._attn_implementation == "sdpa"
    assert type(model.layers[0].self_attn).__name__ == "LlamaAttention"


def test_compile_wraps_the_loop_block_and_the_gate_only(looped_tiny, tmp_path):
    cfg = TrainConfig(
        checkpoint=str(looped_tiny), out=str(tmp_path / "x"), loop_steps=3, supervised=2, compile=True
    )
    model = _load_model(cfg, Distributed(), None)[0]
    compiled = [i for i, layer in enumerate(model.layers) if layer._compiled_call_impl is not None]
    assert compiled == list(model.loop_range) == [2, 3, 4, 5]
    assert model.gate._compiled_call_impl is not None and model.confidence_head._compiled_call_impl is None


def test_bf16_autocast_trains_fp32_master_weights(looped_tiny, train_text, tmp_path, cli):
    out = tmp_path / "run"
    code, _, stderr = cli(*tiny_args(looped_tiny, train_text, out, steps=2, save_every=2, precision="bf16"))
    assert code == 0, stderr
    weights = load_file(str(list_checkpoints(out)[-1][1] / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}
    start = load_file(str(looped_tiny / "model.safetensors"))
    delta = torch.cat([(weights[k] - start[k]).flatten() for k in weights if k.startswith("model.layers.3.")])
    before = torch.cat([start[k].flatten() for k in weights if k.startswith("model.layers.3.")])
    # updates smaller than bf16's resolution at the weight (8 bits of mantissa) were kept: fp32 master weights
    assert ((delta != 0) & (delta.abs() < before.abs() * 2**-9)).any()

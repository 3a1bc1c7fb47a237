"""LoRA through peft: what gets adapters, held-out loss goes down, merged = base + adapters and loads without
peft, adapter checkpoints resume exactly, and bad ranks are one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from loopus_train.state import list_checkpoints
from tests.train.conftest import REPO, read_metrics, run_subprocess, tiny_args
from tests.train.test_errors import _one_line_error


@pytest.fixture(scope="module")
def lora_run(looped_tiny, train_text, tmp_path_factory):
    """30 updates of rank-8 LoRA (evaluated at 15 and 30, adapter checkpoints every 10)."""
    out = tmp_path_factory.mktemp("lora") / "run"
    args = tiny_args(
        looped_tiny,
        train_text,
        out,
        steps=30,
        lr=3e-3,
        save_every=10,
        eval_every=15,
        eval_blocks=8,
        lora_rank=8,
    )
    done = run_subprocess(args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(lora,gate,head)" in done.stdout
    return out


def _adapted(looped_tiny, checkpoint):
    """The base checkpoint with the run's adapter, unmerged (peft's LoRA layers)."""
    from peft import LoraConfig

    from loopus_convert import load_looped
    from loopus_train.lora import add_lora, load_adapter

    model = load_looped(looped_tiny)
    add_lora(model, LoraConfig.from_pretrained(str(checkpoint / "adapter")))
    load_adapter(model, checkpoint)
    return model.eval()


def test_adapters_sit_on_the_loop_block_and_decoder_with_gate_and_head_in_full(lora_run):
    saved = load_file(str(list_checkpoints(lora_run)[0][1] / "adapter" / "adapter_model.safetensors"))
    layers = {int(k.split(".")[2]) for k in saved if ".lora_" in k}
    assert layers == set(
        range(2, 8)
    )  # split 2:6 of 8 layers: loop block 2-5, decoder 6-7; encoder 0-1 frozen
    projections = {k.split(".")[-4] for k in saved if ".lora_" in k}
    assert projections == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert {"gate.A_log", "confidence_head.proj.weight"} <= set(saved)
    assert not any("base_layer" in k or "embed_tokens" in k for k in saved)


def test_a_lora_run_lowers_held_out_loss_and_merges_into_base_plus_adapters(
    lora_run, looped_tiny, train_text
):
    from transformers import AutoTokenizer

    from loopus_convert import load_looped
    from loopus_convert.measure import loss_per_loops
    from loopus_train.data import load_blocks

    held = load_blocks(
        AutoTokenizer.from_pretrained(looped_tiny), str(train_text), block_size=32, held_out=0.05, seed=0
    ).held_out[:8]
    before = loss_per_loops(load_looped(looped_tiny), held, [4])["loops"]["4"]["loss"]
    evals = read_metrics(lora_run, "eval")
    assert [e["step"] for e in evals] == [15, 30]
    assert evals[-1]["loops"]["4"]["loss"] < evals[0]["loops"]["4"]["loss"] < before
    checkpoints = [path for _, path in list_checkpoints(lora_run)]
    assert not (checkpoints[0] / "model.safetensors").exists()  # during the run: the adapter only
    final = checkpoints[-1]
    merged = load_looped(final)
    assert not any(".lora_" in k for k in load_file(str(final / "model.safetensors")))
    adapted = _adapted(looped_tiny, final)
    with torch.no_grad():
        for k in (1, 4):
            ours, theirs = merged(held, num_loops=k).logits, adapted(held, num_loops=k).logits
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert loss_per_loops(merged, held, [4])["loops"]["4"]["loss"] == pytest.approx(
        evals[-1]["loops"]["4"]["loss"], rel=1e-5
    )


def test_the_merged_checkpoint_loads_and_generates_without_peft(lora_run):
    final = list_checkpoints(lora_run)[-1][1]
    script = (
        "import sys; sys.modules['peft'] = None\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(final)!r}, trust_remote_code=True)\n"
        f"t = AutoTokenizer.from_pretrained({str(final)!r}, trust_remote_code=True)\n"
        "ids = t('The quick brown', return_tensors='pt').input_ids\n"
        "print(m.generate(ids, max_new_tokens=4, do_sample=False).shape[1] - ids.shape[1])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "4"


def test_sigkill_in_a_lora_run_then_resume_matches_the_uninterrupted_run(looped_tiny, train_text, tmp_path):
    flags = dict(lora_rank=4, lr=3e-3)
    reference = tmp_path / "reference"
    assert run_subprocess(tiny_args(looped_tiny, train_text, reference, **flags)).returncode == 0
    out = tmp_path / "run"
    killed = run_subprocess(
        tiny_args(looped_tiny, train_text, out, **flags), {"LOOPUS_TEST_KILL": "after-save:4"}
    )
    assert killed.returncode == -9
    resumed = run_subprocess(tiny_args(looped_tiny, train_text, out, resume=True, **flags))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    mine, ref = read_metrics(out), read_metrics(reference)
    assert [r["step"] for r in mine] == list(range(1, 9))
    for a, b in zip(mine[4:], ref[4:], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)
    a, b = (load_file(str(list_checkpoints(o)[-1][1] / "model.safetensors")) for o in (out, reference))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("rank", ["0", "-3"])
def test_a_lora_rank_below_one_is_a_one_line_error(cli, looped_tiny, train_text, tmp_path, rank):
    _one_line_error(
        cli(*tiny_args(looped_tiny, train_text, tmp_path / "out", lora_rank=rank)),
        f"--lora-rank {rank}",
        "[1, 65536]",
    )
    assert not (tmp_path / "out").exists()

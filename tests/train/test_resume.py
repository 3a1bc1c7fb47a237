"""Exact resume after SIGKILL (one process and sharded), a kill in a checkpoint write, torchrun (2 ranks,
FSDP2) = 1 process, the consolidated checkpoint of a sharded run."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from loopus_train.state import list_checkpoints
from tests.train.conftest import read_metrics, run_subprocess, tiny_args


@pytest.fixture(scope="module")
def reference(looped_tiny, train_text, tmp_path_factory):
    """An uninterrupted 8-step run (in a subprocess, like the interrupted ones)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    done = run_subprocess(tiny_args(looped_tiny, train_text, out))
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def sharded_reference(looped_tiny, train_text, tmp_path_factory):
    """The same 8-step run on 2 processes under torchrun (FSDP2, gloo)."""
    out = tmp_path_factory.mktemp("sharded") / "run"
    done = run_subprocess(tiny_args(looped_tiny, train_text, out), torchrun=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on 2 process(es)" in done.stdout
    return out


def _final_weights(out):
    return load_file(str(list_checkpoints(out)[-1][1] / "model.safetensors"))


def _assert_same_run(ours, reference, from_step, rel=1e-6):
    mine = {r["step"]: r for r in read_metrics(ours)}
    ref = {r["step"]: r for r in read_metrics(reference)}
    assert sorted(mine) == sorted(ref) == list(range(1, 9))
    for step in range(from_step, 9):
        assert mine[step]["supervised_steps"] == ref[step]["supervised_steps"]
        assert mine[step]["loss"] == pytest.approx(ref[step]["loss"], rel=rel, abs=1e-7), step
        assert mine[step]["lr"] == ref[step]["lr"]
    a, b = _final_weights(ours), _final_weights(reference)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_sigkill_after_a_checkpoint_then_resume_matches_an_uninterrupted_run(
    looped_tiny, train_text, reference, tmp_path
):
    out = tmp_path / "run"
    killed = run_subprocess(tiny_args(looped_tiny, train_text, out), {"LOOPUS_TEST_KILL": "after-save:4"})
    assert killed.returncode == -9  # SIGKILL, no clean exit
    assert [step for step, _ in list_checkpoints(out)] == [2, 4]
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]
    resumed = run_subprocess(tiny_args(looped_tiny, train_text, out, resume=True))
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_run(out, reference, from_step=5)
    assert [step for step, _ in list_checkpoints(out)] == [4, 6, 8]  # --keep 3


def test_kill_during_a_checkpoint_write_keeps_the_previous_one(looped_tiny, train_text, reference, tmp_path):
    from loopus_convert import load_looped

    out = tmp_path / "run"
    killed = run_subprocess(tiny_args(looped_tiny, train_text, out), {"LOOPUS_TEST_KILL": "mid-save:4"})
    assert killed.returncode == -9
    assert [step for step, _ in list_checkpoints(out)] == [2]  # step 4 never became a checkpoint
    assert any(p.name.startswith(".tmp-step-00000004") for p in (out / "checkpoints").iterdir())
    model = load_looped(list_checkpoints(out)[0][1])  # the previous checkpoint loads
    assert model.config.model_type == "loopus"
    resumed = run_subprocess(tiny_args(looped_tiny, train_text, out, resume=True))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at step 2 from" in resumed.stdout
    assert not any(p.name.startswith(".tmp") for p in (out / "checkpoints").iterdir())
    _assert_same_run(out, reference, from_step=3)


def test_two_ranks_under_torchrun_match_one_process(looped_tiny, reference, sharded_reference):
    out = sharded_reference
    mine, ref = read_metrics(out), read_metrics(reference)
    assert [r["step"] for r in mine] == [r["step"] for r in ref]
    for a, b in zip(mine, ref, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    # the weights agree to well within how far training moved them (Adam magnifies last-bit differences
    # of near-zero gradients into lr-sized steps on some elements, so bitwise equality is not expected)
    a, b = _final_weights(out), _final_weights(reference)
    start = load_file(str(looped_tiny / "model.safetensors"))
    gap = sum(float((a[k] - b[k]).norm() ** 2) for k in a) ** 0.5
    moved = sum(float((b[k] - start[k]).norm() ** 2) for k in b) ** 0.5
    assert moved > 0.1 and gap < 0.01 * moved, (gap, moved)


def test_sigkill_during_a_sharded_run_then_resume_matches_an_uninterrupted_sharded_run(
    looped_tiny, train_text, sharded_reference, tmp_path
):
    out = tmp_path / "run"
    args = tiny_args(looped_tiny, train_text, out)
    killed = run_subprocess(args, {"LOOPUS_TEST_KILL": "after-save:4"}, torchrun=2)
    assert killed.returncode != 0  # torchrun reports the killed ranks
    assert [step for step, _ in list_checkpoints(out)] == [2, 4]
    checkpoint = list_checkpoints(out)[-1][1]
    shards = {p.name for p in (checkpoint / "optimizer").iterdir()}
    assert shards >= {".metadata", "__0_0.distcp", "__1_0.distcp"}  # each rank wrote its own part
    assert (checkpoint / "rng-rank-00000.json").is_file() and (checkpoint / "rng-rank-00001.json").is_file()
    resumed = run_subprocess(tiny_args(looped_tiny, train_text, out, resume=True), torchrun=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_run(out, sharded_reference, from_step=5)


def test_consolidated_checkpoint_of_a_sharded_run_loads_with_auto_classes_and_generates(sharded_reference):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = list_checkpoints(sharded_reference)[-1][1]
    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True)
    assert model.config.model_type == "loopus" and model.config.num_loops == 4
    saved = load_file(str(checkpoint / "model.safetensors"))  # complete tensors, not one rank's shards
    assert all(saved[k].shape == v.shape for k, v in model.state_dict().items() if k in saved)
    tok = AutoTokenizer.from_pretrained(checkpoint)
    ids = tok("The quick brown", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 5)

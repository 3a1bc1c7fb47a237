"""Exact resume after SIGKILL (one process and sharded), a kill in a checkpoint write, torchrun (2 ranks,
FSDP2) = 1 process, the consolidated checkpoint of a sharded run; SIGTERM and Ctrl-C in a checkpoint write,
a second writer of the same run, and a resume past damage (issue 13, items 5, 10, 13, 16; acceptance 2)."""

from __future__ import annotations

import hashlib
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file

from loopus_train.state import RNG_FILE, list_checkpoints
from tests.train.conftest import read_metrics, run_subprocess, start_blocked, tiny_args

MID_WRITE = "loopus_train.state:write_safetensors:2"  # the weights of checkpoint 4 (--save-every 2)


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
    assert (out / "checkpoints" / ".lock-step-00000004").exists()  # SIGKILL leaves the lock file too
    model = load_looped(list_checkpoints(out)[0][1])  # the previous checkpoint loads
    assert model.config.model_type == "loopus"
    resumed = run_subprocess(tiny_args(looped_tiny, train_text, out, resume=True))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at step 2 from" in resumed.stdout
    assert not any(p.name.startswith((".tmp", ".lock")) for p in (out / "checkpoints").iterdir())
    assert _ours_next_to(out) == []  # nor the run's lock file
    _assert_same_run(out, reference, from_step=3)


def _hashes(directory):
    return {
        p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _ours_next_to(out):
    """What loopus left next to the run directory (a lock file, a temporary directory)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name and out.name in p.name)


@pytest.mark.parametrize(
    ("signum", "status", "word"), [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")]
)
def test_a_signal_mid_checkpoint_write_leaves_nothing_and_resume_is_exact(
    looped_tiny, train_text, reference, tmp_path, signum, status, word
):
    out = tmp_path / "run"
    args = tiny_args(looped_tiny, train_text, out)
    process = start_blocked(args, MID_WRITE, tmp_path / "ready")
    root = out / "checkpoints"
    assert [step for step, _ in list_checkpoints(out)] == [2]
    assert any(p.name.startswith(".tmp-step-00000004-") for p in root.iterdir())  # really mid-write
    previous = _hashes(root / "step-00000002")
    if signum == signal.SIGTERM:  # item 10: a second `loopus finetune` on the same --out stops at once
        second = run_subprocess(args)
        assert second.returncode == 2, second.stderr
        assert f"being written by another loopus process (pid {process.pid})" in second.stderr
        assert "Traceback" not in second.stderr
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == status, stderr  # 143: what a shell reports for SIGTERM; 130: Ctrl-C
    assert f"{word}; nothing half-written was left behind" in stderr and "Traceback" not in stderr
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002"]  # true: no temporary dir, no lock
    assert _ours_next_to(out) == []
    assert _hashes(root / "step-00000002") == previous  # the previous checkpoint, byte for byte
    resumed = run_subprocess(tiny_args(looped_tiny, train_text, out, resume=True))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at step 2 from" in resumed.stdout
    _assert_same_run(out, reference, from_step=3)


def test_resume_past_damage_it_can_survive_matches_an_uninterrupted_run(
    looped_tiny, train_text, reference, tmp_path
):
    """Item 13 end to end: an incomplete newest checkpoint (its RNG state gone), a half-written last line
    in metrics.jsonl and a stray checkpoints/step-latest; the resume falls back to step 2, says so, and
    ends where the uninterrupted run does."""
    out = tmp_path / "run"
    killed = run_subprocess(tiny_args(looped_tiny, train_text, out), {"LOOPUS_TEST_KILL": "after-save:4"})
    assert killed.returncode == -9
    root = out / "checkpoints"
    (root / "step-00000004" / RNG_FILE.format(rank=0)).unlink()
    shutil.copytree(root / "step-00000002", root / "step-latest")
    with (out / "metrics.jsonl").open("a") as fh:
        fh.write('{"kind": "train", "st')
    resumed = run_subprocess(tiny_args(looped_tiny, train_text, out, resume=True), {"COLUMNS": "400"})
    assert resumed.returncode == 0, resumed.stderr
    assert "step-00000004 is incomplete (rng-rank-00000.json is missing)" in resumed.stderr
    assert "dropping line(s)" in resumed.stderr
    assert "resuming at step 2 from" in resumed.stdout
    _assert_same_run(out, reference, from_step=3)
    assert [step for step, _ in list_checkpoints(out)] == [4, 6, 8]  # step 4 rewritten, complete


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

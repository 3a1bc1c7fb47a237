"""``loopus finetune`` with RDS on a tiny MoE model (router auxiliary outputs off, experts loop like any
layer) and a tiny Gemma-2-style model (sliding-window layers, soft-capped logits, scaled embeddings): four
updates, and a SIGKILL after the second one's checkpoint then ``--resume`` give the same run (issue 22)."""

from __future__ import annotations

import pytest
import torch

from loopus_convert.support import tiny_config
from loopus_train.state import list_checkpoints
from tests.train.conftest import read_metrics, run_subprocess, tiny_args


@pytest.fixture(scope="module", params=["qwen3_moe", "gemma2"])
def looped_type(request, tiny_tokenizer_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loopus_convert import convert_model

    root = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    config = tiny_config(request.param, num_hidden_layers=6, vocab_size=384)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(root / "base")
    AutoTokenizer.from_pretrained(tiny_tokenizer_dir).save_pretrained(root / "base")
    convert_model(str(root / "base"), root / "looped", split="1:4")
    return root / "looped"


def test_rds_trains_and_resumes_exactly(looped_type, train_text, tmp_path):
    settings = dict(steps=4, save_every=2, eval_loops="1,2", eval_blocks=1)
    reference = tmp_path / "reference"
    done = run_subprocess(tiny_args(looped_type, train_text, reference, **settings))
    assert done.returncode == 0, done.stderr[-2000:]
    losses = [r["loss"] for r in read_metrics(reference)]
    assert len(losses) == 4 and all(loss == loss and loss > 0 for loss in losses)  # finite, not NaN
    out = tmp_path / "run"
    killed = run_subprocess(
        tiny_args(looped_type, train_text, out, **settings), {"LOOPUS_TEST_KILL": "after-save:2"}
    )
    assert killed.returncode == -9
    assert [step for step, _ in list_checkpoints(out)] == [2]
    resumed = run_subprocess(tiny_args(looped_type, train_text, out, resume=True, **settings))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    mine = {r["step"]: r["loss"] for r in read_metrics(out)}
    ref = {r["step"]: r["loss"] for r in read_metrics(reference)}
    assert sorted(mine) == [1, 2, 3, 4]
    for step in (3, 4):
        assert mine[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-7)

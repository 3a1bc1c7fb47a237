"""The FSDP2 engine through the real trainer: one process's gradients, one reduction per unit per update."""

from __future__ import annotations

import json

import pytest
import torch

from loopus_train.config import PARTS
from loopus_train.rds import draw_supervised_steps
from tests.train.conftest import REPO, read_metrics, run_subprocess, tiny_args

DRIVER = str(REPO / "tests" / "train" / "fsdp_driver.py")


@pytest.fixture(scope="module")
def looped_gemma(tiny_model_dirs, tmp_path_factory):
    """The tiny Gemma3 (tied embeddings, sliding-window layers) converted at 2:6."""
    from loopus_convert import convert_model

    out = tmp_path_factory.mktemp("looped-gemma") / "gemma-2-6"
    convert_model(str(tiny_model_dirs["gemma3_text"]), out, split="2:6")
    return out


def _recorded_updates(ckpt, data, out, record, ranks, **flags):
    """Each update's record (gradient reductions, per-parameter norms) and its whole gradient vector."""
    args = tiny_args(ckpt, data, out, steps=2, save_every=2, **flags)
    done = run_subprocess(args, torchrun=ranks, driver=[DRIVER, str(record)])
    assert done.returncode == 0, done.stderr[-3000:]
    vectors = torch.load(f"{record}.pt")
    return [
        {**update, "grad": grad} for update, grad in zip(json.loads(record.read_text()), vectors, strict=True)
    ]


# Two ranks against one process, the whole gradient vector of an update (every trained parameter's full
# gradient, concatenated): the ranks sum their slices in another order and the gloo all-reduce adds in
# float32, so the vectors agree to float32 rounding, not bitwise. Measured: relative L2 difference <= 1.8e-6,
# largest element difference <= 1.6e-6 of the largest gradient element (gemma, two passes per step).
GRAD_TOLERANCE = 1e-5


def _assert_same_gradients(one, two):
    """Each update's gradient vector of two ranks equals one process's: ``||g2 - g1|| <= 1e-5 ||g1||`` and
    every element within ``1e-5 * max|g1|``."""
    assert len(one) == len(two) == 2
    for a, b in zip(one, two, strict=True):
        g1, g2 = a["grad"], b["grad"]
        assert g1.numel() == g2.numel() > 10_000 and g1.norm() > 0
        assert float((g2 - g1).norm()) <= GRAD_TOLERANCE * float(g1.norm())
        assert float((g2 - g1).abs().max()) <= GRAD_TOLERANCE * float(g1.abs().max())


def _reductions(update: int, flags: dict) -> int:
    """FSDP gradient reductions expected in one update of the runs below (4 loop layers at split 2:6)."""
    encoder = "encoder" in flags.get("train", "") and any(
        1 in draw_supervised_steps(0, update, micro, 4, 2) for micro in range(2)
    )
    units = 6 + 3 + (2 if encoder else 0)  # layers 2-7, gate, head, root (+ layers 0-1)
    return units + (flags.get("passes_per_step", 1) - 1) * 5  # 4 loop layers and the gate, once more


@pytest.mark.parametrize(
    "model, flags",
    [
        ("llama", dict(train=",".join(PARTS))),  # every part, the encoder and embeddings too
        ("gemma", dict(passes_per_step=2)),  # tied embeddings, the official two passes per step
    ],
)
def test_two_ranks_give_one_process_gradients_with_one_reduction_per_update(
    model, flags, looped_tiny, looped_gemma, train_text, tmp_path
):
    ckpt = looped_tiny if model == "llama" else looped_gemma
    common = dict(beta=1.0, grad_accum=2, **flags)  # beta 1: the rank-averaged SiLU(CE - CE_prev) term too
    one = _recorded_updates(ckpt, train_text, tmp_path / "one", tmp_path / "one.json", 0, **common)
    two = _recorded_updates(ckpt, train_text, tmp_path / "two", tmp_path / "two.json", 2, **common)
    _assert_same_gradients(one, two)
    # 2 micro-batches x 2 supervised steps = 4 backward passes per update, yet each FSDP unit with gradients
    # reduces them once per update: layers 2-7, the gate, the head, the root (with the encoder trained, layers
    # 0-1 too when step 1 was supervised); a unit run twice in the last backward pass (the loop layers and the
    # gate with two passes per step) reduces twice
    assert [u["reductions"] for u in two] == [_reductions(update, flags) for update in range(2)]
    assert [u["reductions"] for u in one] == [0, 0]  # one process: no FSDP at all
    assert [r["loss"] for r in read_metrics(tmp_path / "two")] == pytest.approx(
        [r["loss"] for r in read_metrics(tmp_path / "one")], rel=1e-5
    )


def test_two_ranks_give_one_process_gradients_on_labelled_records(looped_tiny, tmp_path):
    """Prompt/completion pairs whose completions differ in length, so that the ranks hold different numbers
    of supervised tokens: the CE normalised by the batch's count keeps the two ranks equal to one process."""
    lines = []
    for i in range(24):
        answer = " yes" if i % 3 else " the answer is " + " ".join(["long"] * (2 + i % 7))
        lines.append(json.dumps({"prompt": f"Question {i}: is {i} a small number?", "completion": answer}))
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(lines) + "\n")
    common = dict(beta=1.0, grad_accum=2, block_size=48, held_out=0.1)
    one = _recorded_updates(looped_tiny, data, tmp_path / "one", tmp_path / "one.json", 0, **common)
    two = _recorded_updates(looped_tiny, data, tmp_path / "two", tmp_path / "two.json", 2, **common)
    _assert_same_gradients(one, two)
    assert [r["loss"] for r in read_metrics(tmp_path / "two")] == pytest.approx(
        [r["loss"] for r in read_metrics(tmp_path / "one")], rel=1e-5
    )

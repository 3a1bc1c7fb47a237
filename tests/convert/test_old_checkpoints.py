"""Looped checkpoints written by the code before issue 22 (commit 4c2a688^) still load, with the outputs that
code produced (issue 22 item 9). The fixtures and how they were made: tests/data/old_checkpoints/README.md."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loopus_convert import load_looped

OLD = Path(__file__).resolve().parents[1] / "data" / "old_checkpoints"


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_old_checkpoint_loads_with_its_outputs(name):
    expected = load_file(OLD / name / "expected.safetensors")
    ids, mask = expected["input_ids"], expected["attention_mask"]
    model = load_looped(OLD / name)
    assert model.config.num_loops == 2 and (model.config.split_start, model.config.split_end) == (1, 3)
    with torch.no_grad():
        for loops in (1, 2, 3):  # the perturbed gate and head matter at 2 and 3 loops
            out = model(ids, attention_mask=mask, num_loops=loops)
            torch.testing.assert_close(out.logits, expected[f"logits_{loops}"], atol=1e-5, rtol=0)
            torch.testing.assert_close(out.confidence, expected[f"confidence_{loops}"], atol=1e-5, rtol=0)
        generated = model.generate(
            ids, attention_mask=mask, num_loops=2, max_new_tokens=4, min_new_tokens=4, do_sample=False,
            pad_token_id=0,
        )
    assert torch.equal(generated, expected["generated_2"])

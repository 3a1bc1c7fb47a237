"""Fixtures of the converter tests: converted tiny checkpoints and small helpers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# The official code's conformance vectors: a copy of ../shared/conformance/ kept with the tests, so that a
# clone anywhere (not only beside shared/) runs them.
CONFORMANCE = Path(__file__).resolve().parents[1] / "data" / "conformance" / "loopus_official"


@pytest.fixture(scope="session")
def looped_llama_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """The tiny Llama converted at split 2:6 with 2 default loops."""
    from loopus_convert import convert_model

    out = tmp_path_factory.mktemp("looped") / "llama-2-6"
    convert_model(str(tiny_llama_dir), out, split="2:6", num_loops=2)
    return out


@pytest.fixture
def looped_llama(looped_llama_dir):
    """A fresh copy of the converted tiny Llama (tests may change its heads)."""
    from loopus_convert import load_looped

    return load_looped(looped_llama_dir)


def random_ids(batch: int, length: int, seed: int = 0, vocab: int = 384) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=generator)

"""The held-out text of the real-model parts: the trainer's own held-out documents of ``--data``.

``load_blocks`` with the trainer's defaults (``--held-out``, ``--seed``) splits by document, so the damped
evaluation, every fine-tuned row and the base see the same blocks, none from a training document.
"""

from __future__ import annotations

import torch

from loopus_train.config import DEFAULTS
from loopus_train.data import load_blocks


def held_out_blocks(tokenizer, data: str | None, block_size: int, max_blocks: int) -> torch.Tensor:
    """The first ``max_blocks`` held-out blocks (N, block_size) of ``data`` (None: the built-in corpus)."""
    split = load_blocks(
        tokenizer, data, block_size=block_size, held_out=DEFAULTS.held_out, seed=DEFAULTS.seed
    )
    return split.held_out[: min(max_blocks, len(split.held_out))]

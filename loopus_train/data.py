"""Training text -> packed token blocks, a held-out split, and a resumable sampler.

Documents come from :func:`loopus_core.texts.load_texts` (``--data``: a ``.txt`` or ``.jsonl`` file, a folder
of them, or a ``datasets`` name; without ``--data`` the built-in corpus, so that a first run works out of the
box).

Packing: every document is tokenised without special tokens, followed by EOS, and the documents are
concatenated into one stream cut into blocks of ``block_size`` tokens (the last partial block is dropped):
no padding, no wasted positions. Blocks are split into train and held-out sets by a seeded permutation.

:class:`BlockSampler` walks the train blocks in a seeded order, epoch after epoch; its position (epoch and
offset) is part of the trainer's resumable state, so a resumed run sees exactly the blocks it would have seen.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from loopus_core.errors import LoopusError
from loopus_core.texts import load_texts

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------- packing


def pack_blocks(tokenizer, texts: list[str], block_size: int) -> torch.Tensor:
    """Tokenise ``texts``, join them with EOS and cut the stream into blocks: (N, block_size) long."""
    eos = tokenizer.eos_token_id
    if eos is None:
        log.warning("the tokenizer has no EOS token; documents are concatenated without a separator")
    stream: list[int] = []
    for start in range(0, len(texts), 256):
        for ids in tokenizer(texts[start : start + 256], add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
            if eos is not None:
                stream.append(eos)
    count = len(stream) // block_size
    return torch.tensor(stream[: count * block_size], dtype=torch.long).view(count, block_size)


@dataclass
class TokenBlocks:
    """Packed blocks split into train and held-out sets, with a fingerprint of their content."""

    train: torch.Tensor  # (N, block_size) long
    held_out: torch.Tensor  # (M, block_size) long
    fingerprint: str

    @property
    def block_size(self) -> int:
        return int(self.train.shape[1])


def load_blocks(
    tokenizer, data: str | Path | None, *, block_size: int, held_out: float, seed: int
) -> TokenBlocks:
    """Read ``data``, pack it into blocks and hold out a seeded fraction (at least one block) for evaluation.

    Raises :class:`LoopusError` when the data gives fewer than two blocks (one to train on, one held out).
    """
    if block_size < 2:
        raise LoopusError(f"--block-size {block_size} is too small; use at least 2 tokens (e.g. 256)")
    if not 0.0 < held_out < 1.0:
        raise LoopusError(f"--held-out {held_out} must lie strictly between 0 and 1 (e.g. 0.05)")
    texts = load_texts(data)
    blocks = pack_blocks(tokenizer, texts, block_size)
    source = "the built-in corpus" if data is None else str(data)
    if len(blocks) < 2:
        raise LoopusError(
            f"--data {source} gives {len(blocks)} block(s) of {block_size} tokens; at least 2 are "
            "needed (one is held out): add text or lower --block-size"
        )
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))
    n_held = min(len(blocks) - 1, max(1, round(held_out * len(blocks))))
    held, train = blocks[order[:n_held]], blocks[order[n_held:]]
    digest = hashlib.sha256(blocks.numpy().tobytes()).hexdigest()[:16]
    log.info(
        "%s: %d train blocks and %d held-out blocks of %d tokens", source, len(train), len(held), block_size
    )
    return TokenBlocks(train=train.contiguous(), held_out=held.contiguous(), fingerprint=f"sha256:{digest}")


# ------------------------------------------------------------------------------------------------- sampler


class BlockSampler:
    """Seeded block order, epoch after epoch, whose position can be saved and restored.

    Epoch ``e`` visits the blocks in ``randperm(num_blocks)`` drawn from a generator seeded with
    ``(seed, e)``; :meth:`take` hands out the next indices, crossing into the next epoch when one ends.
    """

    def __init__(self, num_blocks: int, seed: int) -> None:
        if num_blocks < 1:
            raise ValueError("BlockSampler needs at least one block")
        self.num_blocks = num_blocks
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_blocks, generator=generator)

    def take(self, count: int) -> list[int]:
        """The next ``count`` block indices."""
        out: list[int] = []
        while len(out) < count:
            if self.position == self.num_blocks:
                self.epoch += 1
                self.position = 0
                self._order = self._permutation(self.epoch)
            n = min(count - len(out), self.num_blocks - self.position)
            out.extend(self._order[self.position : self.position + n].tolist())
            self.position += n
        return out

    def state_dict(self) -> dict:
        """JSON-serialisable position."""
        return {
            "num_blocks": self.num_blocks,
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a position saved by :meth:`state_dict` (same data and seed)."""
        if state["num_blocks"] != self.num_blocks or state["seed"] != self.seed:
            raise LoopusError(
                f"the saved data position is for {state['num_blocks']} blocks and seed "
                f"{state['seed']}, not {self.num_blocks} and {self.seed}; resume with the same data"
            )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = self._permutation(self.epoch)

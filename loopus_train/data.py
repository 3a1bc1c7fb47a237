"""Token shards -> a held-out split by document, packed blocks read from the memory maps, a resumable sampler.

The text (``--data``, or the built-in corpus) is tokenised once into token shards (:mod:`loopus_train.shards`,
cached). Documents, not blocks, are held out: a seeded random ``--held-out`` fraction of the documents (at
least one, never all) forms the held-out set, whatever the block size, so that evaluation at any
``--block-size`` reads no token of a training document.

Packing (:class:`PackedBlocks`): the documents of one set, each followed by EOS, in source order, form one
token stream cut into blocks of ``block_size`` tokens (the last partial block is dropped): no padding, no
wasted positions. A block is read from the memory-mapped shards when asked for; the index of a set is its
runs of consecutive documents (a few integers per run), so memory does not grow with the token count.

:class:`BlockSampler` walks the train blocks in a seeded order, epoch after epoch; its position (epoch and
offset) is part of the trainer's resumable state, so a resumed run sees exactly the blocks it would have seen.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from loopus_core.errors import LoopusError
from loopus_core.progress import Progress
from loopus_train.shards import TokenShards, open_data

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------- split


def split_documents(
    num_documents: int, held_out: float, seed: int, label: str
) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) document ids, each sorted: ``round(held_out * N)`` random documents (at least one,
    at most N - 1) drawn by a generator seeded with ``seed`` are held out."""
    if num_documents < 2:
        raise LoopusError(
            f"--data {label} holds {num_documents} document, which leaves no held-out document: at least 2 "
            "are needed (one is held out for evaluation); add documents, e.g. more files or JSONL lines"
        )
    count = min(num_documents - 1, max(1, round(held_out * num_documents)))
    order = np.random.default_rng(seed).permutation(num_documents)
    return np.sort(order[count:]), np.sort(order[:count])


# ------------------------------------------------------------------------------------------------- packing


class PackedBlocks:
    """The documents ``doc_ids`` (sorted) of ``shards`` as one token stream cut into blocks of ``block_size``.

    ``blocks[i]``, ``blocks[a:b]`` and ``blocks[[i, j, ...]]`` give (n, block_size) int64 tensors read from
    the memory maps; :meth:`documents` says which documents a block's tokens come from.
    """

    def __init__(self, shards: TokenShards, doc_ids: np.ndarray, block_size: int) -> None:
        self.shards, self.block_size = shards, block_size
        shard_of, starts, stops = [], [], []
        for s, ends in enumerate(shards.ends):
            base = shards.doc_base[s]
            local = doc_ids[(doc_ids >= base) & (doc_ids < shards.doc_base[s + 1])] - base
            if not len(local):
                continue
            breaks = np.flatnonzero(np.diff(local) != 1) + 1  # where a run of consecutive documents ends
            first, last = local[np.r_[0, breaks]], local[np.r_[breaks - 1, len(local) - 1]]
            shard_of.append(np.full(len(first), s, dtype=np.int64))
            starts.append(np.where(first > 0, np.asarray(ends)[np.maximum(first - 1, 0)], 0))
            stops.append(np.asarray(ends)[last])
        empty = np.zeros(0, dtype=np.int64)
        self._shard = np.concatenate(shard_of) if shard_of else empty
        self._start = np.concatenate(starts).astype(np.int64) if starts else empty
        self._stop = np.concatenate(stops).astype(np.int64) if stops else empty
        self._end = np.cumsum(self._stop - self._start)  # each run's end in the stream
        self.num_documents = int(len(doc_ids))
        self.num_tokens = int(self._end[-1]) if len(self._end) else 0

    def __len__(self) -> int:
        return self.num_tokens // self.block_size

    def _pieces(self, index: int):
        """(shard, start, stop) token ranges that make up block ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"block {index} of {len(self)}")
        position, need = index * self.block_size, self.block_size
        run = int(np.searchsorted(self._end, position, side="right"))
        while need:
            offset = position - (self._end[run] - (self._stop[run] - self._start[run]))
            take = min(need, int(self._stop[run] - self._start[run] - offset))
            start = int(self._start[run] + offset)
            yield int(self._shard[run]), start, start + take
            position, need, run = position + take, need - take, run + 1

    def _block(self, index: int) -> np.ndarray:
        parts = [self.shards.tokens[s][a:b] for s, a, b in self._pieces(index)]
        return np.concatenate(parts).astype(np.int64)

    def __getitem__(self, key: int | slice | Sequence[int]) -> torch.Tensor:
        if isinstance(key, slice):
            indices = range(*key.indices(len(self)))
        elif isinstance(key, (int, np.integer)):
            return torch.from_numpy(self._block(int(key)))
        else:
            indices = [int(i) for i in key]
        if not len(indices):
            return torch.zeros(0, self.block_size, dtype=torch.long)
        return torch.from_numpy(np.stack([self._block(i) for i in indices]))

    def documents(self, index: int) -> np.ndarray:
        """The ids of the documents whose tokens block ``index`` holds."""
        found = []
        for s, a, b in self._pieces(index):
            ends = self.shards.ends[s]
            first, last = np.searchsorted(ends, [a, b - 1], side="right")
            found.append(np.arange(first, last + 1) + self.shards.doc_base[s])
        return np.unique(np.concatenate(found))


@dataclass
class TokenData:
    """Train and held-out blocks of one text source, split by document."""

    train: PackedBlocks
    held_out: PackedBlocks
    shards: TokenShards
    fingerprint: str  # the shards' content, the split and the block size: what a resume must find again

    @property
    def block_size(self) -> int:
        return self.train.block_size

    @property
    def digest(self) -> str:
        """The content identity of the tokenised text (independent of split and block size)."""
        return self.shards.digest


def load_blocks(
    tokenizer,
    data: str | Path | None,
    *,
    block_size: int,
    held_out: float,
    seed: int,
    workers: int = 0,
    progress: Progress | None = None,
) -> TokenData:
    """Tokenise ``data`` (or reuse its cached shards), hold out documents and pack both sets into blocks.

    Raises :class:`LoopusError` when the data gives no block at all, holds a single document (nothing to
    hold out), or leaves either set without a block.
    """
    if block_size < 2:
        raise LoopusError(f"--block-size {block_size} is too small; use at least 2 tokens (e.g. 256)")
    if not 0.0 < held_out < 1.0:
        raise LoopusError(f"--held-out {held_out} must lie strictly between 0 and 1 (e.g. 0.05)")
    shards = open_data(tokenizer, data, workers=workers, progress=progress)
    label = "the built-in corpus" if data is None else str(data)
    blocks = shards.num_tokens // block_size
    if blocks < 2:
        raise LoopusError(
            f"--data {label} gives {blocks} block(s) of {block_size} tokens; at least 2 are needed "
            "(one is held out): add text or lower --block-size"
        )
    train_ids, held_ids = split_documents(shards.num_documents, held_out, seed, label)
    train, held = PackedBlocks(shards, train_ids, block_size), PackedBlocks(shards, held_ids, block_size)
    if not len(train) or not len(held):
        raise LoopusError(
            f"--data {label}: the {len(held_ids)} held-out document(s) give {len(held)} block(s) of "
            f"{block_size} tokens and the {len(train_ids)} training documents {len(train)}; at least one of "
            "each is needed: raise --held-out, lower --block-size or add text"
        )
    log.info(
        "%s: %d train blocks (%d documents) and %d held-out blocks (%d documents) of %d tokens",
        label,
        len(train),
        len(train_ids),
        len(held),
        len(held_ids),
        block_size,
    )
    fingerprint = f"{shards.digest}/held-out={held_out}/seed={seed}/block={block_size}"
    return TokenData(train=train, held_out=held, shards=shards, fingerprint=fingerprint)


def all_blocks(tokenizer, data: str | Path | None, *, block_size: int, progress: Progress | None = None):
    """Every document of ``data`` packed into blocks (for evaluating on other text than a run's)."""
    shards = open_data(tokenizer, data, progress=progress)
    return PackedBlocks(shards, np.arange(shards.num_documents), block_size)


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

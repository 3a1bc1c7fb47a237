"""Records packed several to a block, each attending only to itself: fewer padded positions per update.

Labelled records (conversations, prompt/completion pairs, pre-tokenised input_ids/labels) are short next to
a block: one record per right-padded block (:class:`loopus_train.data.SequenceBlocks`) leaves most positions
padding (37% of the built-in chat set at ``--block-size 128``). :class:`PackedRecords` puts several records
in one block, chosen once by best-fit decreasing over the records' lengths (the longest record first, each
into the open block it fills best, a new block when none has room): a pure function of the lengths, so the
blocks, and a resumed run's sampler, are the same every time. Padding (``pad_id``, labelled -100) is only
at a block's end.

Each block comes with ``position_ids`` that restart at 0 at every record (and at the padding, a record of
its own that holds no target). From position ids that restart, transformers' mask functions build a
block-diagonal causal mask (``find_packed_sequence_indices``, used when no padding mask and no cache are
given), so every attention layer of the encoder, of every loop pass and of the decoder sees each record
alone, with its own rotary positions and its own sliding window: a packed record computes exactly what it
computes alone (tests/train/test_packing.py). :mod:`loopus_train.rds` and
:func:`loopus_convert.evaluate.loss_per_loops` read the records from the same position ids: no prediction
crosses into the next record, and the confidence head reads each record at its own last token.

Plain text is packed already (:class:`loopus_train.data.PackedBlocks`: documents joined by EOS, no
padding); with ``--doc-mask`` (:class:`DocumentMasked`) its documents also stop attending to each other: the
positions restart after every EOS, and the prediction of a document's first token from the previous
document's EOS is dropped.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
from collections.abc import Sequence

import numpy as np
import torch

from loopus_core.errors import LoopusError
from loopus_train.data import PackedBlocks, SequenceBlocks, TokenData
from loopus_train.records import IGNORE

log = logging.getLogger(__name__)


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Bins of item indices, each bin's lengths summing to at most ``capacity`` (every length <= it): items
    in decreasing length (ties by index), each into the open bin with the least room that fits it, else a
    new bin. Bins come in the order they were opened, their items in index order."""
    order = np.lexsort((np.arange(len(lengths)), -np.asarray(lengths)))
    bins: list[list[int]] = []
    by_room: dict[int, list[int]] = {}  # room left -> the open bins with that much room, oldest first
    rooms: list[int] = []  # the keys of by_room, sorted
    for item in order.tolist():
        size = int(lengths[item])
        at = bisect.bisect_left(rooms, size)
        if at == len(rooms):
            bins.append([])
            chosen, room = len(bins) - 1, capacity
        else:
            room = rooms[at]
            chosen = by_room[room].pop(0)
            if not by_room[room]:
                del by_room[room], rooms[at]
        bins[chosen].append(item)
        left = room - size
        if left > 0:
            if left not in by_room:
                by_room[left] = []
                bisect.insort(rooms, left)
            by_room[left].append(chosen)
    return [sorted(b) for b in bins]


def record_lengths(records: SequenceBlocks) -> np.ndarray:
    """Each record's token count once cut to the block size (what its row of ``records`` holds)."""
    return np.asarray(records._stop - records._start, dtype=np.int64)


class PackedRecords:
    """The records of ``records`` packed several to a block (``pack``), or one per block with the same
    position ids (the padding a record of its own): the same interface as :class:`SequenceBlocks`, plus
    :meth:`position_ids`.

    ``blocks[key]`` (n, block_size) input ids, :meth:`labels` their labels (-100 on padding and at each
    record's first token), :meth:`position_ids` the positions restarting at each record.
    """

    def __init__(self, records: SequenceBlocks, pack: bool = True) -> None:
        self.records, self.block_size = records, records.block_size
        self.lengths = record_lengths(records)
        count = len(self.lengths)
        bins = best_fit_decreasing(self.lengths, self.block_size) if pack else [[i] for i in range(count)]
        self._members = [np.asarray(b, dtype=np.int64) for b in bins]
        self.num_documents, self.num_tokens = records.num_documents, records.num_tokens

    def __len__(self) -> int:
        return len(self._members)

    def real_fraction(self) -> float:
        """The fraction of the blocks' positions that hold a record's token (the rest is padding)."""
        return self.num_tokens / max(1, len(self) * self.block_size)

    def _indices(self, key) -> list[int]:
        if isinstance(key, slice):
            return list(range(*key.indices(len(self))))
        if isinstance(key, (int, np.integer)):
            return [int(key)]
        return [int(i) for i in key]

    def _layout(self, key) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, labels, position ids) of the blocks ``key``, each (n, block_size), or (block_size,) for an
        int ``key``."""
        indices = self._indices(key)
        shape = (len(indices), self.block_size)
        ids = torch.full(shape, self.records.pad_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE, dtype=torch.long)
        positions = torch.zeros(shape, dtype=torch.long)
        for row, index in enumerate(indices):
            if not 0 <= index < len(self):
                raise IndexError(f"block {index} of {len(self)}")
            members = self._members[index].tolist()
            offset = 0
            for member, record, target in zip(
                members, self.records[members], self.records.labels(members), strict=True
            ):
                n = int(self.lengths[member])
                ids[row, offset : offset + n] = record[:n]
                labels[row, offset + 1 : offset + n] = target[1:n]  # no prediction leads to its first token
                positions[row, offset : offset + n] = torch.arange(n)
                offset += n
            positions[row, offset:] = torch.arange(self.block_size - offset)  # the padding: its own record
        if isinstance(key, (int, np.integer)):
            return ids[0], labels[0], positions[0]
        return ids, labels, positions

    def __getitem__(self, key: int | slice | Sequence[int]) -> torch.Tensor:
        return self._layout(key)[0]

    def labels(self, key: int | slice | Sequence[int]) -> torch.Tensor:
        """The labels of the blocks ``key`` (Hugging Face convention, -100 where unsupervised)."""
        return self._layout(key)[1]

    def position_ids(self, key: int | slice | Sequence[int]) -> torch.Tensor:
        """The position ids of the blocks ``key``: 0, 1, ... from each record's first token."""
        return self._layout(key)[2]

    def documents(self, index: int) -> np.ndarray:
        """The ids of the records block ``index`` holds."""
        return self.records.doc_ids[self._members[index]]


class DocumentMasked:
    """Packed text (:class:`PackedBlocks`) whose documents do not attend to each other (``--doc-mask``):
    position ids restart after every ``eos_id``; :meth:`labels` is -100 at each document's first token."""

    def __init__(self, blocks: PackedBlocks, eos_id: int) -> None:
        self.blocks, self.eos_id, self.block_size = blocks, eos_id, blocks.block_size
        self.num_documents, self.num_tokens = blocks.num_documents, blocks.num_tokens

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, key: int | slice | Sequence[int]) -> torch.Tensor:
        return self.blocks[key]

    def _starts(self, ids: torch.Tensor) -> torch.Tensor:
        """(..., T) bool: where a document starts (the block's first token, and every token after an EOS)."""
        starts = torch.zeros_like(ids, dtype=torch.bool)
        starts[..., 0] = True
        starts[..., 1:] = ids[..., :-1] == self.eos_id
        return starts

    def position_ids(self, key: int | slice | Sequence[int]) -> torch.Tensor:
        """0, 1, ... from each document's first token in the blocks ``key``."""
        ids = self.blocks[key]
        index = torch.arange(ids.shape[-1]).expand_as(ids)
        first = torch.where(self._starts(ids), index, torch.zeros_like(index)).cummax(dim=-1).values
        return index - first

    def labels(self, key: int | slice | Sequence[int]) -> torch.Tensor:
        """Every next token, except a document's first token (no prediction crosses into it)."""
        ids = self.blocks[key]
        return torch.where(self._starts(ids), torch.full_like(ids, IGNORE), ids)

    def documents(self, index: int) -> np.ndarray:
        return self.blocks.documents(index)


def training_view(data: TokenData, doc_mask: bool = False) -> TokenData:
    """The blocks a run reads: labelled records packed (the held-out ones one per block, both with position
    ids); text as it is, or :class:`DocumentMasked` with ``doc_mask``. The fingerprint (what a resume must
    find again) says which. Logs the share of real positions of packed records."""
    train, held, view = data.train, data.held_out, ""
    if isinstance(train, SequenceBlocks):
        train, held, view = PackedRecords(train), PackedRecords(held, pack=False), "/packed"
        padded = train.num_tokens / max(1, len(data.train) * train.block_size)
        log.info(
            "packed %d records into %d blocks of %d tokens: %.1f%% real positions (one per block: %.1f%%)",
            train.num_documents,
            len(train),
            train.block_size,
            100 * train.real_fraction(),
            100 * padded,
        )
    elif doc_mask:
        eos = data.shards.manifest.get("eos_token_id")
        if eos is None:
            raise LoopusError("--doc-mask needs the tokenizer's EOS token between documents, and it has none")
        train, held, view = DocumentMasked(train, int(eos)), DocumentMasked(held, int(eos)), "/doc-mask"
    return dataclasses.replace(data, train=train, held_out=held, fingerprint=data.fingerprint + view)


def position_ids(blocks, key) -> torch.Tensor | None:
    """The position ids of the blocks ``key`` of ``blocks``, or None where every block is one sequence."""
    method = getattr(blocks, "position_ids", None)
    return None if method is None else method(key)

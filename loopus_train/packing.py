"""Records packed several to a block, each attending only to itself: fewer padded positions per update.

Labelled records (conversations, prompt/completion pairs, pre-tokenised input_ids/labels) are short next to
a block: one record per right-padded block (:class:`loopus_train.data.SequenceBlocks`) leaves most positions
padding (37% of the built-in chat set at ``--block-size 128``). :class:`PackedRecords` puts several whole
records in one block, chosen once by minimum bin slack over the records' lengths
(:func:`least_slack_bins`): a pure function of the lengths, so the blocks, and a resumed run's sampler, are
the same every time. Padding (``pad_id``, labelled -100) is only at a block's end. Whole records cannot
fill blocks where most records are longer than half a block (each then needs a block of its own); with
``split_records`` the records fill every block to its end instead, and a record cut there goes on at the
next block's start as a record of its own (its continuation does not see its head).

Each block comes with ``position_ids`` that restart at 0 at every record (and at the padding, a record of
its own that holds no target). From position ids that restart, transformers' mask functions build a
block-diagonal causal mask (``find_packed_sequence_indices``, used when no padding mask and no cache are
given; with a cache, the looped model's prefill takes the same masks, and refuses a later call on that
cache), so every attention layer of the encoder, of every loop pass and of the decoder sees each record
alone, with its own rotary positions and its own sliding window: a packed record computes exactly what it
computes alone (tests/train/test_packing.py). :mod:`loopus_train.rds` and
:func:`loopus_convert.measure.loss_per_loops` read the records from the same position ids: no prediction
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
from collections import deque
from collections.abc import Sequence

import numpy as np
import torch

from loopus_core.errors import LoopusError
from loopus_train.data import PackedBlocks, SequenceBlocks, TokenData, block_indices
from loopus_train.records import IGNORE

log = logging.getLogger(__name__)


SEARCH_NODES = 500  # subsets one block's search tries at most (the first is the greedy fill)


def least_slack_bins(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Bins of item indices, each bin's lengths summing to at most ``capacity`` (every length <= it), by
    minimum bin slack: one bin at a time, the longest item left, then the items left whose lengths fill the
    room best (a depth-first search over the distinct lengths, longest first, of at most
    :data:`SEARCH_NODES` subsets, stopped by an exact fill, then topped up greedily). Among equal lengths
    the lowest index goes first: a pure function of the lengths, so the bins (and a resumed run's sampler)
    are the same every time. Bins come in the order they were filled, their items in index order."""
    lengths = np.asarray(lengths, dtype=np.int64)
    queues: dict[int, deque[int]] = {}
    for item in np.lexsort((np.arange(len(lengths)), -lengths)).tolist():
        queues.setdefault(int(lengths[item]), deque()).append(item)
    ascending = sorted(queues)  # the distinct lengths left
    bins: list[list[int]] = []
    while ascending:
        first = ascending[-1]
        chosen = [first, *_least_slack(ascending, queues, capacity - first, {first: 1})]
        bins.append(sorted(queues[size].popleft() for size in chosen))
        for size in set(chosen):
            if not queues[size]:
                del queues[size]
                ascending.remove(size)
    return bins


def _least_slack(ascending: list[int], queues: dict, room: int, used: dict[int, int]) -> list[int]:
    """The lengths (with repeats) of items left in ``queues`` beyond ``used`` that fill ``room`` best."""
    best: list = [room, []]
    picked: list[int] = []
    nodes = 0

    def search(top: int, room: int) -> None:  # top: only lengths at index < top (no ordering repeats)
        nonlocal nodes
        nodes += 1
        if room < best[0]:
            best[0], best[1] = room, list(picked)
        for at in range(min(top, bisect.bisect_right(ascending, room)) - 1, -1, -1):
            if best[0] == 0 or nodes >= SEARCH_NODES:
                return
            size = ascending[at]
            if len(queues[size]) > used.get(size, 0):
                used[size] = used.get(size, 0) + 1
                picked.append(size)
                search(at + 1, room - size)
                picked.pop()
                used[size] -= 1

    search(len(ascending), room)
    room, chosen = best
    for size in chosen:
        used[size] = used.get(size, 0) + 1
    for at in range(bisect.bisect_right(ascending, room) - 1, -1, -1):  # top up what the budget left
        if room == 0:
            break
        size = ascending[at]
        while size <= room and len(queues[size]) > used.get(size, 0):
            used[size] = used.get(size, 0) + 1
            chosen.append(size)
            room -= size
    return chosen


def record_lengths(records: SequenceBlocks) -> np.ndarray:
    """Each record's token count once cut to the block size (what its row of ``records`` holds)."""
    return np.asarray(records._stop - records._start, dtype=np.int64)


def fewest_blocks_bound(lengths: np.ndarray, capacity: int) -> int:
    """A lower bound on the blocks any packing of whole items needs (Martello and Toth's L2): for each
    threshold k, the items longer than ``capacity - k`` and those longer than half a block each need a
    block of their own, and the items of k .. half a block fill what those leave before opening more."""
    lengths = np.asarray(lengths, dtype=np.int64)
    best = -(-int(lengths.sum()) // capacity)
    half, big = lengths[2 * lengths <= capacity], lengths[2 * lengths > capacity]
    for k in np.unique(np.r_[0, half]).tolist():
        own = int((big > capacity - k).sum())
        shared = big[big <= capacity - k]
        small = int(half[half >= k].sum())
        more = max(0, -(-(small - (len(shared) * capacity - int(shared.sum()))) // capacity))
        best = max(best, own + len(shared) + more)
    return best


def split_stream(lengths: np.ndarray, capacity: int) -> list[np.ndarray]:
    """The records in index order as one stream cut every ``capacity`` positions: per block, its pieces
    (record, first token, stop) (k, 3); a record the cut crosses ends its block and goes on at the next."""
    ends = np.cumsum(np.asarray(lengths, dtype=np.int64))
    starts = ends - lengths
    blocks = []
    for a in range(0, int(ends[-1]) if len(ends) else 0, capacity):
        b = a + capacity
        first, last = np.searchsorted(ends, a, side="right"), np.searchsorted(starts, b, side="left")
        members = np.arange(first, last)
        lo = np.maximum(starts[members], a) - starts[members]
        hi = np.minimum(ends[members], b) - starts[members]
        blocks.append(np.stack([members, lo, hi], axis=1))
    return blocks


class PackedRecords:
    """The records of ``records`` packed several to a block, or one per block (``pack=False``) with the
    same position ids (the padding a record of its own): the same interface as :class:`SequenceBlocks`,
    plus :meth:`position_ids`.

    ``blocks[key]`` (n, block_size) input ids, :meth:`labels` their labels (-100 on padding and at each
    piece's first token), :meth:`position_ids` the positions restarting at each piece. A piece is a whole
    record, except with ``split``: the records in order fill every block to its end (:func:`split_stream`),
    and a record the block's end cuts goes on at the next block's start as a record of its own, its
    positions from 0 again. What a cut costs: the continuation does not see the record's head (its
    attention starts afresh), and its first token is not predicted (no prediction crosses a record).
    """

    def __init__(self, records: SequenceBlocks, pack: bool = True, split: bool = False) -> None:
        self.records, self.block_size = records, records.block_size
        self.lengths = record_lengths(records)
        count, whole = len(self.lengths), lambda b: np.stack([b, np.zeros_like(b), self.lengths[b]], axis=1)
        if split and pack:
            self._pieces = split_stream(self.lengths, self.block_size)
        else:
            bins = least_slack_bins(self.lengths, self.block_size) if pack else [[i] for i in range(count)]
            self._pieces = [whole(np.asarray(b, dtype=np.int64)) for b in bins]
        self.num_documents, self.num_tokens = records.num_documents, records.num_tokens

    def __len__(self) -> int:
        return len(self._pieces)

    def real_fraction(self) -> float:
        """The fraction of the blocks' positions that hold a record's token (the rest is padding)."""
        return self.num_tokens / max(1, len(self) * self.block_size)

    def members(self, index: int) -> np.ndarray:
        """The indices (in ``records``) of the records block ``index`` holds, whole or in part."""
        return self._pieces[index][:, 0]

    def real_tokens(self, index: int) -> int:
        """The positions of block ``index`` that hold a record's token."""
        pieces = self._pieces[index]
        return int((pieces[:, 2] - pieces[:, 1]).sum())

    def cuts(self) -> int:
        """How many records a block's end cuts (0 without ``split``)."""
        return sum(int((p[:, 1] > 0).sum()) for p in self._pieces)

    def _layout(self, key) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, labels, position ids) of the blocks ``key``, each (n, block_size), or (block_size,) for an
        int ``key``."""
        indices = block_indices(key, len(self))
        shape = (len(indices), self.block_size)
        ids = torch.full(shape, self.records.pad_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE, dtype=torch.long)
        positions = torch.zeros(shape, dtype=torch.long)
        for row, index in enumerate(indices):
            pieces = self._pieces[index].tolist()
            members = [m for m, _, _ in pieces]
            offset = 0
            for (_, a, b), record, target in zip(
                pieces, self.records[members], self.records.labels(members), strict=True
            ):
                n = b - a
                ids[row, offset : offset + n] = record[a:b]
                labels[row, offset + 1 : offset + n] = target[a + 1 : b]  # no prediction leads to a piece
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
        """The position ids of the blocks ``key``: 0, 1, ... from each piece's first token."""
        return self._layout(key)[2]

    def documents(self, index: int) -> np.ndarray:
        """The ids of the records block ``index`` holds."""
        return self.records.doc_ids[self.members(index)]


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


def training_view(data: TokenData, doc_mask: bool = False, split_records: bool = False) -> TokenData:
    """The blocks a run reads: labelled records packed whole (``split_records``: filling every block, a
    record a block's end cuts going on in the next; see :class:`PackedRecords`), the held-out ones one per
    block, both with position ids; text as it is, or :class:`DocumentMasked` with ``doc_mask``. The
    fingerprint (what a resume must find again) says which. Logs the share of real positions of packed
    records."""
    train, held, view = data.train, data.held_out, ""
    if split_records and not isinstance(train, SequenceBlocks):
        raise LoopusError(
            "--split-records packs labelled records (chat, prompt/completion, input_ids/labels); plain text "
            "fills every block already: leave the flag out"
        )
    if isinstance(train, SequenceBlocks):
        train = PackedRecords(train, split=split_records)
        held, view = PackedRecords(held, pack=False), "/packed-split" if split_records else "/packed-whole"
        padded = train.num_tokens / max(1, len(data.train) * train.block_size)
        log.info(
            "packed %d records into %d blocks of %d tokens: %.1f%% real positions (one per block: %.1f%%)%s",
            train.num_documents,
            len(train),
            train.block_size,
            100 * train.real_fraction(),
            100 * padded,
            f"; {train.cuts()} records cut at a block's end" if split_records else "",
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

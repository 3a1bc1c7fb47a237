"""Token shards -> a held-out split by document, blocks read from the memory maps, a resumable sampler.

The text (``--data``, or the built-in corpus) is tokenised once into token shards (:mod:`loopus_train.shards`,
cached). Documents, not blocks, are held out: a seeded random ``--held-out`` fraction of the documents (at
least one, never all) forms the held-out set, drawn over every document or record by its identity (no length
setting enters), so that evaluation at any ``--block-size`` reads no token of a training document. Plain text
with too few documents to hold out that fraction as whole ones (``held_out * documents < 1``, e.g. one
``input.txt``) is split by its token stream instead, as nanoGPT does: the last ``--held-out`` fraction of
the tokens is held out, the rest trained on (one log line says so); the rule depends on the data and
``--held-out`` only, so every block size again reads no training token.

Packing (:class:`PackedBlocks`): the documents of one set, each followed by EOS, in source order, form one
token stream cut into blocks of ``block_size`` tokens (the last partial block is dropped): no padding, no
wasted positions. A block is read from the memory-mapped shards when asked for; the index of a set is its
runs of consecutive documents (a few integers per run), so memory does not grow with the token count.

Labelled records (conversations, prompt/completion pairs, pre-tokenised input_ids/labels; the shards carry
their labels) are read one per block here (:class:`SequenceBlocks`): each record cut to ``block_size``
tokens (the count of cut records is logged) and right-padded (the padding labelled -100; under a causal mask
no real token attends to it). Training packs them several to a block, each attending only to itself
(:mod:`loopus_train.packing`); the held-out records stay one per block. A record left with no supervised
target in its first ``block_size`` tokens is dropped from its set (counted too), and data with none left is
a one-line error. ``--loss-on`` chooses the targets (:func:`resolve_loss_on`): the records' labels (the
default the data implies) or every next token.

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
from loopus_train.config import check_loss_on
from loopus_train.records import IGNORE, IMPLIED_LOSS
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
    the memory maps; :meth:`documents` says which documents a block's tokens come from. ``span``: only the
    positions ``[a, b)`` of that stream (the split of too few documents by their token stream).
    """

    def __init__(
        self,
        shards: TokenShards,
        doc_ids: np.ndarray,
        block_size: int,
        span: tuple[int, int] | None = None,
    ) -> None:
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
        if span is not None:
            self._keep_span(shards, doc_ids, *span)
        self.num_tokens = int(self._end[-1]) if len(self._end) else 0

    def _keep_span(self, shards: TokenShards, doc_ids: np.ndarray, a: int, b: int) -> None:
        """Cut the runs down to the stream positions ``[a, b)``; count the documents that reach into it."""
        begin = self._end - (self._stop - self._start)  # each run's start in the stream
        keep = (self._end > a) & (begin < b)
        self._start = (self._start + np.maximum(a - begin, 0))[keep]
        self._stop = (self._stop - np.maximum(self._end - b, 0))[keep]
        self._shard = self._shard[keep]
        self._end = np.cumsum(self._stop - self._start)
        _, start, stop = _document_spans(shards)
        ends = np.cumsum(stop[doc_ids] - start[doc_ids])
        self.num_documents = int(((ends > a) & (ends - (stop[doc_ids] - start[doc_ids]) < b)).sum())

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

    def labels(self, key) -> None:
        """Packed text has no labels: every next token is a target."""
        return None

    def documents(self, index: int) -> np.ndarray:
        """The ids of the documents whose tokens block ``index`` holds."""
        found = []
        for s, a, b in self._pieces(index):
            ends = self.shards.ends[s]
            first, last = np.searchsorted(ends, [a, b - 1], side="right")
            found.append(np.arange(first, last + 1) + self.shards.doc_base[s])
        return np.unique(np.concatenate(found))


_LOSS_DATA = {"completion": "prompt/completion", "assistant": "chat (messages)"}


def resolve_loss_on(kind: str, loss_on: str | None, label: str) -> str:
    """The targets of ``kind`` records under ``--loss-on``: ``all`` (every next token) or ``labels`` (the
    records' labels: the assistant turns, the completions, or the given labels); a one-line error when the
    flag does not fit the data."""
    check_loss_on(loss_on)
    implied = IMPLIED_LOSS[kind]
    if loss_on is None or loss_on == implied:
        return "all" if implied == "all" else "labels"
    if loss_on == "all":  # every next input token, whatever the records' labels say
        return "all"
    if kind == "tokens":
        raise LoopusError(
            f"--loss-on {loss_on}: --data {label} holds pre-tokenised records, whose labels say what is "
            "supervised; leave --loss-on out (or use --loss-on all: every next token)"
        )
    held = {"text": "plain text", "chat": "chat records", "completion": "prompt/completion pairs"}[kind]
    raise LoopusError(
        f"--loss-on {loss_on} needs {_LOSS_DATA[loss_on]} data, but --data {label} holds {held}; "
        f"leave --loss-on out (for this data: {implied}) or use --loss-on all"
    )


def _document_spans(shards: TokenShards) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(shard, start, stop) of every document, in global document order."""
    shard_of, starts, stops = [], [], []
    for s, ends in enumerate(shards.ends):
        ends = np.asarray(ends, dtype=np.int64)
        shard_of.append(np.full(len(ends), s, dtype=np.int64))
        starts.append(np.r_[0, ends[:-1]].astype(np.int64))
        stops.append(ends)
    return np.concatenate(shard_of), np.concatenate(starts), np.concatenate(stops)


def usable_documents(shards: TokenShards, block_size: int, targets: str) -> tuple[np.ndarray, int]:
    """The ids of the documents that keep a supervised target when cut to ``block_size`` tokens (at least
    two tokens; with ``targets == "labels"``, a label other than -100 at a position 1 .. block_size - 1),
    and how many documents are longer than ``block_size``."""
    shard_of, start, stop = _document_spans(shards)
    cut = np.minimum(stop, start + block_size)
    keep = cut - start >= 2
    if targets == "labels":
        for s, labels in enumerate(shards.labels):
            mine = shard_of == s
            supervised = np.r_[0, np.cumsum(np.asarray(labels) != IGNORE, dtype=np.int64)]
            keep[mine] &= supervised[cut[mine]] - supervised[start[mine] + 1] > 0
    return np.flatnonzero(keep), int(((stop - start) > block_size).sum())


def block_indices(key: int | slice | Sequence[int], count: int) -> list[int]:
    """The indices ``key`` (an int, a slice or a sequence of ints) names among ``count`` blocks; an
    IndexError for one outside them."""
    if isinstance(key, slice):
        return list(range(*key.indices(count)))
    indices = [int(key)] if isinstance(key, (int, np.integer)) else [int(i) for i in key]
    for i in indices:
        if not 0 <= i < count:
            raise IndexError(f"block {i} of {count}")
    return indices


class SequenceBlocks:
    """One labelled document per block: its first ``block_size`` tokens, right-padded with ``pad_id``.

    ``blocks[key]`` gives the (n, block_size) int64 input ids, :meth:`labels` the matching labels (-100 on
    padding; with ``targets == "all"`` the input ids themselves elsewhere), like :class:`PackedBlocks`.
    """

    def __init__(
        self, shards: TokenShards, doc_ids: np.ndarray, block_size: int, targets: str, pad_id: int
    ) -> None:
        self.shards, self.block_size, self.targets, self.pad_id = shards, block_size, targets, pad_id
        shard_of, start, stop = _document_spans(shards)
        self.doc_ids = np.asarray(doc_ids, dtype=np.int64)
        self._shard, self._start = shard_of[self.doc_ids], start[self.doc_ids]
        self._stop = np.minimum(stop[self.doc_ids], self._start + block_size)
        self.num_documents = int(len(doc_ids))
        self.num_tokens = int((self._stop - self._start).sum())

    def __len__(self) -> int:
        return self.num_documents

    def _rows(self, key, arrays: list[np.ndarray], fill: int) -> torch.Tensor:
        indices = block_indices(key, len(self))
        out = np.full((len(indices), self.block_size), fill, dtype=np.int64)
        for row, i in enumerate(indices):
            a, b = int(self._start[i]), int(self._stop[i])
            out[row, : b - a] = arrays[int(self._shard[i])][a:b]
        tensor = torch.from_numpy(out)
        return tensor[0] if isinstance(key, (int, np.integer)) else tensor

    def __getitem__(self, key: int | slice | Sequence[int]) -> torch.Tensor:
        return self._rows(key, self.shards.tokens, self.pad_id)

    def labels(self, key: int | slice | Sequence[int]) -> torch.Tensor:
        """The labels of the blocks ``key`` (Hugging Face convention, -100 where unsupervised)."""
        if self.targets == "labels":
            return self._rows(key, self.shards.labels, IGNORE)
        indices = block_indices(key, len(self))
        ids = self._rows(indices, self.shards.tokens, self.pad_id)
        lengths = torch.from_numpy(self._stop[indices] - self._start[indices])
        out = torch.where(torch.arange(self.block_size) < lengths[:, None], ids, IGNORE)
        return out[0] if isinstance(key, (int, np.integer)) else out

    def documents(self, index: int) -> np.ndarray:
        """The id of the document block ``index`` holds."""
        return self.doc_ids[[index]]


@dataclass
class TokenData:
    """Train and held-out blocks of one text source, split by document."""

    train: PackedBlocks | SequenceBlocks
    held_out: PackedBlocks | SequenceBlocks
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
    loss_on: str | None = None,
    vocab_size: int | None = None,
) -> TokenData:
    """Tokenise ``data`` (or reuse its cached shards), hold out documents and cut both sets into blocks
    (packed text, or one labelled record per block; ``loss_on`` as in :func:`resolve_loss_on`);
    ``vocab_size``: the rows of the model's embedding, which every token id must index.

    Raises :class:`LoopusError` when the data gives no block at all, holds a single labelled record
    (nothing to hold out), leaves either set without a block, every labelled record loses its targets when
    cut, or holds a token id outside the model's embedding.
    """
    if block_size < 2:
        raise LoopusError(f"--block-size {block_size} is too small; use at least 2 tokens (e.g. 256)")
    if not 0.0 < held_out < 1.0:
        raise LoopusError(f"--held-out {held_out} must lie strictly between 0 and 1 (e.g. 0.05)")
    shards = open_data(tokenizer, data, workers=workers, progress=progress)
    label = "the built-in corpus" if data is None else str(data)
    check_vocabulary(shards, vocab_size, label, tokenizer)
    targets = resolve_loss_on(shards.kind, loss_on, label)
    if shards.kind == "text":
        train, held, counts = _packed_split(shards, block_size, held_out, seed, label)
        fingerprint = f"{shards.digest}/held-out={held_out}/seed={seed}/block={block_size}"
    else:
        train, held, counts = _sequence_split(shards, block_size, held_out, seed, label, targets)
        fingerprint = f"{shards.digest}/held-out={held_out}/seed={seed}/block={block_size}/targets={targets}"
    if not len(train) or not len(held):
        raise LoopusError(
            f"--data {label}: the {counts[1]} held-out document(s) give {len(held)} block(s) of "
            f"{block_size} tokens and the {counts[0]} training documents {len(train)}; at least one of "
            "each is needed: raise --held-out, lower --block-size or add text"
        )
    log.info(
        "%s: %d train blocks (%d documents) and %d held-out blocks (%d documents) of %d tokens",
        label,
        len(train),
        counts[0],
        len(held),
        counts[1],
        block_size,
    )
    return TokenData(train=train, held_out=held, shards=shards, fingerprint=fingerprint)


def check_vocabulary(shards: TokenShards, vocab_size: int | None, label: str, tokenizer) -> None:
    """A one-line error when a token id (or label) of ``shards`` has no row in the model's embedding of
    ``vocab_size`` rows (None: not checked), e.g. tokens added to the tokenizer without resizing it."""
    top = -1 if vocab_size is None else shards.max_token_id()
    if vocab_size is not None and top >= vocab_size:
        raise LoopusError(
            f"--data {label} holds token id {top}, but the model's embedding has {vocab_size} rows (ids 0.."
            f"{vocab_size - 1}) and its tokenizer {len(tokenizer)} entries: tokens were added to the "
            "tokenizer without resizing the embedding; use the tokenizer the model was converted with, or "
            "resize the base model's embedding (resize_token_embeddings) and convert it again"
        )


def _packed_split(shards: TokenShards, block_size: int, held_out: float, seed: int, label: str):
    """Train and held-out :class:`PackedBlocks` of plain text, and their document counts: whole documents,
    or with too few of them (``held_out * documents < 1``) the tail of the token stream."""
    blocks = shards.num_tokens // block_size
    if blocks < 2:
        raise LoopusError(
            f"--data {label} gives {blocks} block(s) of {block_size} tokens; at least 2 are needed "
            "(one is held out): add text or lower --block-size"
        )
    if held_out * shards.num_documents < 1:
        every = np.arange(shards.num_documents)
        cut = shards.num_tokens - max(1, round(held_out * shards.num_tokens))
        log.info(
            "%s holds %d document(s), too few to hold out --held-out %g of them whole: the last %d of its "
            "%d tokens are held out instead",
            label,
            shards.num_documents,
            held_out,
            shards.num_tokens - cut,
            shards.num_tokens,
        )
        train = PackedBlocks(shards, every, block_size, span=(0, cut))
        held = PackedBlocks(shards, every, block_size, span=(cut, shards.num_tokens))
        return train, held, (train.num_documents, held.num_documents)
    train_ids, held_ids = split_documents(shards.num_documents, held_out, seed, label)
    train, held = PackedBlocks(shards, train_ids, block_size), PackedBlocks(shards, held_ids, block_size)
    return train, held, (len(train_ids), len(held_ids))


_SUPERVISED = {
    "chat": "the assistant turns are the supervised ones, and a conversation without one has nothing to "
    "train on; the roles are system, user and assistant, with human and gpt read as user and assistant",
    "completion": "the completion and EOS are the supervised tokens",
    "tokens": "its labels are all -100",
}


def _sequence_split(
    shards: TokenShards, block_size: int, held_out: float, seed: int, label: str, targets: str
):
    """Train and held-out :class:`SequenceBlocks` of labelled records, and their record counts: the records
    are split by identity (:func:`split_documents` over all of them, whatever the block size), then each set
    keeps those with a target in their first ``block_size`` tokens; the cut and dropped records are logged."""
    train_ids, held_ids = split_documents(shards.num_documents, held_out, seed, label)
    ever, _ = usable_documents(shards, np.iinfo(np.int32).max, targets)  # supervised at any length
    usable, cut = usable_documents(shards, block_size, targets)
    total, never = shards.num_documents, shards.num_documents - len(ever)
    if not len(ever):
        raise LoopusError(
            f"--data {label}: none of its {total} records has a supervised token "
            f"({_SUPERVISED[shards.kind]}); fix the records or use --loss-on all"
        )
    if never:
        log.warning(
            "%s: %d of %d records have no supervised token and are left out (%s)",
            label,
            never,
            total,
            _SUPERVISED[shards.kind],
        )
    if cut or len(ever) > len(usable):
        log.warning(
            "%s: %d of %d records are longer than --block-size %d and were truncated; %d dropped (no "
            "supervised token left)",
            label,
            cut,
            total,
            block_size,
            len(ever) - len(usable),
        )
    if not len(usable):
        raise LoopusError(
            f"--data {label}: every one of its {total} records loses all its supervised "
            f"tokens when cut to --block-size {block_size} (or has none); raise --block-size or shorten "
            "the prompts"
        )
    kept = np.zeros(total, dtype=bool)
    kept[usable] = True
    train_ids, held_ids = train_ids[kept[train_ids]], held_ids[kept[held_ids]]
    if not len(held_ids) or not len(train_ids):
        which = "held-out" if not len(held_ids) else "training"
        raise LoopusError(
            f"--data {label}: none of its {which} records keeps a supervised token when cut to --block-size "
            f"{block_size}; raise --block-size or --held-out, or add records"
        )
    train = SequenceBlocks(shards, train_ids, block_size, targets, _pad_id(shards))
    held = SequenceBlocks(shards, held_ids, block_size, targets, _pad_id(shards))
    return train, held, (len(train_ids), len(held_ids))


def all_blocks(
    tokenizer,
    data: str | Path | None,
    *,
    block_size: int,
    progress: Progress | None = None,
    loss_on: str | None = None,
    vocab_size: int | None = None,
) -> PackedBlocks | SequenceBlocks:
    """Every document of ``data`` packed into blocks, or one labelled record per block (for evaluating on
    other data than a run's); ``vocab_size`` as in :func:`load_blocks`."""
    shards = open_data(tokenizer, data, progress=progress)
    label = "the built-in corpus" if data is None else str(data)
    check_vocabulary(shards, vocab_size, label, tokenizer)
    targets = resolve_loss_on(shards.kind, loss_on, label)
    if shards.kind == "text":
        return PackedBlocks(shards, np.arange(shards.num_documents), block_size)
    usable, _ = usable_documents(shards, block_size, targets)
    return SequenceBlocks(shards, usable, block_size, targets, _pad_id(shards))


def _pad_id(shards: TokenShards) -> int:
    """What pads a record's block: EOS (0 without one); its positions are labelled -100."""
    eos = shards.manifest.get("eos_token_id")
    return 0 if eos is None else int(eos)


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

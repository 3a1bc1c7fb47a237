"""Training text -> packed token blocks, a held-out split, and a resumable sampler.

Text comes from ``--data``: a ``.txt`` file (one document), a ``.jsonl`` file (one document per line, its
``text`` field), a folder of such files, or the name of a dataset of the ``datasets`` library (where it is
installed and the hub is reachable). Without ``--data`` the built-in corpus of ``loopus_analyze`` is used so
that a first run works out of the box.

Packing: every document is tokenised without special tokens, followed by EOS, and the documents are
concatenated into one stream cut into blocks of ``block_size`` tokens (the last partial block is dropped):
no padding, no wasted positions. Blocks are split into train and held-out sets by a seeded permutation.

:class:`BlockSampler` walks the train blocks in a seeded order, epoch after epoch; its position (epoch and
offset) is part of the trainer's resumable state, so a resumed run sees exactly the blocks it would have seen.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from loopus_analyze.errors import LoopusError

log = logging.getLogger(__name__)

_DATASET_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?$")


# ------------------------------------------------------------------------------------------------- texts


def read_texts(data: str | Path | None) -> list[str]:
    """The training documents: the built-in corpus (``None``), a local file or folder, or a dataset name.

    A dataset name is ``name`` or ``org/name``, optionally ``:config``; its ``train`` split's ``text``
    column is read with the ``datasets`` library. Raises :class:`LoopusError` for a missing path, data with
    no text, and a dataset name where ``datasets`` is missing or the hub cannot be reached.
    """
    from loopus_analyze.corpus import load_texts  # the built-in corpus and the file readers

    if data is None:
        return load_texts(None)
    path = Path(data).expanduser()
    if path.exists():
        return load_texts(path)
    if not _DATASET_NAME.match(str(data)) or str(data).endswith((".txt", ".jsonl")):
        raise LoopusError(
            f"--data {data} does not exist; pass a .txt or .jsonl file, a folder of them, "
            "or a datasets-library dataset name"
        )
    return _read_dataset(str(data))


def _read_dataset(name: str) -> list[str]:
    """The ``text`` column of the ``train`` split of a ``datasets`` dataset (``name[:config]``)."""
    try:
        import datasets
    except ImportError:
        raise LoopusError(
            f"--data {name} is not a local file or folder, and the datasets library needed to "
            "load it as a dataset is not installed: `pip install datasets`, or pass a "
            ".txt/.jsonl file or folder"
        ) from None
    dataset_name, _, config = name.partition(":")
    try:
        dataset = datasets.load_dataset(dataset_name, config or None, split="train")
    except Exception as exc:  # network, missing dataset, missing config: all the user's to fix
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LoopusError(
            f"--data {name}: cannot load it as a dataset ({first}); check the name and the "
            "network, or pass a local .txt/.jsonl file or folder"
        ) from None
    if "text" not in dataset.column_names:
        raise LoopusError(
            f"--data {name} has no 'text' column (columns: {', '.join(dataset.column_names)}); "
            "pass a dataset with a 'text' column or a local file"
        )
    texts = [text for text in dataset["text"] if isinstance(text, str) and text.strip()]
    if not texts:
        raise LoopusError(f"--data {name} holds no text; pass a dataset with text in its 'text' column")
    return texts


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
    texts = read_texts(data)
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

"""Probe documents -> token batches: the held-out split and the windows the measurements read.

The documents come from :func:`loopus_core.texts.load_texts` (the built-in corpus, ``--data`` files and
folders, or a dataset name).

Every sequence of a batch is ``[BOS] + one window of one document``, right-padded. The measurements exclude
position 0 (the BOS / attention-sink token) and padding, so a batch of ``B`` sequences of length ``T``
contributes at most ``B * (T - 1)`` tokens. Windows are taken round-robin over the documents in a seeded
order (first window of every document, then second windows, ...), so a token budget is spread over as many
documents as it can reach.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass

import torch

from loopus_core.checks import check_int
from loopus_core.errors import LoopusError

log = logging.getLogger(__name__)

DEFAULT_TOKENS = 4096  # measured tokens for the similarity views (first position and padding excluded);
# at 8192 the embedded model's similarity picks and change points are the same (README, loopus analyze)
DEFAULT_SEQ_LEN = 128
DEFAULT_BATCH_SIZE = 8
MIN_WINDOW = 8  # a trailing piece of a document shorter than this many tokens is dropped


@dataclass
class TokenBatch:
    """One batch of token windows.

    ``input_ids`` (B, T) long; ``attention_mask`` (B, T) long, 1 = real token (right padding);
    ``doc_ids`` (B,) long: the index of each row's document in the text list (probes split by document).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    doc_ids: torch.Tensor

    @property
    def measured_tokens(self) -> int:
        """Tokens that enter the estimators: real tokens minus each row's first position."""
        return int(self.attention_mask[:, 1:].sum())


def split_held_out(texts: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split documents into (measured, held out): a seeded random ``fraction`` of them is held out.

    At least one document is held out when ``fraction > 0`` and at least one stays measured; both lists keep
    the original order. ``fraction`` must lie in [0, 1).
    """
    if not 0.0 <= fraction < 1.0:
        raise LoopusError(f"held-out fraction {fraction} is outside [0, 1); use e.g. 0.1")
    if fraction == 0.0 or len(texts) < 2:
        return list(texts), []
    count = min(len(texts) - 1, max(1, round(fraction * len(texts))))
    held = set(random.Random(seed).sample(range(len(texts)), count))
    return ([t for i, t in enumerate(texts) if i not in held], [t for i, t in enumerate(texts) if i in held])


# ----------------------------------------------------------------------------------------------- batches


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (the BOS is added per window)."""
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [list(ids) for ids in encoded]


def check_budget(tokens: int, seq_len: int, batch_size: int = 1) -> None:
    """One-line errors for a token budget, window length or batch size that cannot make a batch."""
    check_int(tokens, "--tokens", 1)
    check_int(seq_len, "--seq-len", 3)
    check_int(batch_size, "batch size", 1)


def make_batches(tokenizer, texts: list[str], *, tokens: int = DEFAULT_TOKENS, seq_len: int = DEFAULT_SEQ_LEN,
                 batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0) -> list[TokenBatch]:
    """Cut ``texts`` into windows and pack them into batches holding about ``tokens`` measured tokens.

    Each row is ``[BOS] + window`` (BOS when the tokenizer has one, else the window's own first token takes
    position 0), ``window`` = up to ``seq_len - 1`` consecutive tokens of one document. Windows are picked
    round-robin over the documents in a seeded order until the budget is reached; the result is a pure
    function of the arguments. The last batch may be smaller. Raises :class:`LoopusError` when ``tokens`` or
    the text available is less than one batch (``batch_size * (seq_len - 1)`` measured tokens).
    """
    check_budget(tokens, seq_len, batch_size)
    bos = tokenizer.bos_token_id
    width = seq_len - 1 if bos is not None else seq_len
    one_batch = batch_size * (seq_len - 1)
    if tokens < one_batch:
        raise LoopusError(
            f"--tokens {tokens} is less than one batch ({batch_size} x {seq_len - 1} = {one_batch} tokens); "
            f"raise --tokens to at least {one_batch} or lower --seq-len"
        )
    encoded = _encode(tokenizer, texts)
    windows_per_doc: list[list[list[int]]] = []
    for ids in encoded:
        pieces = [ids[i:i + width] for i in range(0, len(ids), width)]
        windows_per_doc.append([p for p in pieces if len(p) >= MIN_WINDOW])
    available = sum(len(w) - (0 if bos is not None else 1) for ws in windows_per_doc for w in ws)
    if available < one_batch:
        raise LoopusError(
            f"the probe text holds only {available} usable tokens, fewer than one batch of {one_batch} "
            f"({batch_size} x {seq_len - 1}); give more text with --data or lower --seq-len"
        )
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    chosen: list[tuple[int, list[int]]] = []
    total = 0
    depth = 0
    while total < tokens and any(depth < len(windows_per_doc[d]) for d in order):
        for doc in order:
            if depth < len(windows_per_doc[doc]) and total < tokens:
                window = windows_per_doc[doc][depth]
                chosen.append((doc, window))
                total += len(window) - (0 if bos is not None else 1)
        depth += 1
    if total < tokens:
        log.warning("the probe text holds %d usable tokens, fewer than the %d asked for; using all of them",
                    total, tokens)
    random.Random(seed + 1).shuffle(chosen)  # mix documents of every kind into every batch
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    batches = []
    for start in range(0, len(chosen), batch_size):
        rows = chosen[start:start + batch_size]
        length = max(len(w) for _, w in rows) + (1 if bos is not None else 0)
        ids = torch.full((len(rows), length), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for r, (_, window) in enumerate(rows):
            row = ([bos] if bos is not None else []) + window
            ids[r, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[r, :len(row)] = 1
        batches.append(TokenBatch(ids, mask, torch.tensor([d for d, _ in rows], dtype=torch.long)))
    log.info("%d batches, %d measured tokens from %d documents", len(batches), total,
             len({d for d, _ in chosen}))
    return batches


def count_batches(tokens: int, seq_len: int, batch_size: int) -> int:
    """How many full batches ``tokens`` measured tokens make at most (for progress totals)."""
    return math.ceil(tokens / (batch_size * (seq_len - 1)))

"""The text an analysis reads, three ways, disjoint by document: the measuring text (similarity), the
selection text (the rule reads the repeat-cost map there) and the report text (every number the report
shows about the choice).

Repeated documents are dropped first (a text that appears twice must not be on both sides). Then
``HELD_OUT_FRACTION`` of the documents (seeded) are held out from the measuring text and dealt
alternately to selection and report. A corpus of fewer than ten documents gives each document's last 10%
instead (cut at a whitespace). A held-out text of fewer than ``MIN_UNITS`` documents is cut into pieces
of about ``PIECE_CHARS`` characters, which then serve as the bootstrap's units (the provenance says so).

Map batches are windows of ``MAP_SEQ_LEN`` tokens (BOS + 31), the first window of as many documents as the
budget reaches (:func:`loopus_analyze.corpus.make_batches` goes round-robin over documents): short windows
from many documents give tighter intervals for the same compute than long windows from a few, since tokens
of one document are correlated. The selection text gets ``map_tokens`` tokens, the report text
``REPORT_FACTOR`` times as many: on the report text only the blocks the report shows are run, about a
seventh of the whole map's cost per token on the embedded model (the whole map of its 378 splits costs
about 460 forward passes per token: 7,686 layer passes for the repeats, 3,654 for the skips, 756 heads
that each cost about 8 layers).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from loopus_analyze import corpus
from loopus_core.errors import LoopusError

HELD_OUT_FRACTION = 0.1  # of the documents: selection + report text
MAP_SEQ_LEN = 32
MAP_BATCH_SIZE = 4
DEFAULT_MAP_TOKENS = 155  # selection text: 5 windows of 31 tokens (see README: the time of an analysis)
MIN_MAP_TOKENS = MAP_SEQ_LEN - 1
REPORT_FACTOR = 3
MIN_UNITS = 8
PIECE_CHARS = 600


@dataclass(frozen=True)
class Texts:
    """The three texts of one analysis (lists of documents, or pieces of them)."""

    measured: list[str]
    selection: list[str]
    report: list[str]
    units: str  # "documents" or "pieces of documents" (the bootstrap's unit on selection / report text)


def _tails(texts: list[str]) -> tuple[list[str], list[str]]:
    """Each document's first 90% (measured) and last 10% (held out), cut at a whitespace."""
    heads, tails = [], []
    for text in texts:
        cut = int(len(text) * (1 - HELD_OUT_FRACTION))
        space = text.rfind(" ", 0, cut)
        cut = space if space > len(text) // 2 else cut
        heads.append(text[:cut])
        tails.append(text[cut:])
    return heads, [t for t in tails if t.strip()]


def _pieces(texts: list[str]) -> list[str]:
    """Texts cut into pieces of about ``PIECE_CHARS`` characters, each cut at a whitespace."""
    out = []
    for text in texts:
        start = 0
        while start < len(text):
            end = min(len(text), start + PIECE_CHARS)
            space = text.rfind(" ", start + PIECE_CHARS // 2, end) if end < len(text) else -1
            end = space if space > start else end
            if text[start:end].strip():
                out.append(text[start:end])
            start = end
    return out


def three_ways(texts: list[str], seed: int) -> Texts:
    """Measuring, selection and report text (see the module docstring)."""
    texts = list(dict.fromkeys(texts))
    if len(texts) >= 10:
        measured, held = corpus.split_held_out(texts, HELD_OUT_FRACTION, seed)
    else:
        measured, held = _tails(texts)
    order = list(range(len(held)))
    random.Random(seed + 3).shuffle(order)
    units = "documents"
    if len(held) < 2 * MIN_UNITS:
        held, units = _pieces([held[i] for i in sorted(order)]), "pieces of documents"
        order = list(range(len(held)))
    selection = [held[i] for i in sorted(order[0::2])]
    report = [held[i] for i in sorted(order[1::2])]
    return Texts(measured, selection, report, units)


def _batches(tokenizer, texts: list[str], tokens: int, seed: int, what: str) -> list[corpus.TokenBatch]:
    if not texts:
        raise LoopusError(f"no {what} text is left for the repeat-cost map; give more text with --data")
    windows = max(1, tokens // (MAP_SEQ_LEN - 1))
    batch_size = min(MAP_BATCH_SIZE, windows)
    try:
        return corpus.make_batches(tokenizer, texts, tokens=tokens, seq_len=MAP_SEQ_LEN,
                                   batch_size=batch_size, seed=seed)
    except LoopusError:
        raise LoopusError(
            f"the held-out {what} text is too short for the repeat-cost map (it needs at least "
            f"{MAP_SEQ_LEN - 1} tokens in windows of {MAP_SEQ_LEN}); give more text with --data"
        ) from None


def map_batches(tokenizer, texts: Texts, map_tokens: int, seed: int) -> tuple[list, list]:
    """Token batches of the selection text (``map_tokens``) and of the report text (``REPORT_FACTOR``x)."""
    selection = _batches(tokenizer, texts.selection, map_tokens, seed + 11, "selection")
    report = _batches(tokenizer, texts.report, REPORT_FACTOR * map_tokens, seed + 13, "report")
    return selection, report

"""The text an analysis reads, three ways, disjoint by document: the measuring text (similarity), the
selection text (the rule reads the repeat-cost map there) and the report text (every number the report
shows about the choice).

Repeated documents are dropped first (a text that appears twice must not be on both sides). Then
``HELD_OUT_FRACTION`` of the documents (seeded) are held out from the measuring text and dealt
alternately to selection and report. A corpus of fewer than ten documents gives each document's last 10%
instead (cut at a whitespace). A held-out text of fewer than ``MIN_UNITS`` documents is cut into pieces
of about ``PIECE_CHARS`` characters, which then serve as the bootstrap's units (the provenance says so).

Map batches hold one window each, of ``MAP_SEQ_LEN`` tokens (BOS + 127, or the model's context when
shorter), cut from the documents round-robin in a seeded order (the first window of every document, then
the second windows, ...), so that any prefix of the list spreads over as many documents as it can: the race
(:mod:`loopus_analyze.race`) gives its rounds growing prefixes. Predictions are scored from position
``WARMUP`` on, so that the first tokens of a window, which have little context, do not dominate. The
selection text gets windows until ``map_tokens`` predictions (what each final contender of the race is
measured on); the report text until ``REPORT_SHARE`` of that.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass

import torch

from loopus_analyze import corpus
from loopus_core.errors import LoopusError

log = logging.getLogger(__name__)

HELD_OUT_FRACTION = 0.1  # of the documents: selection + report text
MAP_SEQ_LEN = 128  # tokens per map window, BOS included (the model's context when shorter)
WARMUP = 16  # map predictions are scored from this position on
DEFAULT_MAP_TOKENS = 2000  # scored predictions of each final contender of the race (selection text)
MIN_MAP_TOKENS = MAP_SEQ_LEN - 1 - WARMUP  # one window's scored predictions
REPORT_SHARE = 0.75  # of --map-tokens: the report text's predictions for the choice and its neighbours
MIN_SCORED = 8  # a window (a document's tail) with fewer scored predictions is dropped
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


def scored(window: int, has_bos: bool, warmup: int = WARMUP) -> int:
    """Scored predictions of a window of ``window`` document tokens (BOS added when the tokenizer has one)."""
    predictions = window if has_bos else window - 1  # positions 0.. predict tokens 1..
    return max(0, predictions - max(1, warmup))


def windows(tokenizer, texts: list[str], tokens: int, seed: int, what: str, seq_len: int = MAP_SEQ_LEN,
            ) -> list[corpus.TokenBatch]:
    """One-window batches of ``texts`` in round-robin document order, until ``tokens`` scored predictions
    (all the text holds when it holds fewer; a log line says so)."""
    bos = tokenizer.bos_token_id
    width = seq_len - 1 if bos is not None else seq_len
    encoded = corpus._encode(tokenizer, texts)
    per_doc = [[ids[i:i + width] for i in range(0, len(ids), width)] for ids in encoded]
    per_doc = [[w for w in ws if scored(len(w), bos is not None) >= MIN_SCORED] for ws in per_doc]
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    out: list[corpus.TokenBatch] = []
    total = 0
    for depth in range(max((len(ws) for ws in per_doc), default=0)):
        for doc in (d for d in order if depth < len(per_doc[d])):
            if total >= tokens:
                return out
            row = ([bos] if bos is not None else []) + per_doc[doc][depth]
            ids = torch.tensor([row], dtype=torch.long)
            out.append(corpus.TokenBatch(ids, torch.ones_like(ids), torch.tensor([doc], dtype=torch.long)))
            total += scored(len(per_doc[doc][depth]), bos is not None)
    if not out:
        raise LoopusError(f"the held-out {what} text is too short for the repeat-cost map (a window needs at "
                          f"least {MIN_SCORED} predictions past the first {WARMUP} positions); give more "
                          "text with --data")
    if total < tokens:
        log.info("the %s text holds %d scored predictions, fewer than the %d asked for; using all of them",
                 what, total, tokens)
    return out


def report_tokens(map_tokens: int) -> int:
    """The report text's predictions for the choice and its same-length neighbours."""
    return math.ceil(REPORT_SHARE * map_tokens)


def map_batches(tokenizer, texts: Texts, map_tokens: int, seed: int, seq_len: int = MAP_SEQ_LEN,
                ) -> tuple[list, list]:
    """One-window batches of the selection text (``map_tokens`` predictions) and of the report text
    (:func:`report_tokens`), windows of ``seq_len`` tokens (see the module docstring)."""
    selection = windows(tokenizer, texts.selection, map_tokens, seed + 11, "selection", seq_len)
    report = windows(tokenizer, texts.report, report_tokens(map_tokens), seed + 13, "report", seq_len)
    return selection, report

"""Measuring, selection and report text: disjoint, deterministic, and batches of the right size."""

from __future__ import annotations

import pytest

from loopus_analyze import heldout
from loopus_core.errors import LoopusError
from loopus_core.texts import load_texts


def test_three_disjoint_texts_from_the_builtin_corpus():
    texts = load_texts(None)
    three = heldout.three_ways(texts, seed=0)
    assert three.units == "documents"
    assert len(three.measured) + len(three.selection) + len(three.report) == len(set(texts))  # no repeats
    assert abs(len(three.selection) - len(three.report)) <= 1
    assert not set(three.selection) & set(three.report)
    assert not (set(three.selection) | set(three.report)) & set(three.measured)
    assert heldout.three_ways(texts, seed=0) == three
    assert heldout.three_ways(texts, seed=1).selection != three.selection


def test_few_documents_give_pieces_of_their_tails():
    texts = [" ".join(f"word{i}-{j}" for j in range(2000)) for i in range(3)]
    three = heldout.three_ways(texts, seed=0)
    assert three.units == "pieces of documents"
    assert len(three.measured) == 3 and len(three.selection) >= 4 and len(three.report) >= 4
    held = " ".join(three.selection + three.report)
    assert all(piece not in m for m in three.measured for piece in three.selection[:2])
    assert "word0-1999" in held and "word0-0 " not in held


def test_map_batches_are_short_windows_of_many_documents(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    three = heldout.three_ways(load_texts(None), seed=0)
    selection, report = heldout.map_batches(tokenizer, three, 124, seed=0)
    assert sum(b.measured_tokens for b in selection) == 124
    assert sum(b.measured_tokens for b in report) == heldout.REPORT_FACTOR * 124
    assert all(b.input_ids.shape[1] <= heldout.MAP_SEQ_LEN for b in selection + report)
    docs = {int(d) for b in report for d in b.doc_ids}
    assert len(docs) == heldout.REPORT_FACTOR * 124 // (heldout.MAP_SEQ_LEN - 1)  # one window per document


def test_too_little_held_out_text_is_a_one_line_error(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    three = heldout.Texts(["some text"], ["tiny"], ["bit"], "documents")
    with pytest.raises(LoopusError, match="held-out selection text is too short"):
        heldout.map_batches(tokenizer, three, 62, seed=0)

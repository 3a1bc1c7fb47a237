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


def test_map_batches_are_long_windows_one_document_each_round_robin(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    from loopus_analyze.functional import prediction_mask

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    three = heldout.three_ways(load_texts(None), seed=0)
    selection, report = heldout.map_batches(tokenizer, three, 2000, seed=0)
    scored = [int(prediction_mask(b.attention_mask, heldout.WARMUP).sum()) for b in selection]
    assert sum(scored) >= 2000 and sum(scored[:-1]) < 2000  # windows until the budget of predictions
    assert sum(int(prediction_mask(b.attention_mask, heldout.WARMUP).sum()) for b in report) >= 1500
    assert all(b.input_ids.shape == (1, heldout.MAP_SEQ_LEN) for b in selection[:5])  # long windows
    docs = [int(b.doc_ids[0]) for b in selection]
    first = docs[:min(len(docs), len(three.selection))]
    assert len(set(first)) == len(first)  # the first windows come from as many documents as there are
    assert heldout.map_batches(tokenizer, three, 2000, seed=0)[0][3].input_ids.equal(selection[3].input_ids)


def test_too_little_held_out_text_is_a_one_line_error(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    three = heldout.Texts(["some text"], ["tiny"], ["bit"], "documents")
    with pytest.raises(LoopusError, match="held-out selection text is too short"):
        heldout.map_batches(tokenizer, three, 222, seed=0)

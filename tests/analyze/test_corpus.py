"""Token batches of the probe text, the held-out split, and their one-line errors."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from loopus_analyze.corpus import make_batches, split_held_out
from loopus_core.errors import LoopusError
from loopus_core.texts import load_texts


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def test_batches_are_deterministic_masked_and_spread_over_documents(tokenizer):
    texts = load_texts(None)
    first = make_batches(tokenizer, texts, tokens=2000, seq_len=32, batch_size=4, seed=5)
    again = make_batches(tokenizer, texts, tokens=2000, seq_len=32, batch_size=4, seed=5)
    other = make_batches(tokenizer, texts, tokens=2000, seq_len=32, batch_size=4, seed=6)
    assert all(torch.equal(a.input_ids, b.input_ids) and torch.equal(a.doc_ids, b.doc_ids)
               for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0].input_ids, other[0].input_ids)
    measured = sum(b.measured_tokens for b in first)
    assert 2000 <= measured < 2000 + 4 * 31
    docs = torch.cat([b.doc_ids for b in first])
    assert len(set(docs.tolist())) == len(docs)  # one window per document while documents last
    for batch in first:
        assert batch.input_ids.shape[1] <= 32
        assert torch.all(batch.input_ids[:, 0] == tokenizer.bos_token_id)
        mask = batch.attention_mask
        assert torch.all(mask[:, :-1] >= mask[:, 1:])  # right padding
        assert torch.all(batch.input_ids[mask == 0] == tokenizer.pad_token_id)


def test_budget_errors(tokenizer):
    texts = ["word " * 400]
    with pytest.raises(LoopusError, match=r"--tokens 0 is out of range: it must be an integer >= 1"):
        make_batches(tokenizer, texts, tokens=0, seq_len=32, batch_size=4, seed=0)
    with pytest.raises(LoopusError, match=r"less than one batch \(4 x 31 = 124"):
        make_batches(tokenizer, texts, tokens=100, seq_len=32, batch_size=4, seed=0)
    with pytest.raises(LoopusError, match=r"holds only \d+ usable tokens.*--data"):
        make_batches(tokenizer, ["a short text"], tokens=1000, seq_len=32, batch_size=4, seed=0)


def test_short_text_uses_what_there_is(tokenizer, caplog):
    texts = ["word " * 300]
    batches = make_batches(tokenizer, texts, tokens=100_000, seq_len=32, batch_size=2, seed=0)
    assert 0 < sum(b.measured_tokens for b in batches) < 100_000
    assert "fewer than the 100000 asked for" in caplog.text


def test_split_held_out():
    texts = [f"doc {i}" for i in range(20)]
    kept, held = split_held_out(texts, 0.25, seed=1)
    assert len(held) == 5 and len(kept) == 15
    assert sorted(kept + held) == sorted(texts)
    assert split_held_out(texts, 0.25, seed=1) == (kept, held)
    assert split_held_out(texts, 0.0, seed=1) == (texts, [])
    with pytest.raises(LoopusError, match="outside"):
        split_held_out(texts, 1.0, seed=1)

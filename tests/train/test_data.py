"""Token shards and the split by document: reuse, damage, another tokenizer, parallel = serial, the sources,
the commands, and evaluation at another block size on held-out documents only (issue 13, item 3)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from loopus_core.errors import LoopusError
from loopus_train import shards as shards_module
from loopus_train import sources as sources_module
from loopus_train.data import PackedBlocks, load_blocks, split_documents
from loopus_train.records import encode_records
from loopus_train.shards import (
    ShardError,
    TokenShards,
    encoded_batches,
    prepare_data,
    prepare_shards,
    token_dtype,
)
from loopus_train.sources import RecordBatch, describe_source, record_batches
from tests.train.conftest import tiny_args
from tests.train.test_errors import _one_line_error

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()


@pytest.fixture(scope="module")
def tok(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def _texts(n: int = 40) -> list[str]:
    """``n`` distinct documents of varied length."""
    return [
        f"Document {i}: " + " ".join(WORDS[(i + j) % len(WORDS)] for j in range(3 + (i * 7) % 23))
        for i in range(n)
    ]


def _jsonl(path, texts):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def encode_documents(tok, texts, dtype):
    """Token ids of plain texts, each followed by EOS, and their lengths."""
    return encode_records(tok, "text", texts, dtype)[:2]


def _stream(tok, texts, ids):
    """The token stream of the documents ``ids`` of ``texts`` (each followed by EOS), computed directly."""
    tokens, lengths = encode_documents(tok, texts, np.dtype("<u4"))
    ends = np.cumsum(lengths)
    return np.concatenate([tokens[ends[i] - lengths[i] : ends[i]] for i in ids]).astype(np.int64)


def test_a_second_preparation_reuses_the_cached_shards(tok, tmp_path, monkeypatch):
    data = _jsonl(tmp_path / "docs.jsonl", _texts())
    first = load_blocks(tok, str(data), block_size=16, held_out=0.1, seed=0)
    monkeypatch.setattr(shards_module, "prepare_shards", lambda *a, **k: pytest.fail("tokenised again"))
    second = load_blocks(tok, str(data), block_size=16, held_out=0.1, seed=0)
    assert second.shards.path == first.shards.path
    assert second.fingerprint == first.fingerprint
    assert (second.train[:] == first.train[:]).all()


def test_held_out_documents_are_never_trained_on_whatever_the_block_size(tok, tmp_path):
    texts = _texts(60)
    data = _jsonl(tmp_path / "docs.jsonl", texts)
    for block_size in (16, 7, 40):
        split = load_blocks(tok, str(data), block_size=block_size, held_out=0.1, seed=3)
        train_docs = set().union(*(split.train.documents(i).tolist() for i in range(len(split.train))))
        held_docs = set().union(*(split.held_out.documents(i).tolist() for i in range(len(split.held_out))))
        assert not train_docs & held_docs
        assert held_docs <= set(split_documents(60, 0.1, 3, "x")[1].tolist())
        assert split.held_out.num_documents == 6 and split.train.num_documents == 54
        train_ids, held_ids = split_documents(60, 0.1, 3, "x")
        expected = _stream(tok, texts, held_ids)
        assert (split.held_out[:].flatten().numpy() == expected[: len(split.held_out) * block_size]).all()
        expected = _stream(tok, texts, train_ids)
        assert (split.train[:].flatten().numpy() == expected[: len(split.train) * block_size]).all()


def _cache_entry(tok, data):
    return shards_module.cache_entry(describe_source(str(data)), tok)


def test_a_damaged_cache_entry_is_rebuilt_and_a_damaged_shard_directory_is_a_one_line_error(
    tok, tmp_path, caplog
):
    data = _jsonl(tmp_path / "docs.jsonl", _texts())
    good = load_blocks(tok, str(data), block_size=16, held_out=0.1, seed=0)
    tokens = _cache_entry(tok, data) / "shard-00000.tokens"
    raw = tokens.read_bytes()
    for damaged in (raw[:-2], raw[:10] + bytes([raw[10] ^ 1]) + raw[11:]):  # truncated; one bit flipped
        tokens.write_bytes(damaged)
        with caplog.at_level("WARNING", logger="loopus_train.shards"):
            again = load_blocks(tok, str(data), block_size=16, held_out=0.1, seed=0)
        assert "tokenising it again" in caplog.text and "shard-00000.tokens" in caplog.text
        assert tokens.read_bytes() == raw and (again.train[:] == good.train[:]).all()
        caplog.clear()
    out = tmp_path / "shards"
    prepare_data(str(data), tok.name_or_path, out=out)
    (out / "shard-00000.tokens").write_bytes(raw[:-2])
    with pytest.raises(
        ShardError, match=r"shard-00000.tokens is truncated or altered .*prepare the data again"
    ):
        load_blocks(tok, str(out), block_size=16, held_out=0.1, seed=0)
    (out / "shard-00000.tokens").write_bytes(raw[:10] + bytes([raw[10] ^ 1]) + raw[11:])
    with pytest.raises(ShardError, match=r"is altered \(its sha256 differs"):
        load_blocks(tok, str(out), block_size=16, held_out=0.1, seed=0)


def _other_tokenizer(tok, path):
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(tok.name_or_path)
    other.add_tokens(["<extra-token>"])
    other.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def test_another_tokenizer_gets_its_own_shards(tok, tmp_path):
    data = _jsonl(tmp_path / "docs.jsonl", _texts())
    other = _other_tokenizer(tok, tmp_path / "other-tok")
    ours = load_blocks(tok, str(data), block_size=16, held_out=0.1, seed=0)
    theirs = load_blocks(other, str(data), block_size=16, held_out=0.1, seed=0)
    assert ours.shards.path != theirs.shards.path
    assert ours.shards.tokenizer_fingerprint != theirs.shards.tokenizer_fingerprint
    prepared = tmp_path / "their-shards"
    prepare_data(str(data), tmp_path / "other-tok", out=prepared)
    with pytest.raises(LoopusError, match="tokenised with another tokenizer"):
        load_blocks(tok, str(prepared), block_size=16, held_out=0.1, seed=0)


def test_parallel_tokenisation_writes_what_one_process_writes_with_few_batches_in_flight(
    tok, tmp_path, monkeypatch
):
    monkeypatch.setattr(sources_module, "BATCH_DOCUMENTS", 3)  # many batches
    source = describe_source(str(_jsonl(tmp_path / "docs.jsonl", _texts())))
    for workers in (1, 2):
        prepare_shards(source, tok, tmp_path / f"w{workers}", workers=workers)
    one, two = (json.loads((tmp_path / f"w{w}" / "manifest.json").read_text()) for w in (1, 2))
    assert one["shards"] == two["shards"] and one["num_documents"] == 40
    pulled = []

    def batches():
        for i in range(30):
            pulled.append(i)
            yield RecordBatch("text", i + 1, [f"text number {i}"])

    encoded = encoded_batches(tok, batches(), np.dtype("<u2"), workers=2)
    next(encoded)
    assert len(pulled) <= 4  # at most 2 x workers batches were taken from the reader
    assert len(list(encoded)) == 29 and len(pulled) == 30


def test_shards_roll_over_between_documents(tok, tmp_path):
    texts = _texts()
    source = describe_source(str(_jsonl(tmp_path / "docs.jsonl", texts)))
    prepare_shards(source, tok, tmp_path / "small", workers=1, shard_tokens=60)
    shards = TokenShards.open(tmp_path / "small", "test")
    assert len(shards.tokens) > 5 and shards.num_documents == 40
    _, lengths = encode_documents(tok, texts, np.dtype("<u2"))
    per_shard = [np.diff(np.r_[0, np.asarray(e)]) for e in shards.ends]
    assert np.concatenate(per_shard).tolist() == lengths.tolist()  # every document whole, in order
    assert all(len(t) <= 60 or len(e) == 1 for t, e in zip(shards.tokens, shards.ends, strict=True))
    blocks = PackedBlocks(shards, np.arange(40), 9)
    expected = _stream(tok, texts, range(40))
    assert (blocks[:].flatten().numpy() == expected[: len(blocks) * 9]).all()


def test_token_ids_are_uint16_where_the_vocabulary_allows():
    class Vocab:
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

    assert token_dtype(Vocab(65536)) == np.uint16 and token_dtype(Vocab(65537)) == np.uint32


def test_jsonl_parquet_and_text_files_give_the_same_documents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = _texts(12)
    _jsonl(tmp_path / "j" / "docs.jsonl", texts)
    (tmp_path / "p").mkdir()
    pq.write_table(pa.table({"text": texts, "id": list(range(12))}), tmp_path / "p" / "docs.parquet")
    (tmp_path / "t").mkdir()
    for i, text in enumerate(texts):
        (tmp_path / "t" / f"doc-{i:03d}.txt").write_text(text)
    for folder in ("j", "p", "t"):
        read = [t for batch in record_batches(describe_source(str(tmp_path / folder))) for t in batch.records]
        assert read == texts, folder


def test_bad_records_are_one_line_errors(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "fine"}\n{"title": "no text"}\n')
    with pytest.raises(LoopusError, match=r"record 2 has no text, messages, .* fields \(fields: title\)"):
        list(record_batches(describe_source(str(tmp_path / "a.jsonl"))))
    (tmp_path / "b.jsonl").write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(LoopusError, match=r"b.jsonl line 2 is not JSON"):
        list(record_batches(describe_source(str(tmp_path / "b.jsonl"))))


def test_prepare_data_command_shows_shard_sizes_and_tokens_per_second_then_reuses_them(
    cli, looped_tiny, train_text, tmp_path
):
    # --force: another test of the session may have prepared the same text already
    code, stdout, stderr = cli(
        "prepare-data", train_text, "--tokenizer", looped_tiny, "--workers", 1, "--force"
    )
    assert code == 0, stderr
    assert "token shards:" in stdout and "tokens/s" in stdout and "MiB" in stdout and "documents" in stdout
    code, stdout, stderr = cli("prepare-data", train_text, "--tokenizer", looped_tiny)
    assert code == 0 and "already prepared" in stdout
    code, stdout, stderr = cli(
        "prepare-data", train_text, "--tokenizer", looped_tiny, "--out", tmp_path / "shards"
    )
    assert code == 0 and "loopus finetune CKPT --data" in stdout
    out = tmp_path / "run"
    code, stdout, stderr = cli(*tiny_args(looped_tiny, tmp_path / "shards", out, steps=1, save_every=1))
    assert code == 0, stderr


def test_a_shard_directory_from_another_tokenizer_is_a_one_line_error(
    cli, looped_tiny, train_text, tok, tmp_path
):
    _other_tokenizer(tok, tmp_path / "other-tok")
    assert (
        cli("prepare-data", train_text, "--tokenizer", tmp_path / "other-tok", "--out", tmp_path / "s")[0]
        == 0
    )
    _one_line_error(
        cli(*tiny_args(looped_tiny, tmp_path / "s", tmp_path / "out")), "tokenised with another tokenizer"
    )
    assert not (tmp_path / "out").exists()


def test_eval_at_another_block_size_reads_only_held_out_documents(cli, looped_tiny, tok, tmp_path):
    texts = _texts(60)
    data = _jsonl(tmp_path / "docs.jsonl", texts)
    out = tmp_path / "run"
    code, _, stderr = cli(
        *tiny_args(looped_tiny, data, out, block_size=32, held_out=0.1, steps=1, save_every=1)
    )
    assert code == 0, stderr
    train_ids, held_ids = split_documents(60, 0.1, 0, "x")
    held_stream = _stream(tok, texts, held_ids)
    for block_size in (12, 32, 50):
        report = tmp_path / f"eval-{block_size}.json"
        args = (
            "eval",
            out,
            "--block-size",
            block_size,
            "--loops",
            "1",
            "--exit-threshold",
            "",
            "--json",
            report,
        )
        code, stdout, stderr = cli(*args, "--device", "cpu")
        assert code == 0, stderr
        result = json.loads(report.read_text())
        assert result["block_size"] == block_size and "held-out documents" in result["data"]
        assert 1 <= result["documents"] <= len(held_ids)
        # the evaluated blocks are the held-out documents' stream cut at this block size: no training token
        from loopus_train.evaluate import eval_blocks
        from loopus_train.state import list_checkpoints

        blocks, *_ = eval_blocks(
            list_checkpoints(out)[-1][1], tok, None, block_size=block_size, max_blocks=64
        )
        assert len(blocks) == result["blocks"] == min(64, len(held_stream) // block_size)
        assert (blocks.flatten().numpy() == held_stream[: blocks.numel()]).all()


def test_a_token_limit_takes_whole_documents_up_to_it_and_is_its_own_source(tok, tmp_path):
    texts = _texts()
    data = _jsonl(tmp_path / "docs.jsonl", texts)
    _, lengths = encode_documents(tok, texts, np.dtype("<u2"))
    limited, _ = prepare_data(str(data), tok.name_or_path, max_tokens=200, workers=1)
    whole, _ = prepare_data(str(data), tok.name_or_path, workers=1)
    first = (
        int(np.searchsorted(np.cumsum(lengths), 200)) + 1
    )  # the document that reaches 200 tokens, included
    assert limited.num_documents == first and limited.num_tokens == int(lengths[:first].sum()) >= 200
    assert whole.num_documents == 40 and limited.path != whole.path

"""Issue 23, the data side: each test is named after the item it shows (``test_itemNN_*``) and fails on the
code before the fix: the held-out split of labelled records, prepare-data --max-tokens, literal paths, the
content-keyed shard cache, assistant-first chats, chat roles, a tokenizer larger than the embedding, the
checksummed manifest, mixed record kinds, --loss-on all on pre-tokenised records, bad and empty JSONL, one
wording for "already prepared", and one text file as a corpus."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from loopus_core.errors import LoopusError
from loopus_train import shards as shards_module
from loopus_train.data import load_blocks, split_documents
from loopus_train.records import IGNORE, encode_chat
from loopus_train.sources import describe_source, record_batches
from tests.train.conftest import tiny_args
from tests.train.test_errors import _one_line_error

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron".split()


@pytest.fixture(scope="module")
def tok(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def chatml(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


def _jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _texts(n: int, start: int = 0) -> list[str]:
    return [
        f"Document {i}: " + " ".join(WORDS[(i + j) % len(WORDS)] for j in range(3 + (i * 7) % 23))
        for i in range(start, start + n)
    ]


def _read(data) -> list:
    return [r for batch in record_batches(describe_source(str(data))) for r in batch.records]


def _record_ids(blocks) -> set[int]:
    return set(blocks.doc_ids.tolist())


# ------------------------------------------------------------------------------------------ item 1


def test_item01_labelled_held_out_records_are_the_same_at_every_block_size(tok, tmp_path):
    """Prompts of many lengths: at --block-size 16 many records lose their completion, at 64 none. The
    held-out records at one block size are never training records at another: the split is by identity."""
    records = [
        {"prompt": " ".join(WORDS[: 1 + (i * 7) % 10]), "completion": f" answer {i}"} for i in range(80)
    ]
    data = _jsonl(tmp_path / "pairs.jsonl", records)
    splits = {b: load_blocks(tok, str(data), block_size=b, held_out=0.2, seed=1) for b in (16, 64)}
    short, long = splits[16], splits[64]
    assert len(_record_ids(short.train)) < len(_record_ids(long.train))  # the cut really drops records
    assert not _record_ids(long.held_out) & _record_ids(short.train)
    assert not _record_ids(short.held_out) & _record_ids(long.train)
    train_ids, held_ids = split_documents(80, 0.2, 1, "x")
    assert _record_ids(long.held_out) == set(held_ids.tolist())  # every record fits 64: all of them
    assert _record_ids(short.held_out) <= set(held_ids.tolist())
    assert _record_ids(short.train) <= set(train_ids.tolist())


# ------------------------------------------------------------------------------------------ item 2


def test_item02_prepare_data_max_tokens_is_honoured_and_checked(cli, looped_tiny, tmp_path):
    data = _jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in _texts(40)])
    out = tmp_path / "limited"
    code, stdout, stderr = cli(
        "prepare-data", data, "--tokenizer", looped_tiny, "--out", out, "--max-tokens", 200, "--workers", 1
    )
    assert code == 0, stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["limit"] == 200
    assert 200 <= manifest["num_tokens"] < 400 and manifest["num_documents"] < 40
    for bad in ("0", "-5"):
        _one_line_error(
            cli("prepare-data", data, "--tokenizer", looped_tiny, "--max-tokens", bad), "--max-tokens", bad
        )
    code, stdout, stderr = cli("prepare-data", data, "--tokenizer", looped_tiny, "--max-tokens", 300)
    assert code == 0 and "train on it with: loopus finetune CKPT --data" in stdout  # its own cache entry


# ------------------------------------------------------------------------------------------ item 4


def test_item04_jsonl_and_parquet_paths_are_literal(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    mine, neighbour = _texts(3), _texts(3, start=50)
    _jsonl(tmp_path / "g?.jsonl", [{"text": t} for t in mine])
    _jsonl(tmp_path / "gx.jsonl", [{"text": t} for t in neighbour])  # matches the pattern g?.jsonl
    _jsonl(tmp_path / "data[1].jsonl", [{"text": t} for t in mine])
    _jsonl(tmp_path / "data1.jsonl", [{"text": t} for t in neighbour])
    (tmp_path / "p").mkdir()
    pq.write_table(pa.table({"text": mine}), tmp_path / "p" / "t*.parquet")
    pq.write_table(pa.table({"text": neighbour}), tmp_path / "p" / "tx.parquet")
    assert _read(tmp_path / "g?.jsonl") == mine
    assert _read(tmp_path / "data[1].jsonl") == mine
    assert _read(tmp_path / "p" / "t*.parquet") == mine


# ------------------------------------------------------------------------------------------ item 5


def _rewrite_keeping_size_and_mtime(path, text: str) -> None:
    before = path.stat()
    assert len(text.encode()) == before.st_size
    path.write_text(text)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # what cp -p, rsync -t and tar x leave


def test_item05_a_file_rewritten_with_the_same_size_and_mtime_is_tokenised_again(tok, tmp_path, caplog):
    texts = [t.ljust(200, ".") for t in _texts(800)]  # equal lengths: a swap keeps the size; 170 kB
    data = _jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in texts])
    first = load_blocks(tok, str(data), block_size=16, held_out=0.1, seed=0)
    # the middle (past the first and before the last 64 KiB) changes: size, head and tail stay
    middle = texts[:400] + [texts[401], texts[400]] + texts[402:]
    _rewrite_keeping_size_and_mtime(data, "".join(json.dumps({"text": t}) + "\n" for t in middle))
    with caplog.at_level("WARNING", logger="loopus_train.shards"):
        second = load_blocks(tok, str(data), block_size=16, held_out=0.1, seed=0)
    assert "changed since it was tokenised" in caplog.text
    assert second.digest != first.digest
    assert _read(data) == middle
    # the head changes: another cache key altogether
    head = [texts[1], texts[0], *middle[2:]]
    _rewrite_keeping_size_and_mtime(data, "".join(json.dumps({"text": t}) + "\n" for t in head))
    third = load_blocks(tok, str(data), block_size=16, held_out=0.1, seed=0)
    assert third.shards.path != second.shards.path and third.digest not in (first.digest, second.digest)
    fresh = _jsonl(tmp_path / "copy" / "docs.jsonl", [{"text": t} for t in head])
    assert load_blocks(tok, str(fresh), block_size=16, held_out=0.1, seed=0).digest == third.digest


# ------------------------------------------------------------------------------------------ item 8


def test_item08_a_conversation_may_open_with_the_assistant(chatml):
    messages = [
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "Four."},
    ]
    ids, labels = encode_chat(chatml, messages)
    assert (
        ids
        == chatml(chatml.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    )
    supervised = chatml.decode([t for t in labels if t != IGNORE])
    assert supervised == "Hello! How can I help?<|im_end|>Four.<|im_end|>"


# ------------------------------------------------------------------------------------------ item 9


CHAT = [
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another?"},
    {"role": "assistant", "content": "Green."},
]


def test_item09_chat_role_aliases_are_read_and_other_roles_refused(chatml, tmp_path):
    plain = load_blocks(chatml, str(_jsonl(tmp_path / "a.jsonl", [{"messages": CHAT}] * 8)), **_SPLIT)
    sharegpt = [
        {"conversations": [{"from": {"user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}]}
        for m in CHAT
    ]
    sharegpt = [{"conversations": [t for r in sharegpt for t in r["conversations"]]}] * 8
    capitals = [{"messages": [{**m, "role": m["role"].capitalize()} for m in CHAT]}] * 8
    for name, records in (("sharegpt", sharegpt), ("capitals", capitals)):
        other = load_blocks(chatml, str(_jsonl(tmp_path / f"{name}.jsonl", records)), **_SPLIT)
        assert (other.train[:] == plain.train[:]).all() and (
            other.train.labels(slice(None)) == plain.train.labels(slice(None))
        ).all(), name
    narrator = [{"messages": [{"role": "narrator", "content": "Once."}, *CHAT]}]
    with pytest.raises(LoopusError, match=r"record 1: messages entry 1 has role 'narrator'; the roles are "):
        load_blocks(chatml, str(_jsonl(tmp_path / "n.jsonl", narrator)), **_SPLIT)
    no_answer = [{"messages": [m for m in CHAT if m["role"] == "user"]}] * 4
    with pytest.raises(LoopusError, match=r"none of its 4 records has a supervised token \(the assistant"):
        load_blocks(chatml, str(_jsonl(tmp_path / "u.jsonl", no_answer)), **_SPLIT)


_SPLIT = {"block_size": 64, "held_out": 0.25, "seed": 0}


def test_item09_conversations_without_an_assistant_turn_are_counted_apart_from_truncation(
    chatml, tmp_path, caplog
):
    records = [{"messages": CHAT}] * 6 + [{"messages": CHAT[:1]}] * 2
    with caplog.at_level("WARNING", logger="loopus_train.data"):
        split = load_blocks(chatml, str(_jsonl(tmp_path / "c.jsonl", records)), **_SPLIT)
    assert "2 of 8 records have no supervised token" in caplog.text and "assistant turns" in caplog.text
    assert "truncated" not in caplog.text and split.train.num_documents + split.held_out.num_documents == 6


# ------------------------------------------------------------------------------------------ item 10


def test_item10_a_tokenizer_larger_than_the_embedding_is_refused_by_the_models_size(
    cli, looped_tiny, tmp_path
):
    from transformers import AutoTokenizer

    ckpt = tmp_path / "ckpt"
    shutil.copytree(looped_tiny, ckpt)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    rows = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    tokenizer.add_tokens([f"<added-{i}>" for i in range(len(tokenizer) - rows + 3)])
    tokenizer.save_pretrained(ckpt)
    assert len(tokenizer) > rows
    text = " ".join(f"{t} <added-2>" for t in _texts(60))
    data = _jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in text.split("Document")[1:]])
    line = _one_line_error(
        cli(*tiny_args(ckpt, data, tmp_path / "out", block_size=16)),
        "model's embedding has",
        "without resizing",
    )
    assert f"{rows} rows" in line
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ item 11


def test_item11_an_edited_manifest_or_a_file_in_the_cache_is_rebuilt(tok, tmp_path, caplog):
    data = _jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in _texts(40)])
    good = load_blocks(tok, str(data), block_size=16, held_out=0.1, seed=0)
    entry = shards_module.cache_entry(describe_source(str(data)), tok)
    manifest = json.loads((entry / "manifest.json").read_text())
    edits = (
        {**manifest, "num_tokens": manifest["num_tokens"] * 2},  # plausible, and wrong
        {**manifest, "shards": [{"tokens": 1}]},  # a traceback before
        [1, 2],
    )
    for edited in edits:
        (entry / "manifest.json").write_text(json.dumps(edited))
        with caplog.at_level("WARNING", logger="loopus_train.shards"):
            again = load_blocks(tok, str(data), block_size=16, held_out=0.1, seed=0)
        assert "tokenising it again" in caplog.text and "manifest" in caplog.text
        assert (again.train[:] == good.train[:]).all() and again.shards.num_tokens == good.shards.num_tokens
        caplog.clear()
    shutil.rmtree(entry)
    entry.write_text("not a shard directory")
    with caplog.at_level("WARNING", logger="loopus_train.shards"):
        again = load_blocks(tok, str(data), block_size=16, held_out=0.1, seed=0)
    assert "is not a directory" in caplog.text and entry.is_dir()
    assert (again.train[:] == good.train[:]).all()


def test_item11_an_edited_manifest_in_a_shard_directory_is_one_line(cli, looped_tiny, tmp_path):
    data = _jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in _texts(40)])
    out = tmp_path / "shards"
    assert cli("prepare-data", data, "--tokenizer", looped_tiny, "--out", out, "--workers", 1)[0] == 0
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "shards": [{"tokens": 1}]}))
    _one_line_error(cli(*tiny_args(looped_tiny, out, tmp_path / "run")), "manifest.json is altered")
    (out / "manifest.json").write_text("[1, 2]")
    _one_line_error(cli(*tiny_args(looped_tiny, out, tmp_path / "run")), "not a token-shard manifest")


# ------------------------------------------------------------------------------------------ item 13


def test_item13_mixed_record_kinds_are_reported_as_a_mix(tmp_path):
    mixed = [{"text": "plain"}, {"text": "more"}, {"messages": CHAT}]
    with pytest.raises(LoopusError, match=r"mixes record kinds: text records from record 1, then a messages"):
        _read(_jsonl(tmp_path / "m.jsonl", mixed))
    pairs = [{"prompt": "a", "completion": "b"}, {"input_ids": [1, 2], "labels": [1, 2]}]
    with pytest.raises(
        LoopusError, match=r"prompt/completion records .* input_ids/labels record at record 2"
    ):
        _read(_jsonl(tmp_path / "p.jsonl", pairs))


# ------------------------------------------------------------------------------------------ item 18


def test_item18_loss_on_all_trains_every_token_of_pre_tokenised_records(tok, tmp_path):
    records = [{"input_ids": [5, 6, 7, 8 + i % 5], "labels": [-100, -100, 7, 8 + i % 5]} for i in range(20)]
    data = _jsonl(tmp_path / "t.jsonl", records)
    split = load_blocks(tok, str(data), block_size=8, held_out=0.1, seed=0, loss_on="all")
    ids, labels = split.train[:], split.train.labels(slice(None))
    assert (labels[:, :4] == ids[:, :4]).all() and (labels[:, 4:] == IGNORE).all()
    with pytest.raises(LoopusError, match="--loss-on completion: .* pre-tokenised"):
        load_blocks(tok, str(data), block_size=8, held_out=0.1, seed=0, loss_on="completion")


# ------------------------------------------------------------------------------------------ items 20, 21


def test_item20_a_bad_jsonl_line_is_one_line_naming_it_from_one(cli, looped_tiny, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "one"}\n\n{"text": "two"\n')
    code, stdout, stderr = cli(*tiny_args(looped_tiny, data, tmp_path / "out"))
    line = _one_line_error((code, stdout, stderr), "bad.jsonl line 3 is not JSON")
    noise = [x for x in stderr.splitlines() if x.strip() and x != line and "bad.jsonl" not in x]
    assert not [x for x in noise if "json" in x.lower() or "row" in x.lower()], stderr
    assert "datasets" not in stderr.lower()
    data.write_text('{"text": "one"}\n[1, 2]\n')
    _one_line_error(cli(*tiny_args(looped_tiny, data, tmp_path / "out")), "line 2 is a JSON list")


def test_item21_an_empty_jsonl_reads_like_an_empty_txt(cli, looped_tiny, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    (tmp_path / "empty.txt").write_text("")
    for name in ("empty.jsonl", "blank.jsonl", "empty.txt"):
        line = _one_line_error(
            cli(*tiny_args(looped_tiny, tmp_path / name, tmp_path / "out")), "holds no text"
        )
        assert "StopIteration" not in line


def test_item21_prepare_data_says_already_prepared_in_one_wording(cli, looped_tiny, tmp_path):
    data = _jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in _texts(20)])
    other = _jsonl(tmp_path / "other.jsonl", [{"text": t} for t in _texts(20, start=30)])
    out = tmp_path / "shards"
    prepare = ("prepare-data", "--tokenizer", looped_tiny, "--workers", 1)
    assert cli(*prepare, data, "--out", out)[0] == 0
    for target in (("--out", out), ()):  # a shard directory, and the cache
        if not target:
            assert cli(*prepare, data)[0] == 0
        code, stdout, stderr = cli(*prepare, data, *target)
        assert code == 0 and "already prepared (same text and tokenizer); --force tokenises again" in stdout
    _one_line_error(cli(*prepare, other, "--out", out), "holds other token shards", "--force tokenises again")
    code, stdout, stderr = cli(*prepare, other, "--out", out, "--force")
    assert code == 0 and "tokenised in" in stdout


# ------------------------------------------------------------------------------------------ item 24


def _one_document(path, size: int) -> str:
    from tests.tiny_models import _training_text

    paragraphs = _training_text()
    text, i = [], 0
    while sum(len(p) + 2 for p in text) < size:
        text.append(f"{i}. {paragraphs[i % len(paragraphs)]}")
        i += 1
    path.write_text("\n\n".join(text))
    return path.read_text()


def test_item24_one_text_file_is_split_by_its_token_stream_tail(tok, tmp_path, caplog):
    _one_document(tmp_path / "input.txt", 20_000)
    stream = None
    for block_size in (16, 50, 7):
        with caplog.at_level("INFO", logger="loopus_train.data"):
            split = load_blocks(tok, str(tmp_path / "input.txt"), block_size=block_size, held_out=0.1, seed=3)
        assert (
            "holds 1 document(s), too few to hold out" in caplog.text
            and "are held out instead" in caplog.text
        )
        caplog.clear()
        if stream is None:
            stream = np.asarray(split.shards.tokens[0], dtype=np.int64)
            cut = len(stream) - round(0.1 * len(stream))
        train, held = split.train[:].flatten().numpy(), split.held_out[:].flatten().numpy()
        assert (train == stream[: len(train)]).all() and len(train) <= cut  # the head only
        assert (held == stream[cut : cut + len(held)]).all() and len(held) >= block_size  # the tail only
        assert split.train.num_documents == split.held_out.num_documents == 1


def test_item24_finetune_on_one_300_kb_text_file_with_default_options(cli, looped_tiny, tmp_path):
    """The first run a newcomer makes: every data option at its default (only the length of the run and the
    device are set, to fit the suite)."""
    _one_document(tmp_path / "input.txt", 300_000)
    out = tmp_path / "run"
    code, stdout, stderr = cli(
        "finetune",
        looped_tiny,
        "--data",
        tmp_path / "input.txt",
        "--out",
        out,
        "--steps",
        1,
        "--device",
        "cpu",
        "--eval-loops",
        "1",
        "--eval-blocks",
        1,
    )
    assert code == 0, stderr
    assert "too few to hold out" in stderr and (out / "checkpoints").is_dir()

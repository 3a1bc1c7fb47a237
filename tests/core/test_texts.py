"""The built-in corpus, user data files and folders, and their one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loopus_core.errors import LoopusError
from loopus_core.texts import BUILTIN_CORPUS, load_texts


def test_builtin_corpus_is_varied_small_and_documented():
    texts = load_texts(None)
    assert len(texts) >= 300
    assert BUILTIN_CORPUS.stat().st_size < 4 * 2**20
    sources = {json.loads(line)["source"].split(":")[0] for line in BUILTIN_CORPUS.read_text().splitlines()}
    assert {"python-reference", "cpython-stdlib-code", "generated-arithmetic", "written-prose",
            "written-dialogue"} <= sources
    provenance = (BUILTIN_CORPUS.parent / "PROVENANCE.md").read_text()
    for source in sources:
        assert source in provenance
    assert "PSF" in provenance and "Apache-2.0" in provenance


def test_user_files_txt_jsonl_and_folder(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "b.jsonl").write_text('{"text": "second"}\n\n{"text": "third", "id": 3}\n')
    (tmp_path / "ignored.csv").write_text("x,y")
    assert load_texts(tmp_path / "a.txt") == ["first document"]
    assert load_texts(tmp_path / "b.jsonl") == ["second", "third"]
    assert load_texts(tmp_path) == ["first document", "second", "third"]


@pytest.mark.parametrize("name, content, message", [
    ("empty.txt", b"   \n", "holds no text"),
    ("garbage.txt", bytes(range(256)) * 4, "binary"),
    ("latin.txt", "caf\u00e9".encode("latin-1"), "not valid UTF-8"),
    ("notext.jsonl", b'{"body": "x"}\n', "no string 'text' field"),
    ("broken.jsonl", b'{"text": \n', "is not JSON"),
    ("data.csv", b"a,b", "neither .txt nor .jsonl"),
])
def test_bad_data_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(LoopusError, match=message) as info:
        load_texts(path)
    assert "\n" not in str(info.value)


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(LoopusError, match="does not exist"):
        load_texts(tmp_path / "nope.txt")
    with pytest.raises(LoopusError, match="holds no .txt or .jsonl"):
        load_texts(tmp_path)


def test_data_path_may_be_string(tmp_path):
    path = Path(tmp_path) / "t.txt"
    path.write_text("hello")
    assert load_texts(str(path)) == ["hello"]


"""Training data, described without reading it, then streamed in batches of records.

A source (``--data``) is:

* None: the built-in corpus (:data:`loopus_core.texts.BUILTIN_CORPUS`, a JSONL file); ``builtin:chat``:
  the shipped chat set (:data:`BUILTIN_CHAT`, conversations written for this project, see its PROVENANCE.md);
* a ``.txt`` file (one document), a ``.jsonl`` file (one record per line), a ``.parquet`` file (one record
  per row), or a folder holding such files (every one below it, in sorted path order);
* the name of a ``datasets`` dataset (``name`` or ``org/name``, optionally ``:config``): its ``train`` split,
  read with ``streaming=True`` (nothing is downloaded whole; needs the hub).

A record is plain text (a ``text`` field), a conversation (``messages``: a list of ``role``/``content``
turns), a prompt/completion pair (``prompt`` and ``completion``) or pre-tokenised ids with their labels
(``input_ids`` and ``labels``); :mod:`loopus_train.records` turns each kind into tokens and labels. One
source holds one kind. JSONL, Parquet and dataset names are read through the ``datasets`` library in
streaming mode (pyarrow reads a file in chunks), so memory does not grow with the file; a ``.txt`` file is one
document and is read whole. :func:`describe_source` checks a source and fingerprints it from file paths,
sizes and modification times (no text is read): the first half of the token-shard cache key. Every problem a
user can cause is a one-line :class:`~loopus_core.errors.LoopusError`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from loopus_core.checks import check_int
from loopus_core.errors import LoopusError, first_line
from loopus_core.texts import _DATASET_NAME, BUILTIN_CORPUS, _read_text, check_text  # one rule for text

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
BUILTIN_CHAT_NAME = "builtin:chat"  # --data value of the shipped chat set
BUILTIN_CHAT = Path(__file__).with_name("data") / "chat_set.jsonl"
_BUILDERS = {".jsonl": "json", ".parquet": "parquet"}  # the datasets builder that streams each format
BATCH_CHARS = 1 << 20  # a batch of records holds about this many characters (the tokenising unit)
BATCH_DOCUMENTS = 4096


@dataclass(frozen=True)
class Source:
    """A checked text source: what the user passed, its files (or dataset name) and its fingerprint."""

    label: str  # for messages: the path or name as given, or "the built-in corpus"
    files: tuple[Path, ...]  # local files in reading order (empty for a dataset name)
    dataset: str | None  # ``name[:config]`` of a datasets dataset, else None
    fingerprint: str  # sha256 of the files' paths, sizes and modification times (or the dataset name), limit
    limit: int | None = None  # tokens to take at most (whole documents), None: all

    @property
    def slug(self) -> str:
        """A short, file-system-safe name for cache directories."""
        stem = self.dataset or (self.files[0].stem if len(self.files) == 1 else Path(self.label).name)
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)[:40] or "data"


def describe_source(data: str | Path | None, limit: int | None = None) -> Source:
    """Check ``data`` (see the module docstring) and fingerprint it without reading any text; ``limit``:
    take only the documents up to that many tokens (part of the fingerprint)."""
    if limit is not None:
        check_int(limit, "--max-tokens", 1)
    source = _described(data)
    if limit is None:
        return source
    digest = hashlib.sha256(f"{source.fingerprint}:limit={limit}".encode()).hexdigest()
    return dataclasses.replace(source, fingerprint=f"sha256:{digest[:16]}", limit=limit)


def _described(data: str | Path | None) -> Source:
    if data is None:
        return _local_source("the built-in corpus", [BUILTIN_CORPUS])
    if str(data) == BUILTIN_CHAT_NAME:
        return _local_source("the built-in chat set", [BUILTIN_CHAT])
    path = Path(data).expanduser()
    if path.exists():
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
            if not files:
                raise LoopusError(f"--data folder {path} holds no .txt, .jsonl or .parquet files")
            return _local_source(str(data), files)
        if not path.is_file() or path.suffix not in TEXT_SUFFIXES:
            raise LoopusError(
                f"--data {path} is not a .txt, .jsonl or .parquet file; pass such a file or a folder of them"
            )
        return _local_source(str(data), [path])
    if _DATASET_NAME.match(str(data)) and not str(data).endswith(TEXT_SUFFIXES):
        digest = hashlib.sha256(f"dataset:{data}".encode()).hexdigest()
        return Source(str(data), (), str(data), f"sha256:{digest[:16]}")
    raise LoopusError(
        f"--data {data} does not exist; pass a .txt, .jsonl or .parquet file, a folder of them, "
        "or a datasets name"
    )


def _local_source(label: str, files: list[Path]) -> Source:
    resolved = [f.resolve() for f in files]
    stats = []
    for file in resolved:
        info = file.stat()
        stats.append([str(file), info.st_size, info.st_mtime_ns])
    digest = hashlib.sha256(json.dumps(stats).encode()).hexdigest()
    return Source(label, tuple(resolved), None, f"sha256:{digest[:16]}")


class RecordBatch(NamedTuple):
    """Consecutive records of one kind (:data:`loopus_train.records.KINDS`): ``first`` is the number of the
    first one in its source (1-based, for messages); a record is a str (``text``), a list of role/content
    dicts (``chat``), a (prompt, completion) pair or an (input_ids, labels) pair (``tokens``)."""

    kind: str
    first: int
    records: list


def record_batches(source: Source) -> Iterator[RecordBatch]:
    """The records of ``source`` in a fixed order (blank texts left out), in batches of about
    :data:`BATCH_CHARS` characters (or :data:`BATCH_DOCUMENTS` records); every record of a source must be of
    one kind (a one-line error otherwise)."""
    batch: list = []
    size, kind, first, number = 0, None, 1, 0
    for record_kind, record in _records(source):
        if kind is not None and record_kind != kind:
            raise LoopusError(
                f"--data {source.label} mixes {kind} records with {record_kind} records; use one kind of "
                "record (text, messages, prompt/completion or input_ids/labels) per data set"
            )
        kind = record_kind
        number += 1
        if kind == "text" and not record.strip():
            continue
        if not batch:
            first = number
        batch.append(record)
        size += _record_size(kind, record)
        if size >= BATCH_CHARS or len(batch) >= BATCH_DOCUMENTS:
            yield RecordBatch(kind, first, batch)
            batch, size = [], 0
    if batch:
        yield RecordBatch(kind, first, batch)


def _record_size(kind: str, record) -> int:
    """About how many characters a record holds (tokens count as 4)."""
    if kind == "text":
        return len(record)
    if kind == "chat":
        return sum(len(m["content"]) for m in record)
    if kind == "completion":
        return len(record[0]) + len(record[1])
    return 4 * len(record[0])


def _records(source: Source) -> Iterator[tuple[str, object]]:
    if source.dataset is not None:
        yield from _checked_records(_stream_dataset(source.dataset), source.label)
        return
    for file in source.files:
        if file.suffix == ".txt":
            yield "text", _read_text(file)
        else:
            yield from _checked_records(_stream_file(file), str(file))


def _datasets():
    try:
        import datasets  # optional (loopus[train]), and slow to import
    except ImportError:
        raise LoopusError(
            "reading training text needs the datasets library: `pip install 'loopus[train]'` "
            "(or `pip install datasets`)"
        ) from None
    datasets.disable_progress_bars()
    return datasets


def _stream_file(path: Path) -> Iterator[dict]:
    """Record batches (column dicts) of one JSONL or Parquet file, streamed."""
    datasets = _datasets()
    try:
        stream = datasets.load_dataset(
            _BUILDERS[path.suffix], data_files=[str(path)], split="train", streaming=True
        )
        yield from stream.iter(batch_size=1024)
    except LoopusError:
        raise
    except Exception as exc:  # pyarrow's parse errors and the like: the file's problem, the user's to fix
        if "surrogate" in str(exc).lower():  # a lone \ud800-style escape: valid JSON, no UTF-8 form
            raise LoopusError(
                f"--data {path} holds a lone surrogate (a \\uD800-\\uDFFF escape without its pair); pass "
                "valid UTF-8 text"
            ) from None
        kind = (
            "JSON lines (one object with a 'text' field per line)" if path.suffix == ".jsonl" else "Parquet"
        )
        raise LoopusError(f"--data {path} cannot be read as {kind} ({first_line(exc)})") from None


def _stream_dataset(name: str) -> Iterator[dict]:
    """Record batches of the ``train`` split of a datasets dataset ``name[:config]``, streamed."""
    try:
        datasets = _datasets()
    except LoopusError:
        raise LoopusError(
            f"--data {name} is not a local file or folder, and the datasets library needed to load it as "
            "a dataset is not installed: `pip install 'loopus[train]'`, or pass a .txt/.jsonl file or folder"
        ) from None
    dataset_name, _, config = name.partition(":")
    try:
        stream = datasets.load_dataset(dataset_name, config or None, split="train", streaming=True)
        yield from stream.iter(batch_size=1024)
    except Exception as exc:  # network, missing dataset, missing config: all the user's to fix
        raise LoopusError(
            f"--data {name}: the datasets library cannot load it as a dataset ({first_line(exc)}); "
            "check the name and the network, or pass a local .txt/.jsonl file or folder"
        ) from None


_RECORD_SHAPES = (
    '{"text": "..."}, {"messages": [{"role": "user", "content": "..."}, ...]}, '
    '{"prompt": "...", "completion": "..."} or {"input_ids": [...], "labels": [...]}'
)


def record_kind(fields, label: str) -> str:
    """The kind of records whose fields are ``fields``: tokens, chat, completion or text (in that order of
    precedence); a one-line error when they fit none."""
    fields = set(fields)
    if "input_ids" in fields:
        if "labels" not in fields:
            raise LoopusError(
                f"--data {label} has input_ids but no labels field; pre-tokenised records need both "
                "(labels: the same length, -100 where unsupervised)"
            )
        return "tokens"
    if "messages" in fields:
        return "chat"
    if "prompt" in fields or "completion" in fields:
        if not {"prompt", "completion"} <= fields:
            raise LoopusError(
                f"--data {label} has prompt or completion but not both; each record must be {_RECORD_SHAPES}"
            )
        return "completion"
    if "text" in fields:
        return "text"
    raise LoopusError(
        f"--data {label} has no text, messages, prompt/completion or input_ids/labels fields (fields: "
        f"{', '.join(sorted(fields))}); each record must be {_RECORD_SHAPES}"
    )


def _checked_records(batches: Iterator[dict], label: str) -> Iterator[tuple[str, object]]:
    """(kind, record) of each record of the column batches; a missing or mistyped field is a LoopusError."""
    record = 0
    for batch in batches:
        kind = record_kind(batch, label)
        columns = {"text": ("text",), "chat": ("messages",), "completion": ("prompt", "completion")}.get(
            kind, ("input_ids", "labels")
        )
        for values in zip(*(batch[c] for c in columns), strict=True):
            record += 1
            yield kind, _checked_record(kind, values, f"--data {label} record {record}")


def _checked_record(kind: str, values: tuple, where: str):
    """One record of ``kind`` from its column values, checked."""
    if kind == "chat":
        return _checked_messages(values[0], where)
    if kind == "tokens":
        ids, labels = values
        if not _int_list(ids) or not _int_list(labels):
            raise LoopusError(
                f"{where}: input_ids and labels must be lists of integers (labels -100 where unsupervised)"
            )
        return list(ids), list(labels)
    names = ("text",) if kind == "text" else ("prompt", "completion")
    for name, value in zip(names, values, strict=True):
        if not isinstance(value, str):
            raise LoopusError(f"{where} has no string '{name}' field; each record must be {_RECORD_SHAPES}")
    return check_text(values[0], where) if kind == "text" else values


def _int_list(value) -> bool:
    return isinstance(value, (list, tuple)) and all(type(x) is int for x in value)


def _checked_messages(messages, where: str) -> list[dict]:
    """A conversation: a non-empty list of {"role": str, "content": str} turns."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise LoopusError(f"{where}: messages must be a non-empty list of role/content turns")
    turns = []
    for n, turn in enumerate(messages, 1):
        role = turn.get("role") if isinstance(turn, dict) else None
        content = turn.get("content") if isinstance(turn, dict) else None
        if not isinstance(role, str) or not isinstance(content, str):
            missing = "role" if not isinstance(role, str) else "content"
            raise LoopusError(
                f"{where}: messages entry {n} has no string '{missing}'; each turn must look like "
                '{"role": "user", "content": "..."}'
            )
        turns.append({"role": role, "content": content})
    return turns

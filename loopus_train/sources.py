"""Training data, described without reading it, then streamed in batches of records.

A source (``--data``) is:

* None: the built-in corpus (:data:`loopus_core.texts.BUILTIN_CORPUS`, a JSONL file); ``builtin:chat``:
  the shipped chat set (:data:`BUILTIN_CHAT`, conversations written for this project, see its PROVENANCE.md);
* a ``.txt`` file (one document), a ``.jsonl`` file (one record per line), a ``.parquet`` file (one record
  per row), or a folder holding such files (every one below it, in sorted path order);
* the name of a ``datasets`` dataset (``name`` or ``org/name``, optionally ``:config``): its ``train`` split,
  read with ``streaming=True`` (nothing is downloaded whole; needs the hub).

A record is plain text (a ``text`` field), a conversation (``messages``, or ShareGPT's ``conversations``:
a list of ``role``/``content`` turns, or ``from``/``value``), a prompt/completion pair (``prompt`` and
``completion``) or pre-tokenised ids with their labels (``input_ids`` and ``labels``);
:mod:`loopus_train.records` turns each kind into tokens and labels. One source holds one kind (a mix is a
one-line error naming both kinds and where the second starts). Conversation roles are ``system``, ``user``,
``assistant`` and ``tool``, in any case, with the usual aliases (:data:`ROLE_ALIASES`: ShareGPT's ``human``
and ``gpt``, ``bot``, ``model``); the assistant turns are the supervised ones, and any other role is a
one-line error.

Local paths are literal (no glob patterns): a JSONL file is read line by line with :mod:`json` (errors name
the 1-based line), a Parquet file in row batches with pyarrow, so memory does not grow with the file; a
``.txt`` file is one document and is read whole. Only dataset names go through ``datasets`` (streamed).
:func:`describe_source` checks a source and fingerprints its content cheaply (each file's name within the
source, size, and sha256 of its first and last 64 KiB): the first half of the token-shard cache key;
:meth:`Source.content_digest` hashes every byte, the check that a cache entry found by that key holds this
very text. Every problem a user can cause is a one-line :class:`~loopus_core.errors.LoopusError`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
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
BUILTIN_CHAT = Path(__file__).with_name("chat_set") / "chat_set.jsonl"
BATCH_CHARS = 1 << 20  # a batch of records holds about this many characters (the tokenising unit)
BATCH_DOCUMENTS = 4096


@dataclass(frozen=True)
class Source:
    """A checked text source: what the user passed, its files (or dataset name) and its fingerprint."""

    label: str  # for messages: the path or name as given, or "the built-in corpus"
    files: tuple[Path, ...]  # local files in reading order (empty for a dataset name)
    dataset: str | None  # ``name[:config]`` of a datasets dataset, else None
    fingerprint: str  # sha256 of the files' names, sizes, heads and tails (or the dataset name), and limit
    limit: int | None = None  # tokens to take at most (whole documents), None: all
    names: tuple[str, ...] = ()  # each file's name within the source (a folder's relative path, else suffix)

    @property
    def slug(self) -> str:
        """A short, file-system-safe name for cache directories."""
        stem = self.dataset or (self.files[0].stem if len(self.files) == 1 else Path(self.label).name)
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)[:40] or "data"

    def content_digest(self) -> str | None:
        """sha256 over every file's name within the source and the sha256 of all its bytes (None for a
        dataset name, whose content cannot be read ahead)."""
        if self.dataset is not None:
            return None
        parts = [[name, _sha256_of(file)] for name, file in zip(self.names, self.files, strict=True)]
        return "sha256:" + hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


def describe_source(data: str | Path | None, limit: int | None = None) -> Source:
    """Check ``data`` (see the module docstring) and fingerprint it from each file's name, size, head and
    tail (no whole file is read); ``limit``: take only the documents up to that many tokens (part of the
    fingerprint)."""
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
            return _local_source(str(data), files, path)
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


_PEEK = 1 << 16  # bytes of a file's head and of its tail in the cheap content key
_HASH_CHUNK = 8 << 20


def _local_source(label: str, files: list[Path], root: Path | None = None) -> Source:
    """A source of local ``files``; ``root``: the folder they were found in (their names are relative to
    it), None for a single file (its name is its suffix: the same bytes as .txt and .jsonl differ)."""
    names = [str(f.relative_to(root)) if root is not None else f.suffix for f in files]
    keys = [_head_tail_key(file, name) for file, name in zip(files, names, strict=True)]
    digest = hashlib.sha256(json.dumps(keys).encode()).hexdigest()
    resolved = tuple(f.resolve() for f in files)
    return Source(label, resolved, None, f"sha256:{digest[:16]}", names=tuple(names))


def _opened(path: Path):
    try:
        return path.open("rb")
    except OSError as exc:
        raise LoopusError(
            f"cannot read {path} ({exc.strerror}); check the path and its permissions"
        ) from None


def _head_tail_key(path: Path, name: str) -> list:
    """[name, size, sha256 of the first and the last 64 KiB]: a cheap key of a file's content."""
    digest = hashlib.sha256()
    with _opened(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        digest.update(handle.read(_PEEK))
        if size > _PEEK:
            handle.seek(max(_PEEK, size - _PEEK))
            digest.update(handle.read(_PEEK))
    return [name, size, digest.hexdigest()]


def _sha256_of(path: Path) -> str:
    """sha256 of every byte of ``path``."""
    digest = hashlib.sha256()
    with _opened(path) as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class RecordBatch(NamedTuple):
    """Consecutive records of one kind (:data:`loopus_train.records.KINDS`): ``first`` is the number of the
    first one in its source (1-based, for messages); a record is a str (``text``), a list of role/content
    dicts (``chat``), a (prompt, completion) pair or an (input_ids, labels) pair (``tokens``)."""

    kind: str
    first: int
    records: list


_KIND_NAMES = {
    "text": "text",
    "chat": "messages (chat)",
    "completion": "prompt/completion",
    "tokens": "input_ids/labels",
}


def record_batches(source: Source) -> Iterator[RecordBatch]:
    """The records of ``source`` in a fixed order (blank texts left out), in batches of about
    :data:`BATCH_CHARS` characters (or :data:`BATCH_DOCUMENTS` records); every record of a source must be of
    one kind (a one-line error naming the mix otherwise)."""
    batch: list = []
    size, kind, first, number = 0, None, 1, 0
    for record_kind, record in _records(source):
        number += 1
        if kind is not None and record_kind != kind:
            raise LoopusError(
                f"--data {source.label} mixes record kinds: {_KIND_NAMES[kind]} records from record 1, "
                f"then a {_KIND_NAMES[record_kind]} record at record {number}; use one kind of record (text, "
                "messages, prompt/completion or input_ids/labels) per data set"
            )
        kind = record_kind
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
        elif file.suffix == ".jsonl":
            yield from _checked_records(_jsonl_rows(file), str(file))
        else:
            yield from _checked_records(_parquet_rows(file), str(file))


def _jsonl_rows(path: Path) -> Iterator[dict]:
    """The JSON object of each non-blank line of ``path``, read line by line (the path taken literally); a
    line that is not UTF-8, not JSON or not an object is a one-line error naming its 1-based number."""
    shape = f"each line must be one JSON object: {_RECORD_SHAPES}"
    with _opened(path) as handle:
        for number, raw in enumerate(handle, 1):
            where = f"--data {path} line {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise LoopusError(
                    f"{where} is not valid UTF-8 (byte {exc.start}); convert it to UTF-8"
                ) from None
            line = line.lstrip("\ufeff") if number == 1 else line  # a byte-order mark
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise LoopusError(f"{where} is not JSON ({exc.msg}, column {exc.colno}); {shape}") from None
            except RecursionError:
                raise LoopusError(f"{where} nests JSON too deeply to read; {shape}") from None
            if not isinstance(row, dict):
                raise LoopusError(f"{where} is a JSON {type(row).__name__}, not an object; {shape}")
            yield row


def _parquet_rows(path: Path) -> Iterator[dict]:
    """The rows of a Parquet file (the path taken literally), read in batches by pyarrow."""
    try:
        import pyarrow.parquet as pq  # installed with datasets (loopus[train])
    except ImportError:
        raise LoopusError(
            f"--data {path}: reading Parquet needs pyarrow: `pip install 'loopus[train]'`"
        ) from None
    with _opened(path) as handle:
        try:
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=1024):
                yield from batch.to_pylist()
        except LoopusError:
            raise
        except Exception as exc:  # pyarrow's errors: the file's problem, the user's to fix
            raise LoopusError(f"--data {path} cannot be read as Parquet ({first_line(exc)})") from None


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


def _stream_dataset(name: str) -> Iterator[dict]:
    """The rows of the ``train`` split of a datasets dataset ``name[:config]``, streamed."""
    try:
        datasets = _datasets()
    except LoopusError:
        raise LoopusError(
            f"--data {name} is not a local file or folder, and the datasets library needed to load it as "
            "a dataset is not installed: `pip install 'loopus[train]'`, or pass a .txt/.jsonl file or folder"
        ) from None
    dataset_name, _, config = name.partition(":")
    try:
        yield from datasets.load_dataset(dataset_name, config or None, split="train", streaming=True)
    except Exception as exc:  # network, missing dataset, missing config: all the user's to fix
        raise LoopusError(
            f"--data {name}: the datasets library cannot load it as a dataset ({first_line(exc)}); "
            "check the name and the network, or pass a local .txt/.jsonl file or folder"
        ) from None


_RECORD_SHAPES = (
    '{"text": "..."}, {"messages": [{"role": "user", "content": "..."}, ...]}, '
    '{"prompt": "...", "completion": "..."} or {"input_ids": [...], "labels": [...]}'
)
_CHAT_FIELDS = ("messages", "conversations")  # the second: ShareGPT's


def record_kind(fields, where: str) -> str:
    """The kind of a record whose (non-null) fields are ``fields``: tokens, chat, completion or text (in
    that order of precedence); a one-line error naming ``where`` when they fit none."""
    fields = set(fields)
    if "input_ids" in fields:
        if "labels" not in fields:
            raise LoopusError(
                f"{where} has input_ids but no labels field; pre-tokenised records need both "
                "(labels: the same length, -100 where unsupervised)"
            )
        return "tokens"
    if fields & set(_CHAT_FIELDS):
        return "chat"
    if "prompt" in fields or "completion" in fields:
        if not {"prompt", "completion"} <= fields:
            raise LoopusError(
                f"{where} has prompt or completion but not both; each record must be {_RECORD_SHAPES}"
            )
        return "completion"
    if "text" in fields:
        return "text"
    raise LoopusError(
        f"{where} has no text, messages, prompt/completion or input_ids/labels fields (fields: "
        f"{', '.join(sorted(fields)) or 'none'}); each record must be {_RECORD_SHAPES}"
    )


def _checked_records(rows: Iterator[dict], label: str) -> Iterator[tuple[str, object]]:
    """(kind, record) of each row (a dict of fields; null fields count as absent), checked: a missing or
    mistyped field is a LoopusError naming the 1-based record."""
    for number, row in enumerate(rows, 1):
        where = f"--data {label} record {number}"
        present = {k: v for k, v in row.items() if v is not None}
        kind = record_kind(present, where)
        yield kind, _checked_record(kind, present, where)


def _checked_record(kind: str, row: dict, where: str):
    """One record of ``kind`` from its fields, checked."""
    if kind == "chat":
        return _checked_messages(next(row[f] for f in _CHAT_FIELDS if f in row), where)
    if kind == "tokens":
        ids, labels = row["input_ids"], row["labels"]
        if not _int_list(ids) or not _int_list(labels):
            raise LoopusError(
                f"{where}: input_ids and labels must be lists of integers (labels -100 where unsupervised)"
            )
        return list(ids), list(labels)
    names = ("text",) if kind == "text" else ("prompt", "completion")
    for name in names:
        if not isinstance(row[name], str):
            raise LoopusError(f"{where} has no string '{name}' field; each record must be {_RECORD_SHAPES}")
        check_text(row[name], where)
    return row["text"] if kind == "text" else (row["prompt"], row["completion"])


def _int_list(value) -> bool:
    return isinstance(value, (list, tuple)) and all(type(x) is int for x in value)


ROLES = ("system", "user", "assistant", "tool")  # what chat templates render; assistant turns are trained
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}


def chat_role(role: str, where: str) -> str:
    """The role a turn's ``role`` (or ShareGPT ``from``) names, in any case and through
    :data:`ROLE_ALIASES`; a one-line error for any other."""
    name = role.strip().lower()
    name = ROLE_ALIASES.get(name, name)
    if name not in ROLES:
        aliases = ", ".join(f"{a} = {r}" for a, r in ROLE_ALIASES.items())
        raise LoopusError(
            f"{where} has role {role!r}; the roles are {', '.join(ROLES)} (any case; also {aliases}) and the "
            "assistant turns are the ones trained on: rename the role"
        )
    return name


def _checked_messages(messages, where: str) -> list[dict]:
    """A conversation: a non-empty list of {"role": str, "content": str} turns (or ShareGPT's
    {"from": str, "value": str}), the roles normalised by :func:`chat_role`."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise LoopusError(f"{where}: messages must be a non-empty list of role/content turns")
    turns = []
    for n, turn in enumerate(messages, 1):
        turn = turn if isinstance(turn, dict) else {}
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if not isinstance(role, str) or not isinstance(content, str):
            missing = "role" if not isinstance(role, str) else "content"
            raise LoopusError(
                f"{where}: messages entry {n} has no string '{missing}'; each turn must look like "
                '{"role": "user", "content": "..."}'
            )
        check_text(content, f"{where} messages entry {n}")
        turns.append({"role": chat_role(role, f"{where}: messages entry {n}"), "content": content})
    return turns

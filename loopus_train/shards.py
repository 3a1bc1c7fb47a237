"""Token shards: a text source tokenised once, in parallel processes, into memory-mappable files.

Format (a directory, written through :func:`loopus_core.outputs.atomic_directory`)::

    manifest.json             format, token dtype, tokenizer and source fingerprints, the source's content
                              hash, totals, every file's size and sha256, and a checksum of all that
    shard-00000.tokens        the token ids of whole documents, raw little-endian uint16 (vocabularies of
                              at most 65,536 ids) or uint32; each document is followed by EOS
    shard-00000.documents     int64: the end offset of each document in the shard's tokens
    shard-00000.labels        int32 per token, only for labelled records (conversations, prompt/completion
                              pairs, pre-tokenised input_ids/labels): the Hugging Face ``labels`` of each
                              token, -100 where unsupervised; the manifest's ``labels`` names the record
                              kind (None: plain text, every next token is a target)

A document (a text, a conversation, a prompt/completion pair, a pre-tokenised record) never spans two shards;
a shard holds at most :data:`SHARD_TOKENS` tokens unless one document is longer. Tokenising: records are read
in batches (:mod:`loopus_train.sources`), encoded (:mod:`loopus_train.records`: text without special tokens
then EOS, conversations through the chat template) by a pool of worker processes (at most twice as many
batches in flight as workers: memory stays flat in the corpus size), and appended in source order with plain
file writes while their sha256 is computed.

The cache (:func:`open_data`): ``$LOOPUS_DATA_CACHE`` (default ``$LOOPUS_CACHE/shards``) holds one shard set
per (source content key, tokenizer fingerprint and chat template). The content key
(:func:`loopus_train.sources.describe_source`) is each file's name within the source, size and the sha256
of its first and last 64 KiB (a dataset name: the name); an entry found by it is used only when the sha256
of every byte of the source (:meth:`~loopus_train.sources.Source.content_digest`, in the manifest) matches
too, so a file rewritten with the same size and modification time (``cp -p``, ``rsync -t``, ``tar x``) is
tokenised again. Opening a shard set checks the manifest's checksum and every file's size and sha256: a
damaged cache entry (or one that is not a directory) is rebuilt, a damaged or foreign shard directory given
as ``--data`` is a one-line error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loopus_core.errors import LoopusError, first_line
from loopus_core.models import cache_root
from loopus_core.outputs import atomic_directory, output_lock
from loopus_core.progress import Progress, ensure
from loopus_train.records import IGNORE, LABEL_DTYPE, check_chat_template, encode_records
from loopus_train.sources import RecordBatch, Source, describe_source, record_batches

log = logging.getLogger(__name__)

FORMAT = "loopus-token-shards/2"  # /2: the manifest carries its checksum and the source's content hash
MANIFEST = "manifest.json"
SHARD_TOKENS = 1 << 28  # tokens per shard file before the next one starts (512 MiB of uint16)
_HASH_CHUNK = 8 << 20


# ------------------------------------------------------------------------------------------ encoding


def token_dtype(tokenizer) -> np.dtype:
    """uint16 when every token id fits (a vocabulary of at most 65,536 entries), else uint32."""
    return np.dtype("<u2") if len(tokenizer) <= 1 << 16 else np.dtype("<u4")


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's full serialisation (vocabulary, merges, normaliser, added tokens) and EOS."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps([type(tokenizer).__name__, tokenizer.eos_token_id, len(tokenizer)])
    return "sha256:" + hashlib.sha256((spec + extra).encode()).hexdigest()[:16]


def chat_template_digest(tokenizer) -> str | None:
    """sha256 of the tokenizer's chat template (None without one): conversations render through it."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    return "sha256:" + hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:16]


_WORKER: dict = {}  # the tokenizer and dtype of a worker process (set once by _init_worker)


def _init_worker(tokenizer, dtype: np.dtype) -> None:
    _WORKER.update(tokenizer=tokenizer, dtype=dtype)


def _encode_in_worker(batch: RecordBatch):
    return encode_records(_WORKER["tokenizer"], batch.kind, batch.records, _WORKER["dtype"], batch.first)


def default_workers() -> int:
    """Tokenising processes when ``--data-workers`` is 0: the CPUs this process may use, at most 16."""
    return max(1, min(16, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))


def encoded_batches(
    tokenizer, batches: Iterable[RecordBatch], dtype: np.dtype, workers: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """:func:`~loopus_train.records.encode_records` of every batch (tokens, lengths, labels or None), in
    order; ``workers`` > 1 encodes in that many processes with at most ``2 * workers`` batches in flight."""
    if workers <= 1:
        for batch in batches:
            yield encode_records(tokenizer, batch.kind, batch.records, dtype, batch.first)
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    pool = ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init_worker, initargs=(tokenizer, dtype)
    )
    pending: deque = deque()
    try:
        for batch in batches:
            pending.append(pool.submit(_encode_in_worker, batch))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------------------------------ writing


class _HashedFile:
    """A file opened for appending whose sha256 and size are kept as it is written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handle = path.open("wb")
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, array: np.ndarray) -> None:
        data = memoryview(np.ascontiguousarray(array)).cast("B")
        self.handle.write(data)
        self.sha.update(data)
        self.size += data.nbytes

    def close(self) -> dict:
        self.handle.close()
        return {"file": self.path.name, "bytes": self.size, "sha256": self.sha.hexdigest()}


class ShardWriter:
    """Appends whole documents to ``shard-NNNNN.tokens`` / ``.documents`` (and ``.labels``) files, starting a
    new shard when the next document would pass ``shard_tokens``."""

    def __init__(self, directory: Path, dtype: np.dtype, shard_tokens: int = SHARD_TOKENS) -> None:
        self.directory, self.dtype, self.max_tokens = directory, dtype, shard_tokens
        self.shards: list[dict] = []
        self._tokens: _HashedFile | None = None
        self._documents: _HashedFile | None = None
        self._labels: _HashedFile | None = None
        self.labelled: bool | None = None  # whether the documents carry labels (set by the first add)
        self._count = 0  # tokens in the open shard
        self._docs = 0
        self.total = 0  # tokens written in all shards

    def add(self, tokens: np.ndarray, lengths: np.ndarray, labels: np.ndarray | None = None) -> None:
        """Append documents: ``tokens`` (and ``labels``, one per token) concatenated, ``lengths`` per
        document; every call labels its documents or none does."""
        if self.labelled is None:
            self.labelled = labels is not None
        if self.labelled != (labels is not None):
            raise ValueError("a shard set holds labelled documents or unlabelled ones, not both")
        ends = np.cumsum(lengths)  # end of each document within ``tokens``
        start = 0  # the first document not yet written
        while start < len(lengths):
            base = int(ends[start - 1]) if start else 0
            fit = int(np.searchsorted(ends[start:] - base, self.max_tokens - self._count, side="right"))
            if fit == 0 and self._count:  # the next document does not fit: it starts the next shard
                self._close_shard()
                continue
            stop = start + max(fit, 1)  # an empty shard takes an over-long document alone
            if self._tokens is None:
                self._open_shard()
            self._tokens.write(tokens[base : ends[stop - 1]])
            if labels is not None:
                self._labels.write(labels[base : ends[stop - 1]].astype(LABEL_DTYPE, copy=False))
            self._documents.write(ends[start:stop] - base + self._count)
            self._count += int(ends[stop - 1]) - base
            self.total += int(ends[stop - 1]) - base
            self._docs += stop - start
            start = stop

    def _open_shard(self) -> None:
        name = f"shard-{len(self.shards):05d}"
        self._tokens = _HashedFile(self.directory / f"{name}.tokens")
        self._documents = _HashedFile(self.directory / f"{name}.documents")
        if self.labelled:
            self._labels = _HashedFile(self.directory / f"{name}.labels")

    def _close_shard(self) -> None:
        if self._tokens is None:
            return
        tokens, documents = self._tokens.close(), self._documents.close()
        entry = {
            "tokens": tokens,
            "documents": documents,
            "num_tokens": self._count,
            "num_documents": self._docs,
        }
        if self._labels is not None:
            entry["labels"] = self._labels.close()
        self.shards.append(entry)
        self._tokens = self._documents = self._labels = None
        self._count = self._docs = 0

    def finish(self) -> list[dict]:
        self._close_shard()
        return self.shards


@dataclass
class PrepareReport:
    """What :func:`prepare_shards` wrote."""

    path: Path
    num_documents: int
    num_tokens: int
    shard_bytes: list[int]
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / max(self.seconds, 1e-9)


def _checked_batches(
    batches: Iterator[RecordBatch], tokenizer, label: str, kinds: list[str]
) -> Iterator[RecordBatch]:
    """The batches, after checking (in this process) that conversations have a chat template to render
    them; the record kind is appended to ``kinds``."""
    for batch in batches:
        if not kinds:
            kinds.append(batch.kind)
            if batch.kind == "chat":
                check_chat_template(tokenizer, label)
        yield batch


def _checksum(body: dict) -> str:
    """sha256 of a manifest without its ``checksum`` entry (keys sorted)."""
    text = json.dumps({k: v for k, v in body.items() if k != "checksum"}, sort_keys=True)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _manifest(
    tokenizer,
    source: Source,
    content: str | None,
    dtype: np.dtype,
    shards: list[dict],
    kind: str,
    seconds: float,
):
    """The manifest of a shard set (see the module docstring), with its checksum."""
    manifest = {
        "format": FORMAT,
        "dtype": dtype.str,
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "tokenizer": {
            "name": str(getattr(tokenizer, "name_or_path", "")),
            "fingerprint": tokenizer_fingerprint(tokenizer),
            "chat_template": chat_template_digest(tokenizer) if kind == "chat" else None,
        },
        "source": {
            "label": source.label,
            "fingerprint": source.fingerprint,
            "content": content,
            "limit": source.limit,
        },
        "num_tokens": sum(s["num_tokens"] for s in shards),
        "num_documents": sum(s["num_documents"] for s in shards),
        "shards": shards,
        "labels": None if kind == "text" else {"kind": kind, "dtype": LABEL_DTYPE.str},
        "seconds": round(seconds, 3),
    }
    return {**manifest, "checksum": _checksum(manifest)}


def prepare_shards(
    source: Source,
    tokenizer,
    out: Path,
    *,
    workers: int = 0,
    existing: str = "error",
    progress: Progress | None = None,
    shard_tokens: int = SHARD_TOKENS,
) -> PrepareReport:
    """Tokenise ``source`` into a shard directory ``out`` (format in the module docstring); a source with a
    token limit stops after the document that reaches it.

    ``workers`` tokenising processes (0: :func:`default_workers`); ``existing`` as for
    :func:`~loopus_core.outputs.atomic_directory`. Raises LoopusError when the source holds no text, or
    holds conversations and the tokenizer has no chat template.
    """
    dtype = token_dtype(tokenizer)
    began = time.perf_counter()
    content = source.content_digest()  # before reading: a file changed meanwhile is found stale next time
    kinds: list[str] = []
    with atomic_directory(out, existing=existing, label="the token shards") as tmp:
        writer = ShardWriter(tmp, dtype, shard_tokens)
        with ensure(progress).task(f"tokenising {source.label}", None) as advance:
            batches = _checked_batches(record_batches(source), tokenizer, source.label, kinds)
            for tokens, lengths, labels in encoded_batches(
                tokenizer, batches, dtype, workers or default_workers()
            ):
                stop = len(lengths)
                if source.limit is not None:  # whole documents up to the one that reaches the limit
                    stop = min(
                        stop, int(np.searchsorted(np.cumsum(lengths), source.limit - writer.total)) + 1
                    )
                n = int(lengths[:stop].sum())
                writer.add(tokens[:n], lengths[:stop], None if labels is None else labels[:n])
                advance(n)
                if source.limit is not None and writer.total >= source.limit:
                    break
        shards = writer.finish()
        if not shards:
            raise LoopusError(
                f"--data {source.label} holds no text; pass a file or folder with some text in it"
            )
        seconds = time.perf_counter() - began
        manifest = _manifest(tokenizer, source, content, dtype, shards, kinds[0], seconds)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    report = PrepareReport(
        out,
        manifest["num_documents"],
        manifest["num_tokens"],
        [s["tokens"]["bytes"] for s in shards],
        seconds,
    )
    log.info(
        "%s: %d documents, %d tokens in %d shard(s), %.0f tokens/s",
        source.label,
        report.num_documents,
        report.num_tokens,
        len(shards),
        report.tokens_per_s,
    )
    return report


# ------------------------------------------------------------------------------------------ reading


class ShardError(LoopusError):
    """A shard set that is missing files, truncated, altered or not a shard set at all."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _checked(directory: Path, entry: dict, label: str) -> Path:
    """The file of a manifest entry, after checking its size and sha256 (ShardError otherwise)."""
    path = directory / entry["file"]
    redo = "prepare the data again (loopus prepare-data)"
    if not path.is_file():
        raise ShardError(f"{label}: {path.name} is missing; {redo}")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise ShardError(
            f"{label}: {path.name} is truncated or altered ({size} bytes, the manifest says "
            f"{entry['bytes']}); {redo}"
        )
    if _sha256(path) != entry["sha256"]:
        raise ShardError(f"{label}: {path.name} is altered (its sha256 differs from the manifest's); {redo}")
    return path


class TokenShards:
    """An opened, checked shard set: a read-only memory map of each shard's tokens and document ends.

    Documents are numbered globally in source order: shard ``s`` holds documents ``doc_base[s]`` to
    ``doc_base[s + 1] - 1``; document ``j`` of shard ``s`` spans ``tokens[s][ends[s][j-1]:ends[s][j]]``;
    ``labels[s]`` (labelled records only, else ``labels`` is None) lies beside ``tokens[s]``.
    """

    def __init__(
        self,
        path: Path,
        manifest: dict,
        tokens: list[np.ndarray],
        ends: list[np.ndarray],
        labels: list[np.ndarray] | None = None,
    ) -> None:
        self.path, self.manifest, self.tokens, self.ends, self.labels = path, manifest, tokens, ends, labels
        counts = [len(e) for e in ends]
        self.doc_base = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    @classmethod
    def open(cls, path: Path, label: str) -> TokenShards:
        """Read the manifest, check its checksum and every file's size and sha256 (ShardError on any
        mismatch, or on a manifest that is not one)."""
        redo = "prepare the data again (loopus prepare-data)"
        try:
            manifest = json.loads((path / MANIFEST).read_text())
            if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
                found = manifest.get("format") if isinstance(manifest, dict) else None
                raise ValueError(f"format {found!r}, expected {FORMAT}")
            if manifest.get("checksum") != _checksum(manifest):
                raise ShardError(f"{label}: {MANIFEST} is altered (its checksum does not match); {redo}")
            dtype = np.dtype(manifest["dtype"])
            tokens, ends, labels = [], [], []
            for shard in manifest["shards"]:
                tokens.append(np.memmap(_checked(path, shard["tokens"], label), dtype=dtype, mode="r"))
                ends.append(np.memmap(_checked(path, shard["documents"], label), dtype=np.int64, mode="r"))
                if manifest.get("labels"):
                    checked = _checked(path, shard["labels"], label)
                    labels.append(np.memmap(checked, dtype=LABEL_DTYPE, mode="r"))
        except ShardError:
            raise
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
            raise ShardError(
                f"{label}: {path / MANIFEST} is not a token-shard manifest of this loopus "
                f"({first_line(exc)}); {redo}"
            ) from None
        return cls(path, manifest, tokens, ends, labels if manifest.get("labels") else None)

    def max_token_id(self) -> int:
        """The largest id among the tokens and the labels (-1 when there are none): the model's embedding
        must have more rows than that."""
        arrays = [*self.tokens, *(self.labels or [])]
        return max((int(np.max(a)) for a in arrays if len(a)), default=-1)

    def supervised_tokens(self) -> int:
        """How many tokens carry a label (all of them for plain text)."""
        if self.labels is None:
            return self.num_tokens
        return int(sum(int((np.asarray(x) != IGNORE).sum()) for x in self.labels))

    @property
    def kind(self) -> str:
        """The record kind: text (no labels), chat, completion or tokens."""
        return (self.manifest.get("labels") or {}).get("kind", "text")

    @property
    def num_documents(self) -> int:
        return int(self.doc_base[-1])

    @property
    def num_tokens(self) -> int:
        return int(self.manifest["num_tokens"])

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.manifest["tokenizer"]["fingerprint"]

    @property
    def digest(self) -> str:
        """The content identity: sha256 over every file's sha256."""
        sums = [
            [
                s["tokens"]["sha256"],
                s["documents"]["sha256"],
                *([s["labels"]["sha256"]] if "labels" in s else []),
            ]
            for s in self.manifest["shards"]
        ]
        return "sha256:" + hashlib.sha256(json.dumps(sums).encode()).hexdigest()[:16]

    def shard_sizes(self) -> list[int]:
        return [s["tokens"]["bytes"] for s in self.manifest["shards"]]


def cache_dir() -> Path:
    """Where prepared shards are cached: ``$LOOPUS_DATA_CACHE``, or ``$LOOPUS_CACHE/shards``."""
    return Path(os.environ.get("LOOPUS_DATA_CACHE") or cache_root() / "shards")


def cache_entry(source: Source, tokenizer) -> Path:
    """The cache directory of (source, tokenizer): ``<slug>-<sha256 of both fingerprints and the chat
    template>``."""
    parts = [FORMAT, source.fingerprint, tokenizer_fingerprint(tokenizer)]
    template = chat_template_digest(tokenizer)  # conversations render through it
    key = json.dumps(parts if template is None else [*parts, template])
    return cache_dir() / f"{source.slug}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def is_shard_dir(data: str | Path | None) -> bool:
    """Whether ``--data`` names a prepared shard directory (one holding a manifest.json)."""
    return data is not None and (Path(data).expanduser() / MANIFEST).is_file()


def _foreign_tokenizer(shards: TokenShards, tokenizer) -> str | None:
    """Why ``shards`` cannot serve ``tokenizer`` (another tokenizer, or conversations rendered with another
    chat template), None when they can."""
    ours = tokenizer_fingerprint(tokenizer)
    if shards.tokenizer_fingerprint != ours:
        theirs = f"{shards.manifest['tokenizer']['name']}, {shards.tokenizer_fingerprint}"
        return f"tokenised with another tokenizer ({theirs}) than this checkpoint's ({ours})"
    if shards.kind == "chat" and shards.manifest["tokenizer"].get("chat_template") != chat_template_digest(
        tokenizer
    ):
        return "holds conversations rendered with another chat template than this checkpoint's"
    return None


def _stale(shards: TokenShards, source: Source, tokenizer) -> str | None:
    """Why ``shards`` are not the tokens of ``source`` under ``tokenizer`` (None: they are): another
    tokenizer, another source key or token limit, or other bytes under the same key."""
    foreign = _foreign_tokenizer(shards, tokenizer)
    if foreign:
        return foreign
    made = shards.manifest["source"]
    if made["fingerprint"] != source.fingerprint or made["limit"] != source.limit:
        return "tokenised from other text or with another --max-tokens"
    if made["content"] != source.content_digest():
        return f"{source.label} changed since it was tokenised (the sha256 of its bytes differs)"
    return None


def _cached(entry: Path, source: Source, tokenizer, label: str) -> TokenShards | None:
    """The shards of a cache entry when they are intact and of this very text; None, after a warning (and
    after removing a file that stands where the directory belongs), when they must be made again."""
    if os.path.lexists(entry) and not entry.is_dir():
        log.warning("%s: %s is not a directory; removing it and tokenising again", label, entry)
        entry.unlink()
        return None
    if not entry.is_dir():
        return None
    try:
        shards = TokenShards.open(entry, label)
    except ShardError as exc:
        log.warning("%s: tokenising it again", exc)
        return None
    stale = _stale(shards, source, tokenizer)
    if stale:
        log.warning("%s: %s; tokenising it again", label, stale)
        return None
    return shards


def open_data(
    tokenizer, data: str | Path | None, *, workers: int = 0, progress: Progress | None = None
) -> TokenShards:
    """The token shards of ``data`` for ``tokenizer``.

    A shard directory given as ``--data`` is checked (intact, and tokenised by this tokenizer: a one-line
    error otherwise). A text source is looked up in the cache (by its content, see the module docstring);
    it is tokenised on first use, and again when its cache entry is damaged or stale.
    """
    if is_shard_dir(data):
        shards = TokenShards.open(Path(data).expanduser(), f"--data {data}")
        foreign = _foreign_tokenizer(shards, tokenizer)
        if foreign:
            raise LoopusError(
                f"--data {data}: {foreign}; prepare the text again with it: "
                "loopus prepare-data SOURCE --tokenizer CKPT"
            )
        return shards
    source = describe_source(data)
    entry = cache_entry(source, tokenizer)
    label = f"the cached shards of {source.label}"
    # a concurrent preparer of the same entry (another rank, another run) holds its lock: wait, then reuse
    with output_lock(entry, label, wait=True):
        shards = _cached(entry, source, tokenizer, label)
        if shards is not None:
            return shards
        prepare_shards(source, tokenizer, entry, workers=workers, existing="replace", progress=progress)
    return TokenShards.open(entry, label)


def load_tokenizer(path: str | Path):
    """The tokenizer of a model or looped checkpoint directory (or hub id); a one-line error otherwise."""
    from transformers import AutoTokenizer  # slow to import

    local = Path(path).expanduser()
    try:
        return AutoTokenizer.from_pretrained(str(local) if local.exists() else str(path))
    except Exception as exc:  # a missing or foreign directory: the user's to fix
        raise LoopusError(
            f"--tokenizer {path}: no tokenizer can be loaded from it ({type(exc).__name__}); "
            "pass a model or looped checkpoint directory"
        ) from None


def prepare_data(
    data: str | Path | None,
    tokenizer_path: str | Path,
    *,
    out: str | Path | None = None,
    workers: int = 0,
    max_tokens: int | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> tuple[TokenShards, PrepareReport | None]:
    """``loopus prepare-data``: tokenise ``data`` with the tokenizer at ``tokenizer_path`` into ``out`` (a
    shard directory to pass as ``--data``) or, without ``out``, into the cache that ``loopus finetune`` looks
    in; ``max_tokens`` stops after the document that reaches that many tokens (for a large dataset).
    Returns the shards and what was written (None: the target already held these very shards and ``force``
    is off). Shards of other text in ``out`` need ``force``; one wording for both cases:
    :data:`ALREADY_PREPARED`."""
    tokenizer = load_tokenizer(tokenizer_path)
    source = describe_source(data, max_tokens)
    if out is None:
        target = cache_entry(source, tokenizer)
        label = f"the cached shards of {source.label}"
    else:
        target, label = Path(out).expanduser(), f"--out {out}"
        if target.is_dir() and any(target.iterdir()) and not is_shard_dir(target):
            raise LoopusError(f"--out {target} holds other files; choose a new directory for the shards")
    if not force:
        with output_lock(target, label, wait=out is None):
            shards = (
                _cached(target, source, tokenizer, label)
                if out is None
                else _prepared(target, source, tokenizer)
            )
        if shards is not None:
            return shards, None
    report = prepare_shards(source, tokenizer, target, workers=workers, existing="replace", progress=progress)
    return TokenShards.open(target, str(target)), report


ALREADY_PREPARED = "already prepared (same text and tokenizer); --force tokenises again"


def _prepared(target: Path, source: Source, tokenizer) -> TokenShards | None:
    """The shards in ``--out`` when they are these very shards (None: nothing or an empty directory there);
    shards of other text, another tokenizer or damaged ones are a one-line error."""
    if not is_shard_dir(target):
        return None
    try:
        shards = TokenShards.open(target, f"--out {target}")
        stale = _stale(shards, source, tokenizer)
    except ShardError as exc:
        stale = str(exc)
    if stale is None:
        return shards
    raise LoopusError(f"--out {target} holds other token shards ({stale}); --force tokenises again into it")

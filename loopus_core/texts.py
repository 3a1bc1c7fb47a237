"""Documents to measure or train on: the built-in corpus, local files and folders, or a dataset name.

* ``None``: the built-in corpus (``data/probe_corpus.jsonl``, about 800 documents, 1.1 MB; provenance and
  licences in ``data/PROVENANCE.md``): the Python language reference, standard-library code and docstrings,
  generated arithmetic, and prose and dialogue written for this project.
* a ``.txt`` file (one document), a ``.jsonl`` file (one document per line, its ``text`` field), or a folder
  of such files (every one below it, in sorted path order);
* the name of a dataset of the ``datasets`` library (``name`` or ``org/name``, optionally ``:config``), where
  it is installed and the hub is reachable: its ``train`` split's ``text`` column.

Every user-caused problem is a one-line :class:`~loopus_core.errors.LoopusError`.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from loopus_core.errors import LoopusError, first_line

log = logging.getLogger(__name__)

BUILTIN_CORPUS = Path(__file__).with_name("data") / "probe_corpus.jsonl"
DATA_SUFFIXES = (".txt", ".jsonl")
_DATASET_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?$")


def load_texts(data: str | Path | None) -> list[str]:
    """The documents of ``data`` (see the module docstring), non-empty, in a deterministic order.

    Raises :class:`LoopusError` for a missing path, a binary or non-UTF-8 file, JSONL lines without a string
    ``text`` field, a dataset name that cannot be loaded, and data that holds no text at all.
    """
    if data is None:
        return [json.loads(line)["text"] for line in BUILTIN_CORPUS.read_text(encoding="utf-8").splitlines()]
    path = Path(data).expanduser()
    if path.exists():
        texts = _read_path(path)
    elif _DATASET_NAME.match(str(data)) and not str(data).endswith(DATA_SUFFIXES):
        texts = _read_dataset(str(data))
    else:
        raise LoopusError(
            f"--data {data} does not exist; pass a .txt or .jsonl file, a folder of them, or a datasets name"
        )
    if not texts:
        raise LoopusError(f"--data {data} holds no text; pass a file or folder with some text in it")
    log.info("read %d documents from %s", len(texts), data)
    return texts


def check_text(text: str, where: str) -> str:
    """``text`` if it is valid Unicode that a tokenizer takes, else a one-line LoopusError naming ``where``:
    a lone surrogate (a ``\\ud800`` JSON escape, or bytes that are not UTF-8 in a command-line argument,
    which Python decodes to surrogates) has no UTF-8 form and makes the fast tokenizers raise."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = ord(text[exc.start])
        what = f"byte 0x{bad - 0xDC00:02x}, not UTF-8" if 0xDC80 <= bad <= 0xDCFF else f"U+{bad:04X}"
        raise LoopusError(
            f"{where} holds a lone surrogate at character {exc.start} ({what}); pass valid UTF-8 text"
        ) from None
    return text


def _read_path(path: Path) -> list[str]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES)
        if not files:
            raise LoopusError(f"--data folder {path} holds no .txt or .jsonl files")
        return [text for file in files for text in _read_file(file)]
    if path.suffix not in DATA_SUFFIXES:
        raise LoopusError(f"--data {path} is neither .txt nor .jsonl; pass a .txt or .jsonl file or a folder")
    if not path.is_file():  # a FIFO or a device would block the read or never end
        raise LoopusError(
            f"--data {path} is not a regular file (a pipe or a device); pass a .txt or .jsonl file"
        )
    return _read_file(path)


def _read_file(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    text = _read_text(path)
    return [text] if text.strip() else []


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise LoopusError(
            f"cannot read {path} ({exc.strerror}); check the path and its permissions"
        ) from None
    if b"\x00" in raw:
        raise LoopusError(f"{path} looks binary (it holds NUL bytes); pass a UTF-8 text file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LoopusError(f"{path} is not valid UTF-8 (byte {exc.start}); convert it to UTF-8 text") from None


def _read_jsonl(path: Path) -> list[str]:
    texts: list[str] = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LoopusError(
                f"{path} line {number} is not JSON ({exc.msg}); each line must be one JSON "
                "object with a 'text' field"
            ) from None
        except RecursionError:
            raise LoopusError(
                f"{path} line {number} nests JSON too deeply to read; each line must be one JSON object "
                "with a 'text' field"
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise LoopusError(
                f"{path} line {number} has no string 'text' field; each line must look like "
                '{"text": "..."}'
            )
        if record["text"].strip():
            texts.append(check_text(record["text"], f"{path} line {number}"))
    return texts


def _read_dataset(name: str) -> list[str]:
    """The ``text`` column of the ``train`` split of a ``datasets`` dataset (``name[:config]``)."""
    try:
        import datasets  # optional, and slow to import
    except ImportError:
        raise LoopusError(
            f"--data {name} is not a local file or folder, and the datasets library needed to load it as a "
            "dataset is not installed: `pip install datasets`, or pass a .txt/.jsonl file or folder"
        ) from None
    dataset_name, _, config = name.partition(":")
    try:
        dataset = datasets.load_dataset(dataset_name, config or None, split="train")
    except Exception as exc:  # network, missing dataset, missing config: all the user's to fix
        raise LoopusError(
            f"--data {name}: the datasets library cannot load it as a dataset ({first_line(exc)}); "
            "check the name and the network, "
            "or pass a local .txt/.jsonl file or folder"
        ) from None
    if "text" not in dataset.column_names:
        raise LoopusError(
            f"--data {name} has no 'text' column (columns: {', '.join(dataset.column_names)}); "
            "pass a dataset "
            "with a 'text' column or a local file"
        )
    return [text for text in dataset["text"] if isinstance(text, str) and text.strip()]

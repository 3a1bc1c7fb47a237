"""``loopus analyze``: open the model, measure its layers, choose the split, check it, write the report.

:func:`run_analysis` is the one function the CLI calls. Its steps, each timed in the provenance:

1. validate the flags and the data, and claim the output directory (a temporary directory next to it,
   :func:`loopus_core.runtime.atomic_directory`), so that every user error surfaces before the long work;
2. open the model (:func:`loopus_core.models.open_model`);
3. split the documents into measuring and held-out text, make the token batches (:mod:`.corpus`);
4. one streamed pass over the measuring batches (:func:`loopus_analyze.collect.measure`);
5. the exact split search, bootstrap and curve change points (:mod:`.split`);
6. the functional check of the top candidates and their same-length controls on the held-out text
   (:mod:`.functional`), which re-ranks those candidates, and the confidence (:func:`.split.decide`);
7. ``analysis.json`` + ``report.html`` written into the temporary directory, then moved into place.

Nothing half-written is left behind: on any error the temporary directory (and any parent directory this
run created) is removed, and an existing output directory keeps its previous files.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import logging
import platform
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from loopus_analyze import corpus
from loopus_analyze import functional as functional_mod
from loopus_analyze import split as split_mod
from loopus_analyze.collect import measure
from loopus_analyze.report import SCHEMA_VERSION, dump_json, jsonable, write_report
from loopus_core.checks import MAX_SEED, check_int
from loopus_core.errors import LoopusError
from loopus_core.models import EMBEDDED_DEFAULT_NAME, context_length, open_model
from loopus_core.progress import Progress
from loopus_core.runtime import atomic_directory, resolve_device, resolve_dtype
from loopus_core.texts import load_texts

log = logging.getLogger(__name__)

HELD_OUT_FRACTION = 0.1  # of the documents, for the functional check
FUNCTIONAL_TOKENS = 508  # held-out tokens for the functional check (one batch of 4 x 127)
FUNCTIONAL_BATCH_SIZE = 4
FUNCTIONAL_TOP = 3  # candidates (by similarity) that get the functional check
FUNCTIONAL_CONTROLS = 3  # same-length control blocks per candidate
TOP_CANDIDATES = 6  # the recommendation + five alternatives
BOOTSTRAP_RESAMPLES = 200
OUTPUT_FILES = ("analysis.json", "report.html")


@dataclass
class AnalysisResult:
    """Where the report went and what it recommends."""

    out_dir: Path
    report_path: Path
    json_path: Path
    split: str
    confidence: str
    reason: str
    alternatives: list[dict] = field(default_factory=list)  # rank, split, score, ... (not the recommended)
    convert_command: str = ""
    wall_time_s: dict[str, float] = field(default_factory=dict)


def model_display_name(model: str | None) -> str:
    """The short name used for the default output directory, without opening the model."""
    if model is None:
        return EMBEDDED_DEFAULT_NAME
    path = Path(model).expanduser()
    if path.exists():
        path = path.resolve()
        return path.stem if path.is_file() else path.name
    return model.rstrip("/").split("/")[-1] or "model"


def default_out_dir(model: str | None) -> Path:
    """``reports/<model-name>/`` in the current directory."""
    return Path("reports") / model_display_name(model)


def _check_out(target: Path) -> None:
    """The report files must not be shadowed by directories of the same name in an existing ``--out``."""
    for name in OUTPUT_FILES:
        if (target / name).exists() and not (target / name).is_file():
            raise LoopusError(f"--out {target}: {target / name} is not a file; remove it")


def _validate(tokens: int, seq_len: int, seed: int, dtype: str, device: str) -> None:
    corpus.check_budget(tokens, seq_len)
    check_int(seed, "--seed", 0, MAX_SEED)
    resolve_dtype(dtype)
    resolve_device(device)


def _held_out(texts: list[str], seed: int) -> tuple[list[str], list[str]]:
    """Measuring and held-out documents; a corpus of very few documents is cut inside each document."""
    if len(texts) >= 10:
        return corpus.split_held_out(texts, HELD_OUT_FRACTION, seed)
    heads, tails = [], []
    for text in texts:  # the last ~10% of each document is held out, cut at a whitespace
        cut = int(len(text) * (1 - HELD_OUT_FRACTION))
        space = text.rfind(" ", 0, cut)
        cut = space if space > len(text) // 2 else cut
        heads.append(text[:cut])
        tails.append(text[cut:])
    return heads, [t for t in tails if t.strip()]


def _held_out_batches(tokenizer, texts: list[str], seq_len: int, seed: int):
    """Token batches of held-out text for the functional check, or (None, reason) when there is too little."""
    if not texts:
        return None, "no held-out text"
    for batch_size, length in ((FUNCTIONAL_BATCH_SIZE, seq_len), (1, seq_len), (1, min(seq_len, 32))):
        try:
            tokens = max(FUNCTIONAL_TOKENS, batch_size * (length - 1))
            return corpus.make_batches(
                tokenizer, texts, tokens=tokens, seq_len=length, batch_size=batch_size, seed=seed + 7
            ), None
        except LoopusError as exc:
            reason = str(exc)
    return None, f"too little held-out text ({reason})"


def _versions() -> dict[str, str]:
    import sklearn
    import torch
    import transformers

    return {
        "loopus": _package_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "sklearn": sklearn.__version__,
        "python": platform.python_version(),
    }


def _package_version() -> str:
    """The installed loopus distribution's version (the analyzer never imports the CLI package)."""
    try:
        return importlib.metadata.version("loopus")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def convert_command(model: str | None, split: str, model_name: str) -> str:
    """The ``loopus convert`` command line for this split (shell-quoted)."""
    target = f"looped/{model_name}-loop{split.replace(':', '-')}"
    parts = ["loopus", "convert", *([model] if model is not None else []), "--split", split, "--out", target]
    return " ".join(shlex.quote(p) for p in parts)


def run_analysis(
    model: str | None,
    *,
    out: Path | str | None = None,
    data: str | Path | None = None,
    tokens: int | None = None,
    seq_len: int | None = None,
    seed: int = 0,
    dtype: str = "float32",
    device: str = "auto",
    probes: bool = True,
    progress: Progress | None = None,
) -> AnalysisResult:
    """Analyse ``model`` (path, hub id, ``.gguf`` file, None = the embedded default); write the report.

    Writes ``report.html`` and ``analysis.json`` into ``out`` (default ``reports/<model-name>/``).
    ``tokens`` / ``seq_len`` default to :data:`loopus_analyze.corpus.DEFAULT_TOKENS` / ``DEFAULT_SEQ_LEN``.
    Every user-caused problem is a :class:`LoopusError`, raised before the output directory changes.
    """
    clock = _Clock()
    settings = _Settings(
        data=data,
        tokens=corpus.DEFAULT_TOKENS if tokens is None else int(tokens),
        seq_len=corpus.DEFAULT_SEQ_LEN if seq_len is None else int(seq_len),
        seed=seed,
        dtype=dtype,
        device=device,
        probes=probes,
    )
    _validate(settings.tokens, settings.seq_len, seed, dtype, device)
    texts = load_texts(data)
    target = (Path(out).expanduser() if out is not None else default_out_dir(model)).absolute()
    _check_out(target)
    with atomic_directory(target, existing="merge") as tmp:
        clock.lap("validate")
        opened = open_model(model, dtype=dtype, device=device)
        split_mod.check_layer_count(opened.parts.num_layers)
        context = context_length(opened.model.config)
        check_int(settings.seq_len, "--seq-len", 3, context, why="the model's context")
        clock.lap("open_model")
        measured_texts, held_texts = _held_out(texts, seed)
        batches = corpus.make_batches(
            opened.tokenizer,
            measured_texts,
            tokens=settings.tokens,
            seq_len=settings.seq_len,
            batch_size=corpus.DEFAULT_BATCH_SIZE,
            seed=seed,
        )
        held_batches, skipped = _held_out_batches(opened.tokenizer, held_texts, settings.seq_len, seed)
        clock.lap("tokenize")
        measurements = measure(
            opened.model, opened.tokenizer, batches, probes=probes, progress=progress, seed=seed
        )
        clock.lap("measure")
        decision, search, check = _decide(opened, measurements, held_batches, skipped, seed, clock, progress)
        command = convert_command(model, decision.split, opened.name)
        analysis = _analysis_record(opened, measurements, decision, search, check, skipped, command)
        analysis["provenance"] = _provenance(
            opened, measurements, check, clock.wall, settings, (len(measured_texts), len(held_texts))
        )
        write_report(jsonable(analysis), tmp)
        clock.lap("report")
        clock.wall["total"] = clock.total()
        # the JSON again, now with the report's and the total wall time (the HTML shows the earlier steps)
        (tmp / "analysis.json").write_text(dump_json(analysis), encoding="utf-8")
    log.info(
        "recommended split %s (%s confidence); report in %s", decision.split, decision.confidence, target
    )
    return AnalysisResult(
        out_dir=target,
        report_path=target / "report.html",
        json_path=target / "analysis.json",
        split=decision.split,
        confidence=decision.confidence,
        reason=decision.reason,
        alternatives=_alternatives(decision),
        convert_command=command,
        wall_time_s=clock.wall,
    )


@dataclass(frozen=True)
class _Settings:
    """The settings of one analysis, as the provenance records them."""

    data: str | Path | None
    tokens: int
    seq_len: int
    seed: int
    dtype: str
    device: str
    probes: bool


class _Clock:
    """Wall time of each step, for the provenance."""

    def __init__(self) -> None:
        self.started = self.last = time.perf_counter()
        self.wall: dict[str, float] = {}

    def lap(self, step: str) -> None:
        now = time.perf_counter()
        self.wall[step] = round(now - self.last, 3)
        self.last = now

    def total(self) -> float:
        return round(time.perf_counter() - self.started, 3)


def _decide(opened, measurements, held_batches, functional_skipped, seed, clock, progress):
    """Similarity search, bootstrap and change points, then the functional check and the decision."""
    search, boot, candidates, change_points = split_mod.choose_split(
        measurements, top=TOP_CANDIDATES, resamples=BOOTSTRAP_RESAMPLES, seed=seed
    )
    clock.lap("search")
    check = None
    if held_batches:
        checked = candidates[:FUNCTIONAL_TOP]
        check = functional_mod.functional_check(
            opened.model,
            held_batches,
            [(c.start, c.end) for c in checked],
            controls=FUNCTIONAL_CONTROLS,
            progress=progress,
        )
        for c in checked:
            c.functional = check.summary(c.split)
        candidates = split_mod.rerank_functional(candidates)
    else:
        log.warning("functional check skipped: %s", functional_skipped)
    decision = split_mod.decide(opened.parts.num_layers, candidates, change_points, boot)
    clock.lap("functional")
    return decision, search, check


def _analysis_record(opened, measurements, decision, search, check, functional_skipped, command) -> dict:
    """``analysis.json`` without its provenance (see reports/README.md for the schema)."""
    parts = opened.parts
    return {
        "schema_version": SCHEMA_VERSION,
        "split": decision.split,
        "confidence": decision.confidence,
        "reason": decision.reason,
        "convert_command": command,
        "model": {
            "name": opened.name,
            "source": opened.source,
            "fingerprint": opened.fingerprint,
            "family": parts.family.label,
            "model_type": parts.family.model_type,
            "num_layers": parts.num_layers,
            "hidden_size": int(measurements.hidden_size or 0),
        },
        "decision": decision.to_json(),
        "search": {
            "best": search.split,
            "rule": split_mod.SEARCH_RULE,
            "min_layers": {
                "encoder": split_mod.MIN_ENCODER_LAYERS,
                "loop": split_mod.MIN_LOOP_LAYERS,
                "decoder": split_mod.MIN_DECODER_LAYERS,
            },
            "surface": search.surface,
        },
        "functional": check.to_json() if check is not None else None,
        "functional_skipped": functional_skipped,
        "measurements": measurements.to_json(),
    }


def _provenance(opened, measurements, check, wall, settings: _Settings, documents: tuple[int, int]) -> dict:
    """Where every number came from: model, data, budget, seed, versions and wall time per step."""
    return {
        "model_source": opened.source,
        "model_fingerprint": opened.fingerprint,
        "dtype": settings.dtype,
        "device": str(resolve_device(settings.device)),
        "data": "built-in probe corpus" if settings.data is None else str(settings.data),
        "documents_measured": documents[0],
        "documents_held_out": documents[1],
        "tokens_requested": settings.tokens,
        "tokens_used": int(measurements.tokens_used),
        "functional_tokens": check.tokens if check is not None else 0,
        "seq_len": settings.seq_len,
        "batch_size": corpus.DEFAULT_BATCH_SIZE,
        "seed": settings.seed,
        "probes": settings.probes,
        "bootstrap_resamples": BOOTSTRAP_RESAMPLES,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "wall_time_s": wall,
    }


def _alternatives(decision) -> list[dict]:
    return [
        {
            "rank": c.rank,
            "split": c.split,
            "score": c.score,
            "bootstrap_frequency": c.bootstrap_frequency,
            "repeat_kl": (c.functional or {}).get("repeat", {}).get("kl"),
        }
        for c in decision.candidates[1:]
    ]

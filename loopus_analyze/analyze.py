"""``loopus analyze``: open the model, measure its layers, choose the split, check it, write the report.

:func:`run_analysis` is the one function the CLI calls. Its steps, each timed in the provenance:

1. validate the flags and the data, and claim the output directory (a temporary directory next to it),
   so that every user error surfaces before the long work starts;
2. open the model (:func:`loopus_analyze.models.open_model`);
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
import logging
import os
import platform
import shlex
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from loopus_analyze import functional as functional_mod
from loopus_analyze import split as split_mod
from loopus_analyze.errors import LoopusError
from loopus_analyze.models import EMBEDDED_DEFAULT_NAME, resolve_device, resolve_dtype
from loopus_analyze.progress import Progress
from loopus_analyze.report import SCHEMA_VERSION, dump_json, jsonable, write_report

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


class _Output:
    """A temporary directory next to the target, moved into place by :meth:`commit`, removed on failure."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self.created: list[Path] = []  # parent directories this run created (removed again on failure)
        self.tmp: Path | None = None

    def claim(self) -> Path:
        """Check that the target can be written and create the temporary directory; one-line errors."""
        target = self.target
        if target.exists() and not target.is_dir():
            raise LoopusError(f"--out {target} exists and is not a directory; pass a directory path")
        if target.is_dir():
            for name in OUTPUT_FILES:
                if (target / name).exists() and not (target / name).is_file():
                    raise LoopusError(f"--out {target}: {target / name} is not a file; remove it")
        missing = []
        parent = target.parent
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        if not parent.is_dir():
            raise LoopusError(f"--out {target} cannot be created: {parent} is a file, not a directory")
        try:
            for directory in reversed(missing):
                directory.mkdir()
                self.created.append(directory)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
            umask = os.umask(0)
            os.umask(umask)
            self.tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the final directory follows the umask
        except OSError as exc:
            self.abort()
            raise LoopusError(
                f"--out {target} cannot be written ({exc.strerror}); choose another directory"
            ) from None
        return self.tmp

    def commit(self) -> None:
        """Move the finished files into place: rename the whole directory, or replace file by file."""
        assert self.tmp is not None
        if not self.target.exists():
            os.replace(self.tmp, self.target)
        else:
            for name in OUTPUT_FILES:
                os.replace(self.tmp / name, self.target / name)
            shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp = None
        self.created.clear()

    def abort(self) -> None:
        """Remove the temporary directory and the parents this run created."""
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
        for directory in reversed(self.created):
            try:
                directory.rmdir()
            except OSError:
                pass
        self.created.clear()


def _validate(tokens: int, seq_len: int, seed: int) -> None:
    from loopus_analyze.corpus import check_budget

    check_budget(tokens, seq_len)
    if seed < 0:
        raise LoopusError(f"--seed must be >= 0 (got {seed})")


def _held_out(texts: list[str], seed: int) -> tuple[list[str], list[str]]:
    """Measuring and held-out documents; a corpus of very few documents is cut inside each document."""
    from loopus_analyze.corpus import split_held_out

    if len(texts) >= 10:
        return split_held_out(texts, HELD_OUT_FRACTION, seed)
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
    from loopus_analyze.corpus import make_batches

    if not texts:
        return None, "no held-out text"
    for batch_size, length in ((FUNCTIONAL_BATCH_SIZE, seq_len), (1, seq_len), (1, min(seq_len, 32))):
        try:
            tokens = max(FUNCTIONAL_TOKENS, batch_size * (length - 1))
            return make_batches(tokenizer, texts, tokens=tokens, seq_len=length, batch_size=batch_size,
                                seed=seed + 7), None
        except LoopusError as exc:
            reason = str(exc)
    return None, f"too little held-out text ({reason})"


def _versions() -> dict[str, str]:
    import sklearn
    import torch
    import transformers

    import loopus

    return {"loopus": loopus.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__,
            "sklearn": sklearn.__version__, "python": platform.python_version()}


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
    from loopus_analyze import corpus
    from loopus_analyze.collect import measure
    from loopus_analyze.models import open_model

    started = time.perf_counter()
    wall: dict[str, float] = {}

    def lap(step: str, since: float) -> float:
        now = time.perf_counter()
        wall[step] = round(now - since, 3)
        return now

    tokens = corpus.DEFAULT_TOKENS if tokens is None else int(tokens)
    seq_len = corpus.DEFAULT_SEQ_LEN if seq_len is None else int(seq_len)
    _validate(tokens, seq_len, seed)
    resolve_dtype(dtype)
    resolve_device(device)
    texts = corpus.load_texts(data)
    target = Path(out).expanduser() if out is not None else default_out_dir(model)
    output = _Output(target.absolute())
    output.claim()
    try:
        t = lap("validate", started)
        opened = open_model(model, dtype=dtype, device=device)
        parts = opened.parts
        split_mod.check_layer_count(parts.num_layers)
        t = lap("open_model", t)
        measured_texts, held_texts = _held_out(texts, seed)
        batches = corpus.make_batches(opened.tokenizer, measured_texts, tokens=tokens, seq_len=seq_len,
                                      batch_size=corpus.DEFAULT_BATCH_SIZE, seed=seed)
        held_batches, functional_skipped = _held_out_batches(opened.tokenizer, held_texts, seq_len, seed)
        t = lap("tokenize", t)
        measurements = measure(opened.model, opened.tokenizer, batches, probes=probes, lens=True,
                               progress=progress, seed=seed)
        t = lap("measure", t)
        search, boot, candidates, change_points = split_mod.choose_split(
            measurements, top=TOP_CANDIDATES, resamples=BOOTSTRAP_RESAMPLES, seed=seed)
        t = lap("search", t)
        check = None
        if held_batches:
            checked = candidates[:FUNCTIONAL_TOP]
            check = functional_mod.functional_check(
                opened.model, held_batches, [(c.start, c.end) for c in checked],
                controls=FUNCTIONAL_CONTROLS, progress=progress)
            for c in checked:
                c.functional = check.summary(c.split)
            candidates = split_mod.rerank_functional(candidates)
        else:
            log.warning("functional check skipped: %s", functional_skipped)
        decision = split_mod.decide(parts.num_layers, candidates, change_points, boot)
        t = lap("functional", t)
        command = convert_command(model, decision.split, opened.name)
        analysis = {
            "schema_version": SCHEMA_VERSION,
            "split": decision.split,
            "confidence": decision.confidence,
            "reason": decision.reason,
            "convert_command": command,
            "model": {
                "name": opened.name, "source": opened.source, "fingerprint": opened.fingerprint,
                "family": parts.family.label, "model_type": parts.family.model_type,
                "num_layers": parts.num_layers, "hidden_size": int(measurements.hidden_size or 0),
            },
            "decision": decision.to_json(),
            "search": {"best": search.split, "rule": split_mod.SEARCH_RULE,
                       "min_layers": {"encoder": split_mod.MIN_ENCODER_LAYERS,
                                      "loop": split_mod.MIN_LOOP_LAYERS,
                                      "decoder": split_mod.MIN_DECODER_LAYERS},
                       "surface": search.surface},
            "functional": check.to_json() if check is not None else None,
            "functional_skipped": functional_skipped,
            "measurements": measurements.to_json(),
        }
        analysis["provenance"] = {
            "model_source": opened.source,
            "model_fingerprint": opened.fingerprint,
            "dtype": dtype,
            "device": str(resolve_device(device)),
            "data": "built-in probe corpus" if data is None else str(data),
            "documents_measured": len(measured_texts),
            "documents_held_out": len(held_texts),
            "tokens_requested": tokens,
            "tokens_used": int(measurements.tokens_used),
            "functional_tokens": check.tokens if check is not None else 0,
            "seq_len": seq_len,
            "batch_size": corpus.DEFAULT_BATCH_SIZE,
            "seed": seed,
            "probes": probes,
            "bootstrap_resamples": BOOTSTRAP_RESAMPLES,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "versions": _versions(),
            "wall_time_s": wall,
        }
        tmp = output.tmp
        assert tmp is not None
        write_report(jsonable(analysis), tmp)
        lap("report", t)
        wall["total"] = round(time.perf_counter() - started, 3)
        # the JSON again, now with the report's and the total wall time (the HTML shows the earlier steps)
        (tmp / "analysis.json").write_text(dump_json(analysis), encoding="utf-8")
        output.commit()
    except BaseException:
        output.abort()
        raise
    final = output.target
    alternatives = [
        {"rank": c.rank, "split": c.split, "score": c.score, "bootstrap_frequency": c.bootstrap_frequency,
         "repeat_kl": (c.functional or {}).get("repeat", {}).get("kl")}
        for c in decision.candidates[1:]
    ]
    log.info("recommended split %s (%s confidence); report in %s", decision.split, decision.confidence, final)
    return AnalysisResult(out_dir=final, report_path=final / "report.html", json_path=final / "analysis.json",
                          split=decision.split, confidence=decision.confidence, reason=decision.reason,
                          alternatives=alternatives, convert_command=command, wall_time_s=wall)

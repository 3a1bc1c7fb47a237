"""``loopus analyze``: open the model, map what looping each block costs, choose the split, explain it.

:func:`run_analysis` is the one function the CLI calls. Its steps, each timed in the provenance:

1. validate the flags and the data, and claim the output directory (a temporary directory next to it,
   :func:`loopus_core.outputs.atomic_directory`), so that every user error surfaces before the long work;
2. open the model (:func:`loopus_core.models.open_model`) and resolve the rule for its layer count
   (:class:`loopus_analyze.rule.Rule`: a ``--loop-layers`` it cannot hold is an error here);
3. split the documents three ways: measuring text (similarity), selection text and report text (both
   held out, disjoint by document), and cut each into token batches (:mod:`.corpus`);
4. one streamed pass over the measuring batches (:func:`loopus_analyze.collect.measure`) and the
   similarity search, bootstrap and change points (:mod:`.split`): the explanation;
5. the race on the selection text (:mod:`.race`): the repeat cost of every split the rule may choose, with
   the compute spent on the ones that can still be its choice, the rule's choice
   (:func:`loopus_analyze.rule.choose`) and the confidence from the final round: the decision;
6. the chosen block and its neighbours, every block of its length, the cheapest block of every length and
   the similarity picks measured again on the report text, with deeper repetition for the leading ones,
   and the intervals (:mod:`.assess`);
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

from loopus_analyze import corpus, heldout
from loopus_analyze.assess import WIDE_WINDOWS, assess, core_blocks, leading_blocks, report_blocks
from loopus_analyze.collect import measure
from loopus_analyze.functional import documents_of, map_entries, measure_map
from loopus_analyze.intervals import DEFAULT_RESAMPLES
from loopus_analyze.race import decide as race_decide
from loopus_analyze.race import run_race, stability_sentence
from loopus_analyze.report import SCHEMA_VERSION, dump_json, jsonable, write_report
from loopus_analyze.rule import Rule, check_repeat_budget, parse_loop_layers
from loopus_analyze.similarity import (
    MIN_DECODER_LAYERS,
    MIN_ENCODER_LAYERS,
    MIN_LOOP_LAYERS,
    SEARCH_RULE,
    agreement,
    block_similarity,
    check_layer_count,
    search_split,
    similarity_evidence,
    valid_pairs,
)
from loopus_core.checks import MAX_SEED, check_int
from loopus_core.errors import LoopusError
from loopus_core.models import EMBEDDED_DEFAULT_NAME, context_length, open_model
from loopus_core.outputs import atomic_directory
from loopus_core.progress import Progress
from loopus_core.runtime import resolve_device, resolve_dtype
from loopus_core.texts import load_texts

log = logging.getLogger(__name__)

BOOTSTRAP_RESAMPLES = 200  # of the measuring batches, for the similarity search
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
    alternatives: list[dict] = field(default_factory=list)  # the cheapest block of nearby lengths
    stability: str = ""  # whether the selection text separates the choice from the rule's other options
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
    map_tokens: int
    loop_layers: str | None
    repeat_budget: float | None

    def validate(self) -> None:
        """Every flag checked before anything is opened or written."""
        corpus.check_budget(self.tokens, self.seq_len)
        check_int(self.seed, "--seed", 0, MAX_SEED)
        check_int(self.map_tokens, "--map-tokens", heldout.MIN_MAP_TOKENS,
                  why=f"the predictions of one map window of {heldout.MAP_SEQ_LEN} tokens, scored from "
                  f"position {heldout.WARMUP} on")
        parse_loop_layers(self.loop_layers)
        check_repeat_budget(self.repeat_budget)
        resolve_dtype(self.dtype)
        resolve_device(self.device)


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
    map_tokens: int | None = None,
    loop_layers: str | None = None,
    repeat_budget: float | None = None,
    progress: Progress | None = None,
) -> AnalysisResult:
    """Analyse ``model`` (path, hub id, ``.gguf`` file, None = the embedded default); write the report.

    Writes ``report.html`` and ``analysis.json`` into ``out`` (default ``reports/<model-name>/``).
    ``tokens`` / ``seq_len`` default to :data:`loopus_analyze.corpus.DEFAULT_TOKENS` / ``DEFAULT_SEQ_LEN``,
    ``map_tokens`` (the predictions each final contender of the race reads on the selection text) to
    :data:`loopus_analyze.heldout.DEFAULT_MAP_TOKENS`;
    ``loop_layers`` (``"N"`` or ``"N-M"``) and ``repeat_budget`` (nats) set the rule (:mod:`.rule`).
    Every user-caused problem is a :class:`LoopusError`, raised before the output directory changes.
    """
    clock = _Clock()
    settings = _Settings(
        data=data,
        tokens=corpus.DEFAULT_TOKENS if tokens is None else int(tokens),
        seq_len=corpus.DEFAULT_SEQ_LEN if seq_len is None else int(seq_len),
        seed=seed, dtype=dtype, device=device, probes=probes,
        map_tokens=heldout.DEFAULT_MAP_TOKENS if map_tokens is None else map_tokens,
        loop_layers=loop_layers, repeat_budget=repeat_budget,
    )
    settings.validate()
    texts = load_texts(data)
    target = (Path(out).expanduser() if out is not None else default_out_dir(model)).absolute()
    _check_out(target)
    with atomic_directory(target, existing="merge") as tmp:
        clock.lap("validate")
        opened = open_model(model, dtype=dtype, device=device)
        check_layer_count(opened.parts.num_layers)
        rule = Rule.make(opened.parts.num_layers, loop_layers, repeat_budget)
        context = context_length(opened.model.config)
        check_int(settings.seq_len, "--seq-len", 3, context, why="the model's context")
        clock.lap("open_model")
        texts3 = heldout.three_ways(texts, seed)
        batches = corpus.make_batches(opened.tokenizer, texts3.measured, tokens=settings.tokens,
                                      seq_len=settings.seq_len, batch_size=corpus.DEFAULT_BATCH_SIZE,
                                      seed=seed)
        select_batches, report_batches = heldout.map_batches(opened.tokenizer, texts3, settings.map_tokens,
                                                             seed, min(heldout.MAP_SEQ_LEN, context))
        clock.lap("tokenize")
        measurements = measure(opened.model, opened.tokenizer, batches, probes=probes, progress=progress,
                               seed=seed)
        search, boot, points = similarity_evidence(measurements, resamples=BOOTSTRAP_RESAMPLES, seed=seed)
        picks = _similarity_picks(measurements, search)
        clock.lap("measure")
        choice, race, report, assessment = _decide(opened.model, rule, (select_batches, report_batches),
                                                   picks, clock, progress, (seed, settings.map_tokens))
        agreement(points, choice.start, choice.end)
        command = convert_command(model, choice.split, opened.name)
        analysis = _analysis_record(opened, measurements, rule, choice, race, report, assessment,
                                    (search, boot, points, picks), command)
        analysis["provenance"] = _provenance(opened, measurements, clock.wall, settings, texts3,
                                             (race, report))
        write_report(jsonable(analysis), tmp)
        clock.lap("report")
        clock.wall["total"] = clock.total()
        # the JSON again, now with the report's and the total wall time (the HTML shows the earlier steps)
        (tmp / "analysis.json").write_text(dump_json(analysis), encoding="utf-8")
    log.info("recommended split %s (%s confidence); report in %s", choice.split, assessment.confidence,
             target)
    return AnalysisResult(
        out_dir=target, report_path=target / "report.html", json_path=target / "analysis.json",
        split=choice.split, confidence=assessment.confidence, reason=assessment.reason,
        alternatives=_alternatives(assessment), stability=stability_sentence(race), convert_command=command,
        wall_time_s=clock.wall,
    )


def _decide(model, rule, batches, picks, clock, progress, settings: tuple[int, int]):
    """The race on the selection text and the rule's choice, then the report text's numbers."""
    (select_batches, report_batches), (seed, map_tokens) = batches, settings
    race = run_race(model, rule, select_batches, final_tokens=map_tokens, warmup=heldout.WARMUP,
                    progress=progress)
    choice, level, why = race_decide(model, rule, race, select_batches, warmup=heldout.WARMUP,
                                     progress=progress)
    clock.lap("map_selection")
    report, deep = _report_maps(model, rule, choice, picks, report_batches, progress)
    assessment = assess(rule, choice, report, deep, picks, (level, why), resamples=DEFAULT_RESAMPLES,
                        seed=seed)
    clock.lap("map_report")
    return choice, race, report, assessment


def _report_maps(model, rule, choice, picks, batches, progress):
    """The report text: the choice and its neighbours on every window (the choice's deeper repetition
    too), the other blocks the report shows on the first ``assess.WIDE_WINDOWS``."""
    documents = documents_of(batches)
    core = core_blocks(choice, rule.num_layers)
    report, deep = measure_map(
        model, batches, entries=map_entries(rule.num_layers, core), deep_blocks=core[:1],
        documents=documents, warmup=heldout.WARMUP, progress=progress,
        label="report text: the chosen block and its neighbours, deeper passes")
    wide, deeper = measure_map(
        model, batches[:WIDE_WINDOWS],
        entries=map_entries(rule.num_layers, report_blocks(rule, choice, picks)),
        deep_blocks=leading_blocks(choice, picks), documents=documents, warmup=heldout.WARMUP,
        progress=progress, label="report text: every length, the similarity picks")
    wide.count[:] = 0  # the first windows are already in report's count
    wide.base_nll[:] = 0
    report.add(wide)
    return report, [deep, deeper]


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


def _similarity_picks(measurements, search) -> dict[str, tuple[int, int]]:
    """The split each similarity view would choose (exact CKA search): raw, normed, no_massive."""
    picks = {"raw": search.best}
    for view, values in (measurements.views or {}).items():
        if values.get("cka") is not None:
            picks[view] = search_split(values["cka"]).best
    return picks


def _similarity_record(measurements, selection, search, boot, points, picks) -> dict:
    """The similarity views, their picks and how far each one tracks the repeat cost (selection text)."""
    pairs = valid_pairs(int(measurements.num_layers))
    costs = selection.repeat("delta_nll")[pairs[:, 0], pairs[:, 1]]
    read = np.isfinite(costs)  # the race reads the splits the rule may choose
    matrices = {"raw": measurements.cka_debiased} | {
        view: values["cka"] for view, values in (measurements.views or {}).items() if "cka" in values}
    from scipy.stats import spearmanr  # lazy: scipy is slow to import

    tracking = {}
    for view, matrix in matrices.items():
        rho = spearmanr(block_similarity(matrix, pairs)[read], costs[read]).statistic
        tracking[view] = {"best": "{}:{}".format(*picks[view]), "spearman_block_cka_vs_repeat_cost": rho}
    return {
        "rule": SEARCH_RULE,
        "best": search.split,
        "min_layers": {"encoder": MIN_ENCODER_LAYERS, "loop": MIN_LOOP_LAYERS,
                       "decoder": MIN_DECODER_LAYERS},
        "surface": search.surface,
        "views": tracking,
        "change_points": [cp.__dict__ for cp in points],
        "bootstrap": {"resamples": boot.resamples, "counts": boot.counts,
                      "start_interval": boot.start_interval, "end_interval": boot.end_interval,
                      "modal": boot.modal},
    }


def _map_record(race, choice, rule) -> dict:
    """The selection text's repeat-cost map as the race left it (each split read on its own windows), the
    race's bookkeeping, and what the rule read."""
    sums = race.sums
    tokens = sums.entry_tokens()
    return {
        "text": "selection",
        "tokens": sums.tokens,
        "documents": int((sums.count > 0).sum()),
        "window": race.window,
        "warmup": heldout.WARMUP,
        "base_nll": float(sums.base_nll.sum() / max(sums.count.sum(), 1)),
        "repeat": {"delta_nll": sums.repeat("delta_nll"), "kl": sums.repeat("kl"),
                   "top1_agreement": sums.repeat("agree"),
                   "tokens": np.where(np.isfinite(sums.repeat("delta_nll")), tokens.T, np.nan)},
        "race": race.to_json(),
        "cheapest_per_length": {str(n): {"split": f"{a}:{a + n}", "delta_nll": cost,
                                         "tokens": int(tokens[a + n, a]),
                                         "excess_over_budget": cost - rule.budget}
                                for n, (a, cost) in sorted(choice.cheapest.items())},
    }


def _analysis_record(opened, measurements, rule, choice, race, report, assessment, similarity,
                     command) -> dict:
    """``analysis.json`` without its provenance (see reports/README.md for the schema)."""
    parts = opened.parts
    search, boot, points, picks = similarity
    return {
        "schema_version": SCHEMA_VERSION,
        "split": choice.split,
        "confidence": assessment.confidence,
        "reason": assessment.reason,
        "convert_command": command,
        "model": {
            "name": opened.name,
            "source": opened.source,
            "fingerprint": opened.fingerprint,
            "family": parts.label,
            "model_type": parts.model_type,
            "num_layers": parts.num_layers,
            "hidden_size": int(measurements.hidden_size or 0),
        },
        "rule": rule.to_json() | {"fallback": choice.fallback,
                                  "excess_over_budget": choice.excess(rule.budget)},
        "decision": assessment.to_json() | {
            "stability": race.stability_json(),
            "report_text": {"tokens": report.tokens, "documents": len(report.documents),
                            "base_nll": float(report.base_nll.sum() / max(report.count.sum(), 1))}},
        "repeat_map": _map_record(race, choice, rule),
        "similarity": _similarity_record(measurements, race.sums, search, boot, points, picks),
        "measurements": measurements.to_json(),
    }


def _provenance(opened, measurements, wall, settings: _Settings, texts3, maps) -> dict:
    """Where every number came from: model, data, budget, seed, versions and wall time per step."""
    race, report = maps
    selection = race.sums
    return {
        "model_source": opened.source,
        "model_fingerprint": opened.fingerprint,
        "dtype": settings.dtype,
        "device": str(resolve_device(settings.device)),
        "data": "built-in probe corpus" if settings.data is None else str(settings.data),
        "documents_measured": len(texts3.measured),
        "documents_selection": len(texts3.selection),
        "documents_report": len(texts3.report),
        "tokens_requested": settings.tokens,
        "tokens_used": int(measurements.tokens_used),
        "map_tokens_requested": settings.map_tokens,
        "selection_tokens": selection.tokens,
        "report_tokens": report.tokens,
        "map_window": race.window,
        "map_warmup": heldout.WARMUP,
        "map_units": texts3.units,
        "seq_len": settings.seq_len,
        "batch_size": corpus.DEFAULT_BATCH_SIZE,
        "seed": settings.seed,
        "probes": settings.probes,
        "loop_layers": settings.loop_layers,
        "repeat_budget": settings.repeat_budget,
        "bootstrap_resamples": {"similarity": BOOTSTRAP_RESAMPLES, "documents": DEFAULT_RESAMPLES},
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "wall_time_s": wall,
    }


ALTERNATIVE_LENGTHS = 3  # the CLI lists the cheapest block of the lengths within this many of the choice


def _alternatives(assessment) -> list[dict]:
    length = assessment.recommended["length"]
    return [{"split": row["split"], "length": row["length"], "repeat_delta_nll": row["repeat"]["delta_nll"]}
            for row in assessment.per_length
            if row["split"] != assessment.split and abs(row["length"] - length) <= ALTERNATIVE_LENGTHS]

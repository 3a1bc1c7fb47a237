"""lm-evaluation-harness on a looped checkpoint, in one process: one load, a sweep of loop settings.

The plain harness already runs a looped checkpoint (``lm_eval --model hf --model_args
pretrained=DIR,trust_remote_code=True,num_loops=K``): transformers sets every model argument that names a
config attribute on the config, and the model reads ``num_loops``, ``exit_strategy``, ``exit_threshold``,
``min_loops`` and ``max_loops`` from it at every forward call. This module does the same for a list of
settings without reloading anything::

    model, tokenizer = load(CKPT); lm = HFLM(pretrained=model, tokenizer=tokenizer)       # once
    units = TaskManager(include_path=[shipped tasks, the user's]).load(spec) per --tasks item  # once
    for setting in [K loops for K in --loops] + [exit at tau, <= max_loops, for tau in --exit-threshold]:
        with applied(model.config, setting):            # what --model_args num_loops=K,... sets
            for unit in units: simple_evaluate(lm, unit)   # one unit at a time: loops used per task

Loops used come from every forward call's ``loops_used`` (forward hooks on the model); a task's mean
loops is their mean over (sequence, forward call) pairs: the loop passes spent per sequence and call (in
generation one call per new token, rows that already stopped included, as the harness batches them).
"""

from __future__ import annotations

import contextlib
import difflib
import gc
import logging
import math
import os
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from loopus_convert.eval_types import EvalConfig
from loopus_core.checks import MAX_LOOPS, check_float, check_int, check_ints
from loopus_core.errors import LoopusError, first_line
from loopus_core.progress import Progress, ensure
from loopus_core.runtime import autocast_dtype, resolve_device

log = logging.getLogger(__name__)

LOCAL_TASKS = Path(__file__).resolve().parent / "tasks"  # the shipped offline tasks (YAML + JSONL)
INSTALL_HINT = "pip install 'loopus[eval]'"
SETTING_FIELDS = ("num_loops", "exit_strategy", "exit_threshold", "min_loops", "max_loops")
SWEPT_STRATEGIES = ("threshold", "cdf")  # the exit strategies that stop at a threshold tau


def require_harness():
    """The ``lm_eval`` module with its ``hf`` model; else a one-line LoopusError with the install command."""
    try:
        import lm_eval
        import lm_eval.models.huggingface  # noqa: F401  (the hf extra: accelerate, peft)
    except ImportError as exc:
        missing = exc.name or str(exc)
        raise LoopusError(
            f"--tasks needs lm-evaluation-harness and its hf extra ({missing} is not installed): "
            f"{INSTALL_HINT}"
        ) from None
    return lm_eval


# ------------------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class LoopSetting:
    """One row of the sweep: the config attributes the looped model reads at forward time."""

    label: str
    num_loops: int
    exit_strategy: str = "none"
    exit_threshold: float | None = None
    min_loops: int = 1
    max_loops: int | None = None

    def values(self) -> dict[str, Any]:
        """The attributes this setting sets (``exit_threshold`` only under an exit strategy)."""
        values = {name: getattr(self, name) for name in SETTING_FIELDS}
        if values["exit_threshold"] is None:
            del values["exit_threshold"]
        return values

    def model_args(self, config) -> str:
        """The ``lm_eval --model_args`` entries that give this row with the plain harness on a checkpoint
        whose config is ``config``: ``num_loops`` and each attribute whose value differs from the config's."""
        values = self.values()
        entries = {k: v for k, v in values.items() if k == "num_loops" or getattr(config, k, None) != v}
        return ",".join(f"{k}={'none' if v is None else v}" for k, v in entries.items())


def loop_settings(
    loops: Sequence[int],
    thresholds: Sequence[float] = (),
    *,
    exit_strategy: str = EvalConfig.exit_strategy,
    min_loops: int = EvalConfig.min_loops,
    max_loops: int | None = None,
) -> list[LoopSetting]:
    """``K loops`` for every K in ``loops``, then one early-exit row per threshold with at most ``max_loops``
    (default: the largest K) passes; one-line errors for values out of range."""
    counts = sorted(set(check_ints(loops, "--loops", 1, MAX_LOOPS)))
    if exit_strategy not in SWEPT_STRATEGIES:
        raise LoopusError(
            f"--exit-strategy {exit_strategy!r} is not one of {', '.join(SWEPT_STRATEGIES)} (the strategies "
            "that stop at --exit-threshold)"
        )
    check_int(min_loops, "--min-loops", 1, MAX_LOOPS)
    limit = check_int(max_loops if max_loops is not None else counts[-1], "--max-loops", min_loops, MAX_LOOPS)
    taus = [check_float(t, "--exit-threshold", 0.0, 1.0, low_open=True, high_open=True) for t in thresholds]
    rows = [LoopSetting(f"{k} loop{'s' if k > 1 else ''}", k) for k in counts]
    rows += [
        LoopSetting(f"{exit_strategy} {t:g} (<= {limit})", limit, exit_strategy, t, min_loops, limit)
        for t in taus
    ]
    return rows


@contextlib.contextmanager
def applied(config, setting: LoopSetting) -> Iterator[None]:
    """``setting``'s attributes on ``config`` for the duration of the block, the old values afterwards."""
    old = {name: getattr(config, name) for name in SETTING_FIELDS}
    try:
        for name, value in setting.values().items():
            setattr(config, name, value)
        yield
    finally:
        for name, value in old.items():
            setattr(config, name, value)


def gate_is_identity(model) -> bool:
    """True when the selective gate passes the loop block's output through unchanged for every input.

    With ``W_dt = 0`` the gate's ``Abar`` (either form, :meth:`SelectiveGate.mix_weight`) does not depend on
    the input; when it is 1.0 in every channel, ``h_new = Abar * u + (1 - Abar) * h_old = u`` exactly (the
    ``residual`` and ``identity`` inits).
    """
    return model.gate.is_pass_through()


# ------------------------------------------------------------------------------------------ tasks


@dataclass
class TaskUnit:
    """One ``--tasks`` item, loaded: its name, what the harness built from it, and the names to report."""

    name: str
    loaded: dict  # TaskManager.load's {"tasks", "groups", "group_map"}
    manager: Any  # the TaskManager that built it (simple_evaluate would index every built-in task again)

    def objects(self) -> list:
        """The top-level tasks and groups (those that are nobody's child) to pass to ``simple_evaluate``."""
        children = {c for names in self.loaded["group_map"].values() for c in names}
        groups = [g for n, g in self.loaded["groups"].items() if n not in children]
        in_groups = {t.task_name for g in self.loaded["groups"].values() for t in g.get_all_tasks()}
        return groups + [t for n, t in self.loaded["tasks"].items() if n not in in_groups]


def _task_config(path: Path) -> dict:
    """A task file's configuration (its ``include:`` merged, ``!function`` tags as names); LoopusError if it
    does not parse."""
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        config = load_yaml(path, resolve_func=False)
    except Exception as exc:  # yaml.YAMLError, a bad include
        raise LoopusError(f"--tasks {path}: the task file does not parse ({first_line(exc)})") from None
    if not isinstance(config, dict):
        raise LoopusError(f"--tasks {path}: the task file does not parse (a YAML {type(config).__name__}, "
                          "not a mapping)")
    return config


def _check_metrics(path: Path, config: dict) -> None:
    """Every ``metric_list`` entry of a task file names a metric lm-eval knows (its registry), a function,
    or a metric of the evaluate library marked ``hf_evaluate: true``; else a one-line LoopusError (lm-eval
    would drop the metric with a warning, or fail to build the task)."""
    import lm_eval.api.metrics  # noqa: F401  (fills the registry)
    from lm_eval.api.registry import metric_registry

    if config.get("process_results") is not None:
        return  # the task computes its own metrics
    for number, entry in enumerate(config.get("metric_list") or [], 1):
        metric = entry.get("metric") if isinstance(entry, dict) else None
        if metric is None:
            raise LoopusError(f"--tasks {path}: metric_list entry {number} has no 'metric:'")
        if not isinstance(metric, str) or "/" in metric:  # a !function: a path once parsed
            continue
        if metric in metric_registry or entry.get("hf_evaluate"):  # lm-eval's, or the evaluate library's
            continue
        close = difflib.get_close_matches(metric, sorted(metric_registry), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else f" ({', '.join(sorted(metric_registry))})"
        raise LoopusError(
            f"--tasks {path}: metric {metric!r} is not one of lm-eval's metrics{hint}; for a metric of the "
            "evaluate library add 'hf_evaluate: true' to its entry"
        )


def _yaml_task_name(path: Path) -> str:
    """The task or group name of a task file; LoopusError if it does not parse, names neither, or names a
    metric lm-eval does not know."""
    if not path.is_file():
        raise LoopusError(f"--tasks {path}: the task file does not exist")
    config = _task_config(path)
    task = config.get("task")
    name = task if isinstance(task, str) else config.get("group")  # a group file lists its tasks
    if not isinstance(name, str):
        raise LoopusError(f"--tasks {path}: the task file names no 'task:' or 'group:'")
    _check_metrics(path, config)
    return name


def _folder_tasks(folder: Path) -> list[str]:
    """The task names of a folder's task files; LoopusError for a file that does not parse or names an
    unknown metric (lm-eval's index passes over it without a word)."""
    from lm_eval.tasks import TaskManager

    for file in sorted(folder.rglob("*.yaml")):
        _check_metrics(file, _task_config(file))
    names = TaskManager(include_path=str(folder), include_defaults=False).all_subtasks
    if not names:
        raise LoopusError(f"--tasks {folder}: the folder holds no task YAML file (none names a 'task:')")
    return names


def _parse_items(spec: str) -> tuple[list[str], list[Path]]:
    """``--tasks`` items as TaskManager specs (names, globs, YAML paths) and the folders to index."""
    specs: list[str] = []
    folders: list[Path] = []
    items = [item.strip() for item in spec.split(",") if item.strip()]
    if not items:
        raise LoopusError("--tasks is empty: give task names, a task YAML file or a folder of them")
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            folders.append(path.resolve())
            specs += _folder_tasks(path)
        elif path.suffix in (".yaml", ".yml") or path.is_file():
            _yaml_task_name(path)
            specs.append(str(path.resolve()))
        else:
            specs.append(item)
    return specs, folders


def _unknown(name: str, known: list[str]) -> LoopusError:
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    shipped = ", ".join(_folder_tasks(LOCAL_TASKS))
    return LoopusError(
        f"--tasks {name}: unknown task{hint}; give one of lm-eval's {len(known)} task names "
        f"(`lm_eval ls tasks`), a shipped offline task ({shipped}), a task YAML file or a folder"
    )


def _manager(specs: list[str], folders: list[Path]):
    """A TaskManager over the shipped tasks and ``folders`` (and lm-eval's own when a name needs them)."""
    from lm_eval.tasks import TaskManager

    include = [str(LOCAL_TASKS)] + [str(f) for f in folders]
    manager = TaskManager(include_path=include, include_defaults=False)
    if any(not Path(s).is_file() and not manager.match_tasks([s]) for s in specs):
        manager = TaskManager(include_path=include, include_defaults=True)
    return manager


_HUB_MODULES = ("datasets", "huggingface_hub", "requests", "urllib3", "fsspec")  # whose errors: no dataset


def _build(manager, name: str) -> TaskUnit:
    try:
        loaded = manager.load([name])
    except Exception as exc:  # the dataset is not reachable, a bad !function, a broken config
        hub = type(exc).__module__.split(".")[0] in _HUB_MODULES or isinstance(exc, ConnectionError)
        raise LoopusError(
            f"--tasks {name}: cannot load the task ({first_line(exc, 300)}); "
            + (
                "hub tasks need their dataset cached or the hub reachable (HF_DATASETS_OFFLINE unset)"
                if hub
                else "check the task's fields, templates and !function references"
            )
        ) from None
    label = _yaml_task_name(Path(name)) if Path(name).is_file() else name
    return TaskUnit(label, loaded, manager)


def load_tasks(spec: str) -> list[TaskUnit]:
    """Resolve and build ``--tasks`` (comma-separated names, globs, YAML files, folders) once.

    The shipped tasks in :data:`LOCAL_TASKS` and the given folders are always indexed; lm-eval's own task
    index (about 15 s to build) only when a name is not found there. One-line LoopusError for an unknown
    name, a task file that does not parse, or a task whose dataset cannot be loaded.
    """
    require_harness()
    specs, folders = _parse_items(spec)
    manager = _manager(specs, folders)
    names: list[str] = []
    for item in specs:
        expanded = [item] if Path(item).is_file() else manager.match_tasks([item])
        if not expanded:
            raise _unknown(item, manager.all_tasks)
        names += expanded
    return [_build(manager, name) for name in names]


# ------------------------------------------------------------------------------------------ running


@dataclass
class ForwardRecord:
    """What the model's forward calls inside :func:`forwards_recorded` did."""

    loops: list[torch.Tensor] = field(default_factory=list)  # loops_used (B,) of each call
    calls: int = 0
    seconds: float = 0.0  # wall time inside forward
    _start: float = 0.0


@contextlib.contextmanager
def forwards_recorded(model) -> Iterator[ForwardRecord]:
    """Count ``model``'s forward calls inside the block, time them, and keep their ``loops_used``."""
    record = ForwardRecord()

    def before(module, args) -> None:
        record._start = time.perf_counter()

    def after(module, args, output) -> None:
        record.seconds += time.perf_counter() - record._start
        record.calls += 1
        used = getattr(output, "loops_used", None)
        if used is not None:
            record.loops.append(used.detach().cpu())

    handles = [model.register_forward_pre_hook(before), model.register_forward_hook(after)]
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()


def _metrics(results: dict) -> dict[str, dict[str, float]]:
    """``{task or group: {"metric,filter": value}}`` from ``simple_evaluate``'s results (numbers only)."""
    out: dict[str, dict[str, float]] = {}
    for section in ("results", "groups"):
        for name, entry in results.get(section, {}).items():
            numbers = {k: float(v) for k, v in entry.items() if isinstance(v, (int, float)) and k != "alias"}
            if numbers:
                out.setdefault(name, {}).update(numbers)
    return out


@dataclass(frozen=True)
class RunOptions:
    """How every ``simple_evaluate`` of a sweep runs (the same for the base model and every setting)."""

    limit: float | None = None  # documents per task (a fraction < 1: that share)
    num_fewshot: int | None = None  # None: each task's own default
    batch_size: int = EvalConfig.batch_size
    device: str = EvalConfig.device  # auto | cpu | cuda | cuda:N
    precision: str = EvalConfig.precision  # autocast through HFLM's mixed_precision_dtype (runtime.py)
    seed: int = 0

    def check(self) -> RunOptions:
        if self.limit is not None:
            check_float(self.limit, "--limit", 0.0, low_open=True)
            if self.limit >= 1 and not float(self.limit).is_integer():
                raise LoopusError(f"--limit {self.limit}: give a number of documents or a fraction below 1")
        if self.num_fewshot is not None:
            check_int(self.num_fewshot, "--num-fewshot", 0)
        check_int(self.batch_size, "--batch-size", 1)
        autocast_dtype(self.precision, resolve_device(self.device))  # one-line errors for both names
        return self


def run_unit(lm, unit: TaskUnit, options: RunOptions) -> dict:
    """One ``simple_evaluate`` of one task unit on the wrapped model: its metrics, the loops used, the wall
    time (in all, and inside the model's forward), and the harness's facts about the tasks (versions,
    documents, shots)."""
    from lm_eval import simple_evaluate

    start = time.perf_counter()
    with forwards_recorded(lm.model) as record, _harness_errors(unit.name):
        results = simple_evaluate(
            model=lm,
            tasks=unit.objects(),
            task_manager=unit.manager,
            limit=options.limit,
            num_fewshot=options.num_fewshot,
            log_samples=False,
            random_seed=options.seed,
        )
    seconds = time.perf_counter() - start
    used = torch.cat(record.loops).float() if record.loops else None
    return {
        "metrics": _metrics(results),
        "mean_loops": float(used.mean()) if used is not None else None,
        "forward_calls": record.calls,
        "seconds": seconds,
        "forward_seconds": record.seconds,
        "facts": {key: results.get(key, {}) for key in ("versions", "n-samples", "n-shot")},
    }


_FIRST_PARTY = tuple(str(Path(__file__).resolve().parents[1] / name) for name in ("loopus", "loopus_core",
                     "loopus_analyze", "loopus_convert", "loopus_train"))


@contextlib.contextmanager
def _harness_errors(task: str) -> Iterator[None]:
    """An error raised by lm-eval itself while it builds or scores ``task`` (a task file's template or
    field, a setting the task cannot take) is a one-line LoopusError; one that passes through the model
    (torch) or our own code is a bug and keeps its traceback."""
    try:
        yield
    except Exception as exc:
        files = {os.path.realpath(f.filename) for f in traceback.extract_tb(exc.__traceback__)}
        files.discard(os.path.realpath(__file__))  # this module's own frames: the run_unit call
        if any(f.startswith(_FIRST_PARTY) or f"{os.sep}torch{os.sep}" in f for f in files):
            raise
        raise LoopusError(
            f"--tasks {task}: lm-eval stopped ({type(exc).__name__}: {first_line(exc)}); check the task "
            "file and the flags given for it"
        ) from None


@contextlib.contextmanager
def quiet_harness() -> Iterator[None]:
    """Keep lm-eval's and datasets' own output out of the terminal while the block runs: their tqdm bars
    (the caller shows one progress of its own), git's "fatal: not a git repository" (lm-eval asks git for
    the working directory's commit) and the environment report (pip, nvidia-smi: seconds per run), which
    the results here do not use. Restored afterwards."""
    import lm_eval.evaluator as evaluator
    from tqdm import std

    init = std.tqdm.__init__

    def quiet_init(self, *args, **kwargs) -> None:
        kwargs["disable"] = True
        init(self, *args, **kwargs)

    saved = {name: getattr(evaluator, name, None) for name in ("get_git_commit_hash", "add_env_info")}
    std.tqdm.__init__ = quiet_init
    evaluator.get_git_commit_hash, evaluator.add_env_info = (lambda: None), (lambda storage: None)
    try:
        yield
    finally:
        std.tqdm.__init__ = init
        for name, value in saved.items():
            if value is not None:
                setattr(evaluator, name, value)


def _check_fewshot(units: list[TaskUnit], shots: int | None) -> None:
    """``--num-fewshot`` at most the documents each task can draw its examples from (lm-eval would stop
    with "Sample larger than population" after the model is loaded)."""
    if not shots:
        return
    for unit in units:
        for name, task in unit.loaded["tasks"].items():
            try:
                pool = len(task.fewshot_docs())
            except Exception:  # a task without documents to count: lm-eval decides
                continue
            same = getattr(getattr(task, "fewshot_cfg", None), "split", None) == task.config.test_split
            pool -= 1 if same else 0  # drawn from the evaluated split: the document itself is left out
            if shots > pool:
                raise LoopusError(
                    f"--num-fewshot {shots} is more than task {name} can draw ({pool} few-shot documents); "
                    f"give at most {pool}"
                )


def wrap_model(model, tokenizer, options: RunOptions):
    """The harness's own ``--model hf`` wrapper around a loaded model (autocast as ``--precision`` says)."""
    from lm_eval.models.huggingface import HFLM

    amp = autocast_dtype(options.precision, model.device)
    return HFLM(
        pretrained=model, tokenizer=tokenizer, batch_size=options.batch_size, mixed_precision_dtype=amp
    )


def _run_rows(lm, settings: list, units: list[TaskUnit], options: RunOptions, advance) -> list[dict]:
    """Every task unit under every setting (None: the model as it is), in that order."""
    rows = []
    for setting in settings:
        with applied(lm.model.config, setting) if setting is not None else contextlib.nullcontext():
            tasks = {}
            for unit in units:
                tasks[unit.name] = run_unit(lm, unit, options)
                advance(1)
        label, args = (setting.label, setting.model_args(lm.model.config)) if setting else ("base", None)
        rows.append({"label": label, "setting": setting, "model_args": args, "tasks": tasks})
    return rows


def _base_row(base: str, units: list[TaskUnit], options: RunOptions, advance) -> dict:
    """The base model's row, measured on ``base`` (a model directory, .gguf or hub id) with ``--model hf``."""
    from loopus_core.models import open_model

    opened = open_model(base, dtype="float32", device=options.device)
    row = _run_rows(wrap_model(opened.model, opened.tokenizer, options), [None], units, options, advance)[0]
    row["label"] = f"base ({opened.name})"
    del opened
    gc.collect()
    return row


def _is_one_loop(setting: LoopSetting | None) -> bool:
    return setting is not None and setting.num_loops == 1 and setting.exit_strategy == "none"


def evaluate_tasks(
    checkpoint: str | Path,
    tasks: str,
    *,
    loops: Sequence[int] = EvalConfig.loops,
    thresholds: Sequence[float] = (),
    exit_strategy: str = EvalConfig.exit_strategy,
    min_loops: int = EvalConfig.min_loops,
    max_loops: int | None = None,
    base: str | None = None,
    trained: bool = False,
    options: RunOptions | None = None,
    progress: Progress | None = None,
) -> TaskResult:
    """Run ``tasks`` on a looped checkpoint at every loop count (and exit threshold), loading it once.

    The base row: with ``base`` given, that model is evaluated with the plain ``--model hf`` wrapper. Without
    it, the 1-loop row stands for the base only when the checkpoint was not ``trained`` and its gate is the
    identity (then 1 loop reproduces the base model, the lossless-conversion contract; a 1-loop row is added
    if ``loops`` lacks one); otherwise there is no base row and the result says why. Everything is checked
    before a model is loaded. Returns every number, the harness version and the task versions
    (:class:`TaskResult`).
    """
    lm_eval = require_harness()
    from loopus_convert.checkpoint import check_checkpoint, load_with_tokenizer

    settings = loop_settings(
        loops, thresholds, exit_strategy=exit_strategy, min_loops=min_loops, max_loops=max_loops
    )
    options = (options or RunOptions()).check()
    path = check_checkpoint(checkpoint)
    progress = ensure(progress)
    with quiet_harness():
        units = load_tasks(tasks)
        _check_fewshot(units, options.num_fewshot)
        rows = []
        if base:
            with progress.task(f"lm-eval: {len(units)} task(s) on the base model", len(units)) as advance:
                rows.append(_base_row(base, units, options, advance))
        model, tokenizer = load_with_tokenizer(path, options.device)
        one_loop_base = not trained and gate_is_identity(model)
        if one_loop_base and not base and not _is_one_loop(settings[0]):
            settings.insert(0, LoopSetting("1 loop", 1))
        runs = len(units) * len(settings)
        with progress.task(f"lm-eval: {len(units)} task(s) x {len(settings)} setting(s)", runs) as advance:
            rows += _run_rows(wrap_model(model, tokenizer, options), settings, units, options, advance)
    if one_loop_base and not base:
        for row in rows:
            if _is_one_loop(row["setting"]):
                row["label"] = "base (= 1 loop)"
    log.info("lm-eval %s: %d task(s) x %d row(s) on %s", lm_eval.__version__, len(units), len(rows), path)
    return _summary(path, lm_eval.__version__, units, rows, _base_note(base, one_loop_base), options)


def _base_note(base: str | None, one_loop_base: bool) -> str:
    if base:
        return f"measured: {base} under the plain --model hf wrapper"
    if one_loop_base:
        return "the checkpoint at 1 loop (freshly converted, pass-through gate: 1 loop is the base model)"
    return (
        "not measured: this checkpoint was trained or its gate mixes in the old state, so 1 loop is not the "
        "base model; pass --base MODEL to evaluate the base model beside it"
    )


def _summary(path: Path, version: str, units, rows, base_note: str, options: RunOptions) -> TaskResult:
    facts: dict[str, dict] = {"versions": {}, "n-samples": {}, "n-shot": {}}
    for entry in rows[-1]["tasks"].values():
        for key, values in entry["facts"].items():
            facts[key].update(values)
    return TaskResult(
        checkpoint=str(path),
        harness=HarnessFacts(version, facts["versions"], facts["n-samples"], facts["n-shot"]),
        tasks=[u.name for u in units],
        options=options,
        base=base_note,
        rows=[
            TaskRow(
                label=row["label"],
                setting=row["setting"],
                model_args=row["model_args"],
                tasks={name: TaskScores.of(entry) for name, entry in row["tasks"].items()},
            )
            for row in rows
        ],
    )


def run_tasks(
    path: Path, config: EvalConfig, *, trained: bool, progress: Progress | None = None
) -> TaskResult:
    """``loopus eval --tasks``: :func:`evaluate_tasks` with the settings of ``config``."""
    options = RunOptions(
        limit=config.limit,
        num_fewshot=config.num_fewshot,
        batch_size=config.batch_size,
        device=config.device,
        precision=config.precision,
    )
    return evaluate_tasks(
        path,
        config.tasks,
        loops=config.loops,
        thresholds=config.task_thresholds(),
        exit_strategy=config.exit_strategy,
        min_loops=config.min_loops,
        max_loops=config.max_loops,
        base=config.base,
        trained=trained,
        options=options,
        progress=progress,
    )


# ------------------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class TaskScores:
    """One task unit under one setting: ``{task or group: {"metric,filter": value}}``, the mean loop passes
    per sequence and forward call (None: a model without loops), forward calls and wall time."""

    metrics: dict[str, dict[str, float]]
    mean_loops: float | None
    forward_calls: int
    seconds: float
    forward_seconds: float

    @classmethod
    def of(cls, entry: dict) -> TaskScores:
        """From :func:`run_unit`'s dict (its ``facts`` go to the result's :class:`HarnessFacts`)."""
        return cls(**{k: v for k, v in entry.items() if k != "facts"})


@dataclass(frozen=True)
class TaskRow:
    """One row of the sweep: the base model (``setting`` None) or a loop setting, every task unit."""

    label: str
    setting: LoopSetting | None
    model_args: str | None  # the plain harness's --model_args for this row
    tasks: dict[str, TaskScores]


@dataclass(frozen=True)
class HarnessFacts:
    """The harness version and, per task, its version, documents evaluated and shots."""

    lm_eval: str
    task_versions: dict
    documents: dict
    shots: dict


@dataclass(frozen=True)
class TaskResult:
    """``loopus eval --tasks``: every row's numbers, what ran them, what the base row is."""

    checkpoint: str
    harness: HarnessFacts
    tasks: list[str]
    options: RunOptions
    base: str  # what the base row is, or why there is none
    rows: list[TaskRow]

    def to_json(self) -> dict:
        """Plain dicts and numbers (``eval --tasks --json``)."""
        return asdict(self)

    def columns(self) -> list[tuple[str, str]]:
        """``(task, "metric,filter")`` columns for a table: every metric of the reported tasks, no stderr
        (the JSON keeps everything, a group's subtasks included)."""
        columns: list[tuple[str, str]] = []
        for unit, entry in self.rows[0].tasks.items():
            for task, metrics in entry.metrics.items():
                if task != unit and unit in entry.metrics:
                    continue  # a group's subtask: the table shows the group
                columns += [
                    (task, key)
                    for key in metrics
                    if "_stderr" not in key and key != "sample_len" and not math.isnan(metrics[key])
                ]
        return columns

"""``loopus eval CKPT``: held-out perplexity per loop count, confidence calibration, early-exit statistics;
with ``--tasks``, lm-evaluation-harness tasks per loop count instead (:mod:`loopus_convert.harness`).

The flags become one :class:`~loopus_convert.eval_types.EvalConfig` (whose defaults are the flags'); the
results come back typed (``PerplexityResult``, ``TaskResult``): this module prints them and writes their
``to_json()``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from loopus.app import RichProgress, app, console, guarded, number_list, say
from loopus_convert.eval_types import DEFAULT_BLOCK_SIZE, EvalConfig, KVStats, PerplexityResult
from loopus_core.errors import LoopusError

D = EvalConfig()  # the defaults


@app.command("eval")
def evaluate(
    ctx: typer.Context,
    checkpoint: Path = typer.Argument(..., help="A looped checkpoint, or a `loopus finetune` run directory."),
    data: str = typer.Option(
        None,
        "--data",
        help=".txt / .jsonl file or folder (default: the run's held-out "
        "split for a trained checkpoint, else the built-in corpus).",
    ),
    loops: str = typer.Option(",".join(map(str, D.loops)), "--loops", help="Loop counts to measure."),
    exit_threshold: str = typer.Option(
        None,
        "--exit-threshold",
        help="Early-exit thresholds; '' = none (default: perplexity's set; with --tasks none).",
    ),
    max_loops: int = typer.Option(
        None, "--max-loops", help="Loop limit under early exit (default: max --loops)."
    ),
    kv_strategy: str = typer.Option(
        "",
        "--kv-strategy",
        help="KV strategies to compare with full at each --loops, e.g. last,first: blocks decoded token by "
        "token (slow); '' = none.",
    ),
    block_size: int = typer.Option(
        None, "--block-size", help=f"Tokens per block (default: the run's, or {DEFAULT_BLOCK_SIZE})."
    ),
    max_blocks: int = typer.Option(D.max_blocks, "--max-blocks", help="Blocks evaluated at most."),
    batch_size: int = typer.Option(D.batch_size, "--batch-size", help="Blocks per forward pass."),
    device: str = typer.Option(D.device, "--device", help="auto | cpu | cuda | cuda:N."),
    precision: str = typer.Option(
        D.precision, "--precision", help="auto (bf16 autocast on GPUs) | fp32 | bf16."
    ),
    json_out: Path = typer.Option(None, "--json", help="Also write the results to this JSON file."),
    tasks: str = typer.Option(
        None,
        "--tasks",
        help="lm-eval tasks instead of perplexity: names (arc_easy,hellaswag), a task "
        "YAML or a folder; shipped offline: loopus_mc,loopus_gen. Needs loopus[eval].",
    ),
    limit: float = typer.Option(None, "--limit", help="With --tasks: documents per task (< 1: a share)."),
    num_fewshot: int = typer.Option(
        None, "--num-fewshot", help="With --tasks: shots (default: each task's)."
    ),
    base: str = typer.Option(
        None, "--base", help="With --tasks: the base model (dir, .gguf, hub id) evaluated beside the loops."
    ),
    exit_strategy: str = typer.Option(None, "--exit-strategy", help="With --tasks: threshold or cdf."),
    min_loops: int = typer.Option(None, "--min-loops", help="With --tasks: passes before any exit."),
) -> None:
    """Evaluate a looped checkpoint: perplexity per loop count and what early exit saves and costs, or
    lm-evaluation-harness tasks per loop count (--tasks)."""
    with guarded():
        from loopus_core.outputs import check_output_file

        if json_out is not None:  # before the evaluation, so that a bad path does not lose its results
            check_output_file(json_out, "--json")
        counts = number_list(loops, "--loops", int)
        thresholds = number_list(exit_threshold, "--exit-threshold", float)
        harness_only = dict(
            limit=limit, num_fewshot=num_fewshot, base=base, exit_strategy=exit_strategy, min_loops=min_loops
        )
        _check_flags_apply(ctx, tasks is not None, thresholds)
        given = dict(
            thresholds=thresholds, max_loops=max_loops, data=data, block_size=block_size, tasks=tasks,
            **harness_only,
        )
        config = EvalConfig(
            loops=counts, batch_size=batch_size, device=device, precision=precision, max_blocks=max_blocks,
            kv_strategies=tuple(name.strip() for name in kv_strategy.split(",") if name.strip()),
            **{k: v for k, v in given.items() if v is not None},
        )
        if tasks is not None:
            result = _evaluate_tasks(checkpoint, config)
        else:
            result = _perplexity(checkpoint, config, harness_only)
        if json_out is not None:
            _write_json(json_out, result)


_PERPLEXITY_ONLY = ("data", "block_size", "kv_strategy", "max_blocks")
_EXIT_ONLY = ("max_loops", "min_loops", "exit_strategy")  # settings of the early-exit rows


def _check_flags_apply(ctx: typer.Context, with_tasks: bool, thresholds: tuple | None) -> None:
    """One rule for a flag given where it does nothing (the generate command's too): a one-line error.
    Perplexity flags with --tasks, early-exit settings without an early-exit row (``--exit-threshold ''``,
    or --tasks without --exit-threshold). Harness-only flags without --tasks: :func:`_perplexity`."""

    def given(names: tuple[str, ...]) -> list[str]:
        return [
            f"--{name.replace('_', '-')}"
            for name in names
            if ctx.get_parameter_source(name).name not in ("DEFAULT", "DEFAULT_MAP")
        ]

    if with_tasks and given(_PERPLEXITY_ONLY):
        raise LoopusError(
            f"--tasks ignores {', '.join(given(_PERPLEXITY_ONLY))} (perplexity settings: the tasks bring "
            "their own documents); drop them or --tasks"
        )
    no_exit_rows = thresholds == () or (with_tasks and thresholds is None)
    flags = given(_EXIT_ONLY if with_tasks else _EXIT_ONLY[:1])  # the others: --tasks only
    if no_exit_rows and flags:
        raise LoopusError(
            f"no early-exit row uses {', '.join(flags)} (there is none without --exit-threshold); add "
            "--exit-threshold TAU[,TAU...] or drop them"
        )


def _write_json(path: Path, result) -> None:
    """Write ``result.to_json()`` to ``path`` as strict JSON (an infinite perplexity is null), atomically."""
    from loopus_core.jsonio import dumps_strict
    from loopus_core.outputs import write_text_atomic

    write_text_atomic(path, dumps_strict(result.to_json(), indent=1), "--json")
    say(f"results: {path}")


def _perplexity(checkpoint: Path, config: EvalConfig, harness_only: dict) -> PerplexityResult:
    """Perplexity per loop count on held-out text (:func:`loopus_train.evaluate.evaluate_checkpoint`)."""
    from loopus_train.evaluate import evaluate_checkpoint

    given = [f"--{k.replace('_', '-')}" for k, v in harness_only.items() if v is not None]
    if given:
        raise LoopusError(f"{', '.join(given)} only apply with --tasks (lm-evaluation-harness tasks)")

    with RichProgress() as progress:
        result = evaluate_checkpoint(checkpoint, config, progress=progress)
    _print_perplexity(result)
    return result


def _print_perplexity(result: PerplexityResult) -> None:
    say(f"{result.checkpoint}: {result.blocks} blocks of {result.block_size} tokens from {result.data}")
    table = Table("loops", "loss", "perplexity", "token accuracy")
    for k, row in result.loops.items():
        table.add_row(k, f"{row.loss:.4f}", f"{row.ppl:.3f}", f"{row.accuracy:.3f}")
    console.print(table)
    cal = result.calibration
    console.print(
        f"confidence head: ECE {cal.ece:.3f}, Brier {cal.brier:.3f} (mean confidence "
        f"{cal.mean_confidence:.3f} vs mean correct {cal.mean_correct:.3f})"
    )
    if result.early_exit is not None:
        exits = Table("exit threshold", "mean loops", "perplexity", "change vs full")
        for key, row in result.early_exit.thresholds.items():
            label = f"none ({result.early_exit.max_loops} loops)" if key == "full" else key
            exits.add_row(label, f"{row.mean_loops:.2f}", f"{row.ppl:.3f}", f"{row.ppl_change:+.2%}")
        console.print(exits)
    if result.kv_strategies is not None:
        console.print(_kv_table(result.kv_strategies))


def _evaluate_tasks(checkpoint: Path, config: EvalConfig):
    """``--tasks``: the harness in this process, the checkpoint (or a run's newest) loaded once."""
    from loopus_convert.harness import run_tasks
    from loopus_train.rundir import resolve_checkpoint
    from loopus_train.state import STATE_JSON

    path = resolve_checkpoint(checkpoint)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its warnings about wrapping a loaded model
    trained = (path / STATE_JSON).is_file()  # a trainer's checkpoint: 1 loop is no longer the base
    with RichProgress() as progress:
        result = run_tasks(path, config, trained=trained, progress=progress)
    _print_tasks(result)
    return result


def _print_tasks(result) -> None:
    """The rows of a :class:`~loopus_convert.harness.TaskResult` as one table, what ran them above it."""
    columns = result.columns()
    units = list(result.rows[0].tasks)
    table = Table("setting")
    for title in [_column_title(t, m) for t, m in columns] + [f"{u} loops" for u in units]:
        table.add_column(Text(title))  # Text: task names and labels are never markup
    for row in result.rows:
        metrics = {t: m for entry in row.tasks.values() for t, m in entry.metrics.items()}
        cells = [f"{metrics[t][m]:.4f}" if m in metrics.get(t, {}) else "-" for t, m in columns]
        loops = [row.tasks[u].mean_loops for u in units]
        table.add_row(Text(row.label), *cells, *["-" if m is None else f"{m:.2f}" for m in loops])
    harness = result.harness
    say(
        f"{result.checkpoint}: lm-evaluation-harness {harness.lm_eval}, tasks "
        f"{', '.join(f'{t} v{v}' for t, v in harness.task_versions.items())}"
    )
    console.print(table)
    say(f"base row: {result.base}; loops = mean loop passes per sequence and forward call")


def _column_title(task: str, key: str) -> str:
    metric, _, kind = key.partition(",")
    return f"{task} {metric}" if kind in ("", "none") else f"{task} {metric} ({kind})"


def _kv_table(kv: KVStats) -> Table:
    """Perplexity, top-token agreement with full and cache bytes per KV strategy and loop count."""
    table = Table("KV cache", "loops", "perplexity", "top-1 = full", "bytes / sequence", "vs base")
    for name, per_k in kv.strategies.items():
        for k, row in per_k.items():
            cells = (f"{row.ppl:.3f}", f"{row.agreement:.3f}", f"{row.cache_bytes:,}", f"{row.vs_base:.2f}x")
            table.add_row(name, k, *cells)
    table.caption = (
        f"each block: a {kv.prompt_tokens}-token prompt in one call, then one token per call "
        f"({kv.decoded_tokens} predictions)"
    )
    return table

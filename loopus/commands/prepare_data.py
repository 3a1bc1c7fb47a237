"""``loopus prepare-data [DATA]``: tokenise training text once into token shards (for ``loopus finetune``)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import typer
from rich.progress import Progress, ProgressColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from loopus.app import app, console, err_console, guarded


class _TokensPerSecond(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.completed:,.0f} tokens  {task.speed or 0:,.0f} tokens/s")


class TokenProgress:
    """A :class:`loopus_core.progress.Progress` for tokenising: tokens done and tokens/s, live only while a
    task runs (so that it never overlaps another live display)."""

    @contextlib.contextmanager
    def task(self, description: str, total: float | None) -> Iterator[Callable[[float], None]]:
        progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}", markup=False),
            _TokensPerSecond(),
            TimeElapsedColumn(),
            console=err_console,
            disable=not sys.stderr.isatty() and os.environ.get("LOOPUS_PROGRESS") != "1",
        )
        with progress:
            task_id = progress.add_task(description, total=total)
            yield lambda n=1: progress.advance(task_id, n)


def _size(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


@app.command("prepare-data")
def prepare_data(
    data: str = typer.Argument(
        None,
        show_default=False,
        help=".txt / .jsonl / .parquet file, folder of them, or a datasets name (default: the built-in "
        "corpus).",
    ),
    tokenizer: Path = typer.Option(
        ..., "--tokenizer", "-t", help="The looped checkpoint (or model) to train."
    ),
    out: Path = typer.Option(
        None, "--out", "-o", show_default=False, help="Shard directory to write (default: the cache)."
    ),
    workers: int = typer.Option(0, "--workers", help="Tokenising processes (0: one per CPU, at most 16)."),
    max_tokens: int = typer.Option(
        None, "--max-tokens", show_default=False, help="Stop after this many tokens (whole documents)."
    ),
    force: bool = typer.Option(False, "--force", help="Tokenise again even if the shards exist."),
) -> None:
    """Tokenise text once into memory-mapped token shards that `loopus finetune` reuses."""
    with guarded():
        from loopus_train.shards import ALREADY_PREPARED
        from loopus_train.shards import prepare_data as prepare

        shards, report = prepare(
            data,
            tokenizer,
            out=out,
            workers=workers,
            max_tokens=max_tokens,
            force=force,
            progress=TokenProgress(),
        )
        sizes = ", ".join(_size(n) for n in shards.shard_sizes())
        console.print(f"token shards: {shards.path}", markup=False)
        console.print(
            f"{shards.num_documents:,} documents, {shards.num_tokens:,} tokens in "
            f"{len(shards.shard_sizes())} shard(s) ({sizes})"
        )
        if shards.labels is not None:
            console.print(
                f"{shards.kind} records with labels: {shards.supervised_tokens():,} supervised tokens "
                "(what loopus finetune trains on by default)"
            )
        if report is None:
            console.print(ALREADY_PREPARED)
        else:
            console.print(f"tokenised in {report.seconds:.1f} s: {report.tokens_per_s:,.0f} tokens/s")
        if out is not None or max_tokens is not None:  # a limited source has a cache entry of its own
            console.print(f"train on it with: loopus finetune CKPT --data {shards.path}", markup=False)

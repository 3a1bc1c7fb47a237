"""The typer application, the console, and the plumbing every command shares.

Each command module in ``loopus.commands`` registers itself on :data:`app`, parses and validates its flags,
calls one library function inside :func:`guarded`, and prints where the output went.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
from collections.abc import Callable, Iterator

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from loopus_core.errors import LoopusError, Terminated

PACKAGES = ("loopus", "loopus_core", "loopus_analyze", "loopus_convert", "loopus_train")  # whose logs we show

app = typer.Typer(
    name="loopus",
    help="Looped depth up-scaling: analyse a causal LM's layers, convert it into an encoder / loop block / "
    "decoder model, fine-tune it and run it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# markup off: every line prints user text (paths, task names, messages) as text; styles are explicit (Text)
console = Console(markup=False)
err_console = Console(stderr=True, markup=False)


# C0 and C1 control characters (escape sequences, carriage return, bell, ...) and the bidirectional
# embedding / override / isolate marks, which can reorder what a terminal shows
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """``text`` safe to print on a terminal: each control character becomes a space (a message from a file
    or a path can hold escape sequences). Printed as a rich ``Text``, it is never read as markup."""
    return _CONTROL.sub(" ", text)


class _PrintableFilter(logging.Filter):
    """Log records reach the terminal with control characters replaced (:func:`printable`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = printable(record.getMessage()), None
        return True


def setup_logging(verbose: bool = False) -> None:
    """INFO from our packages (DEBUG with --verbose), warnings only from third-party libraries."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    handler = RichHandler(console=err_console, show_path=False, show_time=False, markup=False)
    handler.addFilter(_PrintableFilter())
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(message)s", force=True)
    for name in PACKAGES:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)
    with contextlib.suppress(Exception):
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()


def fail(message: str) -> typer.Exit:
    """Print ``error: message`` on one line to stderr and return the exit (code 2) to raise. The message is
    text, never markup (it quotes paths and values the user or a file chose), without control characters."""
    err_console.print(Text.assemble(("error:", "bold red"), " ", printable(message)), soft_wrap=True)
    return typer.Exit(code=2)


def say(text: str) -> None:
    """Print a line of user-facing text to stdout as text (never markup), without control characters."""
    console.print(Text(printable(text)), soft_wrap=True)


@contextlib.contextmanager
def guarded() -> Iterator[None]:
    """Turn a :class:`LoopusError` into a one-line error with exit code 2, Ctrl-C into exit code 130 and
    SIGTERM into exit code 143, after the same clean-up as Ctrl-C (SIGTERM raises
    :class:`~loopus_core.errors.Terminated`, a KeyboardInterrupt, while the block runs)."""
    with _sigterm_raises():
        try:
            yield
        except LoopusError as exc:
            raise fail(str(exc)) from None
        except KeyboardInterrupt as exc:
            terminated = isinstance(exc, Terminated)
            what = "terminated" if terminated else "interrupted"
            err_console.print(f"{what}; nothing half-written was left behind", highlight=False, markup=False)
            raise typer.Exit(code=(128 + signal.SIGTERM) if terminated else 130) from None


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While the block runs, SIGTERM raises :class:`Terminated` (once: a second SIGTERM during the clean-up
    is ignored). Outside the main thread (no signal handlers there) nothing changes."""

    def handler(signum, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def number_list(text: str | None, flag: str, kind: type = float) -> tuple | None:
    """``"1,2,4"`` -> (1, 2, 4) of ``kind``; None stays None, ``""`` is the empty tuple; one-line errors."""
    if text is None:
        return None
    try:
        return tuple(kind(x) for x in text.split(",") if x.strip())
    except ValueError:
        example = "1,2,4,8" if kind is int else "0.6,0.8,0.9"
        raise LoopusError(
            f"{flag} {text!r} must be comma-separated {kind.__name__} values (e.g. {example})"
        ) from None


class RichProgress:
    """The rich implementation of :class:`loopus_core.progress.Progress` (one live display)."""

    def __init__(self) -> None:
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}", style="progress.description", markup=False),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=err_console,
            transient=False,
            disable=not sys.stderr.isatty() and os.environ.get("LOOPUS_PROGRESS") != "1",
        )

    def __enter__(self) -> RichProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    @contextlib.contextmanager
    def task(self, description: str, total: float | None) -> Iterator[Callable[[float], None]]:
        task_id = self._progress.add_task(description, total=total)
        try:
            yield lambda n=1: self._progress.advance(task_id, n)
        finally:
            if total is not None:
                self._progress.update(task_id, completed=total)
            self._progress.stop_task(task_id)

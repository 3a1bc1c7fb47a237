"""Progress reporting for long work: library code reports, the CLI decides how to show it.

Library functions take ``progress: Progress | None``; ``None`` means silent. The CLI passes a rich-backed
implementation (``loopus.cli``); tests pass nothing or a recorder.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Protocol


class Progress(Protocol):
    """Something that can show a progress bar for a named task of known size."""

    def task(
        self, description: str, total: float | None
    ) -> contextlib.AbstractContextManager[Callable[[float], None]]:
        """A context manager yielding ``advance(n)``; the bar closes when the context exits."""
        ...


class NullProgress:
    """Shows nothing."""

    @contextlib.contextmanager
    def task(self, description: str, total: float | None) -> Iterator[Callable[[float], None]]:
        yield lambda n=1: None


def ensure(progress: Progress | None) -> Progress:
    """``progress`` itself, or a :class:`NullProgress` when it is None."""
    return progress if progress is not None else NullProgress()

"""The one error type that reaches the user as a one-line message (exit code 2), and how to word it."""

from __future__ import annotations


class LoopusError(Exception):
    """A problem with the user's input or environment, stated in one line with what to do about it.

    The CLI prints ``error: <message>`` and exits with code 2, without a traceback. Library code raises it
    for every condition a user can cause (bad path, bad flag value, unsupported model); bugs stay ordinary
    exceptions so that they keep their traceback.
    """


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an exception's message (its type name when it has none), at most
    ``limit`` characters: what a one-line error quotes from a third-party library."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line[:limit]


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt (``loopus.app.guarded`` installs the handler).

    A subclass of KeyboardInterrupt, so every clean-up that runs on Ctrl-C (temporary output directories,
    locks) runs on SIGTERM too; the CLI then exits with status 143 (128 + SIGTERM), what a shell reports
    for a process that SIGTERM ended.
    """

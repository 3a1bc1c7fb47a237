"""The one error type that reaches the user as a one-line message (exit code 2)."""

from __future__ import annotations


class LoopusError(Exception):
    """A problem with the user's input or environment, stated in one line with what to do about it.

    The CLI prints ``error: <message>`` and exits with code 2, without a traceback. Library code raises it
    for every condition a user can cause (bad path, bad flag value, unsupported model); bugs stay ordinary
    exceptions so that they keep their traceback.
    """

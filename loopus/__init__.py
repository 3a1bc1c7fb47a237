"""Command-line face of the LoopUS toolkit; the logic lives in ``loopus_analyze`` and ``loopus_convert``."""

__version__ = "0.1.0"

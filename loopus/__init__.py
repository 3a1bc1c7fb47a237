"""Command-line face of the LoopUS toolkit; the logic lives in ``loopus_core`` and the three stage packages
(``loopus_analyze``, ``loopus_convert``, ``loopus_train``)."""

__version__ = "0.1.0"

"""Validation first, then frozen choices, then the test split: the order the depth task's protocol keeps.

:class:`Protocol` hands out the validation programs at once, and the test programs only after
:meth:`Protocol.freeze` has written the choices made on validation (``choices.json``); asking for the test
split before that raises :class:`TestBeforeFreeze`. The test records are not even generated before then.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from benchmarks.evidence.task import Codec, eval_records, stack_sets


class TestBeforeFreeze(RuntimeError):
    """The test split was asked for before the validation choices were frozen."""


class Protocol:
    """The evaluation splits of one run: ``val`` any time, ``test`` only once the choices are frozen."""

    def __init__(self, root: Path, n: int, depths: list[int], size: int, codec: Codec, deep: int) -> None:
        self.root, self.n, self.depths, self.size, self.codec, self.deep = root, n, depths, size, codec, deep
        self.choices_path = root / "choices.json"
        self.frozen: dict | None = None
        self.log: list[str] = []  # the order of events: val, freeze, test

    def _sets(self, split: str) -> dict:
        records = eval_records(self.n, self.depths, self.size, self.codec, self.deep, split)
        return stack_sets(records)

    def val_sets(self) -> dict:
        """The validation programs of every depth."""
        self.log.append("val")
        return self._sets("val")

    def freeze(self, choices: dict) -> dict:
        """Write the choices (with the time) and allow the test split; returns what was written."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.frozen = {**choices, "frozen_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.choices_path.write_text(json.dumps(self.frozen, indent=1), encoding="utf-8")
        self.log.append("freeze")
        return self.frozen

    def test_sets(self) -> dict:
        """The test programs of every depth; :class:`TestBeforeFreeze` before :meth:`freeze`."""
        if self.frozen is None:
            raise TestBeforeFreeze("the test split is loaded only after the validation choices are frozen")
        self.log.append("test")
        return self._sets("test")

"""Run ``loopus ARGS`` in this process and act at the N-th call of one function: the seam of the signal and
concurrency tests (no test hook lives in the library).

    python tests/signal_driver.py loopus_convert.convert:_copy_range:10:block convert MODEL --out OUT ...

At the N-th call of ``module:function`` (before it runs), the driver

* ``block``: writes its pid to the file ``$LOOPUS_TEST_READY`` and waits for a signal (what the test sends);
* ``term``: sends itself SIGTERM;
* ``kill``: sends itself SIGKILL (nothing can clean up; the next run must).

The trainer's tests can use it as well (e.g. ``loopus_train.state:write_safetensors:1:block``).
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import time
from pathlib import Path


def _act(action: str) -> None:
    if action == "block":
        Path(os.environ["LOOPUS_TEST_READY"]).write_text(str(os.getpid()))
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            time.sleep(0.1)  # a signal's handler runs here
        raise SystemExit("signal_driver: no signal came within 300 s")
    os.kill(os.getpid(), {"term": signal.SIGTERM, "kill": signal.SIGKILL}[action])
    time.sleep(1)  # the handler (or the kernel) acts before this returns


def main() -> None:
    module_name, name, count, action = sys.argv[1].split(":")
    module = importlib.import_module(module_name)
    real = getattr(module, name)
    calls = [0]

    def patched(*args, **kwargs):
        calls[0] += 1
        if calls[0] == int(count):
            _act(action)
        return real(*args, **kwargs)

    setattr(module, name, patched)
    from loopus.cli import main as cli

    sys.argv = ["loopus", *sys.argv[2:]]
    cli()


if __name__ == "__main__":
    main()

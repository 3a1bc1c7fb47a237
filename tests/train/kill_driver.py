"""Run ``loopus ARGS`` in this process and SIGKILL it at one point of one checkpoint write: the seam of the
resume tests (no test hook lives in the trainer itself).

    python tests/train/kill_driver.py after-save:4 finetune CKPT --out RUN ...
    python tests/train/kill_driver.py mid-save:4 finetune CKPT --out RUN ...

``mid-save:N``: the looped model files of checkpoint N are written, its trainer state is not;
``after-save:N``: checkpoint N is complete and in place.
"""

from __future__ import annotations

import os
import signal
import sys


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    point, step = sys.argv[1].split(":")
    step = int(step)
    from loopus_train import state, train

    if point == "mid-save":
        real_save = state.TrainState.save

        def save(self, directory):
            if self.step == step:
                _kill()
            return real_save(self, directory)

        state.TrainState.save = save
    elif point == "after-save":
        real_checkpoint = train.save_checkpoint

        def save_checkpoint(out, model, tokenizer, train_state, *args):
            path = real_checkpoint(out, model, tokenizer, train_state, *args)
            if train_state.step == step:
                _kill()
            return path

        train.save_checkpoint = save_checkpoint
    else:
        raise SystemExit(f"unknown kill point {point!r}")
    from loopus.cli import main as cli

    sys.argv = ["loopus", *sys.argv[2:]]
    cli()


if __name__ == "__main__":
    main()

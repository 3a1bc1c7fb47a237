"""The split notation ``A:B``: one small value object, parsed and validated in one place.

``A:B`` is a Python slice of the decoder-layer list: encoder = layers[0:A], loop block = layers[A:B],
decoder = layers[B:L]. ``4:20`` on a 24-layer model loops layers 4..19. ``0 <= A < B <= L``; A = 0 means the
encoder is the embeddings alone, B = L means the decoder is the final norm and lm_head alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from loopus_core.errors import LoopusError

_SPLIT = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pair(text: str) -> tuple[int, int] | None:
    """``"A:B"`` -> ``(A, B)`` (two non-negative integers), or None when the text is not of that form."""
    match = _SPLIT.match(str(text))
    return None if match is None else (int(match.group(1)), int(match.group(2)))


@dataclass(frozen=True, order=True)
class LayerSplit:
    """Encoder ``[0, start)``, loop block ``[start, end)``, decoder ``[end, num_layers)``."""

    start: int
    end: int
    num_layers: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end <= self.num_layers:
            raise LoopusError(
                f"split {self.start}:{self.end} is out of range for a model with {self.num_layers} layers: "
                f"need 0 <= A < B <= {self.num_layers} (A:B loops layers A..B-1)"
            )

    @classmethod
    def parse(cls, text: str, num_layers: int) -> LayerSplit:
        """Parse ``"A:B"`` for a model with ``num_layers`` decoder layers; a one-line error otherwise."""
        pair = parse_pair(text)
        if pair is None:
            raise LoopusError(
                f"--split {text!r} is malformed: write A:B (a Python slice of the {num_layers} decoder "
                f"layers, e.g. 2:{max(num_layers - 2, 3)}), or auto"
            )
        start, end = pair
        if start >= end:
            raise LoopusError(f"--split {text}: A must be smaller than B (the loop block is layers A..B-1)")
        return cls(start, end, num_layers)

    def __str__(self) -> str:
        return f"{self.start}:{self.end}"

    @property
    def encoder(self) -> range:
        return range(0, self.start)

    @property
    def loop(self) -> range:
        return range(self.start, self.end)

    @property
    def decoder(self) -> range:
        return range(self.end, self.num_layers)

    @property
    def loop_size(self) -> int:
        return self.end - self.start

    def describe(self) -> str:
        """The three parts in words: ``encoder 0..1, loop 2..5, decoder 6..7`` (an empty encoder is the
        embeddings alone, an empty decoder the final norm and lm_head alone)."""
        encoder = f"encoder 0..{self.start - 1}" if self.start else "encoder: embeddings only"
        decoder = (
            f"decoder {self.end}..{self.num_layers - 1}" if self.end < self.num_layers
            else "decoder: final norm and lm_head only"
        )
        return f"{encoder}, loop {self.start}..{self.end - 1}, {decoder}"

    def layers_at(self, num_loops: int) -> int:
        """Decoder layers applied by one forward pass at ``num_loops`` loops: A + K (B - A) + L - B."""
        return self.start + num_loops * self.loop_size + self.num_layers - self.end

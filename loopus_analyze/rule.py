"""The recommendation rule: which block to loop, read from the repeat-cost map of the selection text.

The trade. A longer loop block gives every pass more layers to refine with; a block whose second pass
costs more (its *repeat cost*: the held-out NLL increase, in nats per token, when it runs twice before any
training) gives fine-tuning more to undo. In the splits tried on the embedded model, the order of the
repeat costs before training was the order of the held-out perplexities after it
(``reading/split-vs-training.md``). The rule makes the trade with one number, a budget in nats::

    length  n* = the longest allowed length whose cheapest block repeats within the budget
    block   A* = argmin_A cost(A, A + n*)          (the cheapest placement of that length)

Lengths are *useful* ones: at least a quarter of the layers (:func:`useful_length`), since a loop block of
a ninth of the model gives latent refinement little depth to work with. ``--loop-layers N`` fixes the
length (then only the cheapest placement is chosen, and a budget applies only when given explicitly);
``--loop-layers N-M`` sets the lengths instead; ``--repeat-budget`` sets the budget. When neither is given
and no useful length meets the default budget (repeat costs sit at different levels on different models),
the cheapest block of the shortest useful length is taken, and the report says by how much it exceeds the
budget and shows the cost-versus-length curve; when either is given, that is a one-line error instead.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from loopus_analyze.similarity import MIN_DECODER_LAYERS, MIN_ENCODER_LAYERS, MIN_LOOP_LAYERS
from loopus_core.checks import check_float
from loopus_core.errors import LoopusError

DEFAULT_REPEAT_BUDGET = 0.25  # nats per token (see README "How the split is chosen")
USEFUL_SHARE = 0.25  # of the layers: the shortest loop block the default rule recommends
_LENGTHS = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def loop_lengths(num_layers: int) -> tuple[int, int]:
    """The block lengths a split of ``num_layers`` layers allows (encoder and decoder keep their minimum)."""
    return MIN_LOOP_LAYERS, num_layers - MIN_ENCODER_LAYERS - MIN_DECODER_LAYERS


def useful_length(num_layers: int) -> int:
    """The shortest loop block the default rule considers: a quarter of the layers, rounded up."""
    low, high = loop_lengths(num_layers)
    return min(high, max(low, math.ceil(USEFUL_SHARE * num_layers)))


def parse_loop_layers(text: str | None) -> tuple[int, int] | None:
    """``"N"`` -> (N, N), ``"N-M"`` -> (N, M); None stays None; anything else is a one-line error."""
    if text is None:
        return None
    match = _LENGTHS.match(str(text))
    if match is None:
        raise LoopusError(f"--loop-layers {text!r} is malformed: write N or N-M (loop block lengths, in "
                          "layers)")
    low = int(match.group(1))
    high = int(match.group(2)) if match.group(2) is not None else low
    if low > high:
        raise LoopusError(f"--loop-layers {text}: the range N-M needs N <= M")
    return low, high


def check_repeat_budget(value: float | None) -> float | None:
    """A repeat budget in nats: a finite number >= 0, or None (the default)."""
    return None if value is None else check_float(value, "--repeat-budget", 0.0)


@dataclass(frozen=True)
class Rule:
    """The rule with its parameters, resolved for one model."""

    num_layers: int
    budget: float
    lengths: tuple[int, int]  # allowed loop block lengths, inclusive
    budget_given: bool
    lengths_given: bool

    @classmethod
    def make(cls, num_layers: int, loop_layers: str | None = None,
             repeat_budget: float | None = None) -> Rule:
        """Resolve the options for a model of ``num_layers`` layers; a length it cannot hold is an error."""
        allowed = loop_lengths(num_layers)
        lengths = parse_loop_layers(loop_layers)
        budget = check_repeat_budget(repeat_budget)
        if lengths is not None and (lengths[0] < allowed[0] or lengths[1] > allowed[1]):
            raise LoopusError(
                f"--loop-layers {loop_layers} leaves no valid split of this {num_layers}-layer model: loop "
                f"blocks have {allowed[0]}..{allowed[1]} layers (encoder and decoder keep at least "
                f"{MIN_ENCODER_LAYERS} and {MIN_DECODER_LAYERS})"
            )
        default = (useful_length(num_layers), allowed[1])
        return cls(num_layers, DEFAULT_REPEAT_BUDGET if budget is None else budget, lengths or default,
                   budget is not None, lengths is not None)

    @property
    def fixed_length(self) -> bool:
        return self.lengths_given and self.lengths[0] == self.lengths[1]

    def sentence(self) -> str:
        """The rule in one sentence, with its parameters."""
        if self.fixed_length and not self.budget_given:
            return (f"the {self.lengths[0]}-layer loop block (--loop-layers {self.lengths[0]}) that repeats "
                    "most cheaply on the selection text")
        allowed = (f"{self.lengths[0]}-{self.lengths[1]} layers allowed" if self.lengths_given else
                   f"{self.lengths[0]}-{self.lengths[1]} layers: a quarter of the model or more")
        fallback = ("" if self.lengths_given or self.budget_given else
                    f"; if none does, the cheapest {self.lengths[0]}-layer block")
        return (
            f"the longest loop block ({allowed}) whose cheapest placement repeats within {self.budget:.2f} "
            "nats per token (held-out NLL increase when the block runs twice, on the selection text), placed "
            f"where that cost is lowest{fallback}: a longer block gives each pass more layers, a costlier "
            "one gives fine-tuning more to undo"
        )

    def to_json(self) -> dict:
        return {"sentence": self.sentence(), "budget_nats": self.budget, "lengths": list(self.lengths),
                "budget_given": self.budget_given, "lengths_given": self.lengths_given}


def cheapest_per_length(costs: np.ndarray, lengths: tuple[int, int]) -> dict[int, tuple[int, float]]:
    """Length n -> (start, cost) of the cheapest measured block ``A:A+n`` in the [A, B] grid ``costs``
    (ties go to the earlier start)."""
    out: dict[int, tuple[int, float]] = {}
    size = costs.shape[0]
    for n in range(lengths[0], lengths[1] + 1):
        starts = [a for a in range(size - n) if np.isfinite(costs[a, a + n])]
        if starts:
            best = min(starts, key=lambda a: (costs[a, a + n], a))
            out[n] = (best, float(costs[best, best + n]))
    return out


@dataclass(frozen=True)
class Choice:
    """The chosen block and what the rule read to choose it (selection text)."""

    start: int
    end: int
    fallback: bool  # no useful length met the default budget: the cheapest block of the shortest one
    cheapest: dict[int, tuple[int, float]]  # length -> (start, selection cost)

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def split(self) -> str:
        return f"{self.start}:{self.end}"

    def excess(self, budget: float) -> float:
        """How far the chosen block's selection cost is above ``budget`` (<= 0 when within)."""
        return self.cheapest[self.length][1] - budget


def choose(rule: Rule, costs: np.ndarray) -> Choice:
    """Apply ``rule`` to the selection text's repeat costs ``costs`` ([A, B] grid, NaN where invalid)."""
    cheapest = cheapest_per_length(costs, rule.lengths)
    if not cheapest:
        raise ValueError("the repeat-cost map holds no block of an allowed length")
    fallback = False
    if rule.fixed_length and not rule.budget_given:
        length = rule.lengths[0]
    else:
        within = [n for n, (_, cost) in cheapest.items() if cost <= rule.budget]
        if within:
            length = max(within)
        elif rule.budget_given or rule.lengths_given:
            n, (a, cost) = min(cheapest.items(), key=lambda item: item[1][1])
            raise LoopusError(
                f"no loop block of {rule.lengths[0]}-{rule.lengths[1]} layers repeats within "
                f"{rule.budget:g} nats: the cheapest is {a}:{a + n} at {cost:+.3f}; raise --repeat-budget "
                "or widen --loop-layers"
            )
        else:
            length, fallback = min(cheapest), True
    start = cheapest[length][0]
    return Choice(start, start + length, fallback, cheapest)

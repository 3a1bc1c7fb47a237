"""What the report says about the chosen block, measured again on the report text, which the rule never saw.

Blocks measured on the report text, in two tiers: the recommendation and its same-length neighbours on
every report window (:func:`core_blocks`, at least ``REPORT_SHARE`` of ``--map-tokens`` predictions, with
the recommendation's deeper repetition), and on the first ``WIDE_WINDOWS`` windows every other block of its
length, the block the race found cheapest for every other allowed length, the blocks the similarity views
would pick (:func:`report_blocks`) and the deeper repetition (the block run 1..4 times) of the cheapest
blocks of the lengths within two layers and of the raw-similarity pick (:func:`leading_blocks`).

Every number comes with a 90% interval from a bootstrap over the report text's documents
(:mod:`loopus_analyze.intervals`); a difference between two blocks gets a paired interval. The
recommendation *is the best of its length within its interval* when no other block of that length repeats
more cheaply with the whole interval of the difference below zero. A difference is read on the documents
both blocks were measured on (blocks beside the core read the first windows only), and it counts as
significant only on ``race.MIN_DOCUMENTS`` documents or more.

Confidence comes from the race's final round on the selection text (:func:`loopus_analyze.race.decide`):
how separated the recommendation is from its neighbours, and whether another length could be the rule's
choice (its stability).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from loopus_analyze.functional import MapSums, PassSums
from loopus_analyze.intervals import DocumentBootstrap, estimate
from loopus_analyze.race import MIN_DOCUMENTS, NEIGHBOUR_SHIFTS
from loopus_analyze.rule import Choice, Rule

WIDE_WINDOWS = 2  # report windows for the blocks the report shows beside the choice and its neighbours
LEADING_LENGTHS = 2  # deeper repetition for the cheapest blocks of lengths within this many of the choice


def report_blocks(rule: Rule, choice: Choice, similarity_picks: dict[str, tuple[int, int]]) -> list:
    """The blocks measured on the first ``WIDE_WINDOWS`` report windows (module docstring): every block of
    the recommendation's length, the cheapest of every other length, the similarity picks; the core blocks
    (:func:`core_blocks`) are left out, they are measured on every window."""
    num_layers = rule.num_layers
    core = set(core_blocks(choice, num_layers))
    blocks = [(a, a + choice.length) for a in range(1, num_layers - choice.length)]
    blocks += [(a, a + n) for n, (a, _) in sorted(choice.cheapest.items())]
    blocks += list(similarity_picks.values())
    return [b for b in dict.fromkeys(tuple(b) for b in blocks) if b not in core]


def core_blocks(choice: Choice, num_layers: int) -> list:
    """The recommendation and its same-length neighbours: measured on every report window."""
    shifted = [(choice.start + d, choice.end + d) for s in NEIGHBOUR_SHIFTS for d in (-s, s)]
    return [(choice.start, choice.end)] + sorted((a, b) for a, b in shifted if a >= 1 and b <= num_layers - 1)


def leading_blocks(choice: Choice, similarity_picks: dict[str, tuple[int, int]]) -> list:
    """The blocks other than the recommendation whose deeper repetition is measured (module docstring)."""
    blocks = []
    for n in range(choice.length - LEADING_LENGTHS, choice.length + LEADING_LENGTHS + 1):
        if n in choice.cheapest and n != choice.length:
            blocks.append((choice.cheapest[n][0], choice.cheapest[n][0] + n))
    if "raw" in similarity_picks:
        blocks.append(tuple(similarity_picks["raw"]))
    return [b for b in dict.fromkeys(blocks) if b != (choice.start, choice.end)]


class _Numbers:
    """Point estimates and resampled means of one held-out text's map, for any grid entry."""

    def __init__(self, sums: MapSums, boot: DocumentBootstrap) -> None:
        self.sums, self.boot = sums, boot
        delta = sums.nll - sums.entry_base
        count = sums.entry_count
        self.resampled = {"delta_nll": boot.means(delta, count), "kl": boot.means(sums.kl, count),
                          "agree": boot.means(sums.agree, count)}
        self.value = {metric: sums.grid(metric) for metric in self.resampled}

    def measured(self, a: int, b: int) -> bool:
        return bool(self.sums.measured[b, a] and self.sums.measured[a, b])

    def entry(self, metric: str, j: int, s: int) -> dict:
        return estimate(self.value[metric][j, s], self.resampled[metric][:, j, s])

    def block(self, a: int, b: int) -> dict:
        """Repeat and skip numbers of the block ``a:b`` with intervals."""
        return {
            "split": f"{a}:{b}", "start": a, "end": b, "length": b - a,
            "repeat": {"delta_nll": self.entry("delta_nll", b, a), "kl": self.entry("kl", b, a),
                       "top1_agreement": self.entry("agree", b, a)},
            "skip": {"delta_nll": self.entry("delta_nll", a, b), "kl": self.entry("kl", a, b)},
        }

    def difference(self, block: tuple[int, int], reference: tuple[int, int]) -> dict:
        """Repeat ΔNLL of ``block`` minus that of ``reference`` on the documents where both were read (the
        report gives blocks different windows), with a paired interval over those documents."""
        (a, b), (x, y) = block, reference
        sums = self.sums
        shared = (sums.entry_count[:, b, a] > 0) & (sums.entry_count[:, y, x] > 0)
        sides = []
        for j, s in ((b, a), (y, x)):
            delta = np.where(shared, sums.nll[:, j, s] - sums.entry_base[:, j, s], 0.0)
            count = np.where(shared, sums.entry_count[:, j, s], 0.0)
            sides.append((delta.sum() / max(count.sum(), 1.0), self.boot.means(delta, count)))
        paired = estimate(sides[0][0] - sides[1][0], sides[0][1] - sides[1][1])
        return paired | {"documents": int(shared.sum())}


def _passes_json(passes: PassSums, boot: DocumentBootstrap) -> list[dict]:
    """Per leading block: ΔNLL, KL and the loop state's relative change at each pass count, with intervals."""
    total = max(float(passes.count.sum()), 1.0)
    delta = passes.nll - passes.base_nll[:, None, None]
    series = {"delta_nll": delta, "kl": passes.kl, "state_change": passes.change}
    resampled = {k: boot.means(v, passes.count) for k, v in series.items()}
    out = []
    for b, (start, end) in enumerate(passes.blocks):
        rows = []
        for k in range(passes.passes):
            row = {"passes": k + 1}
            for name, values in series.items():
                row[name] = estimate(values[:, b, k].sum() / total, resampled[name][:, b, k])
            rows.append(row)
        out.append({"split": f"{start}:{end}", "length": end - start, "passes": rows})
    return out


@dataclass
class Assessment:
    """The recommendation and everything the report shows about it (report text unless said otherwise)."""

    split: str
    confidence: str
    reason: str
    recommended: dict
    same_length: list[dict]
    best_within_interval: bool
    neighbours: list[dict]
    per_length: list[dict]
    deeper: list[dict]
    similarity: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return dict(self.__dict__)


def _same_length(numbers: _Numbers, choice: Choice) -> list[dict]:
    rec = (choice.start, choice.end)
    rows = []
    for a in range(1, numbers.sums.num_layers - choice.length):
        block = (a, a + choice.length)
        if numbers.measured(*block):
            row = numbers.block(*block)
            row["difference"] = numbers.difference(block, rec)
            row["significantly_cheaper"] = (block != rec and row["difference"]["high"] < 0
                                            and row["difference"]["documents"] >= MIN_DOCUMENTS)
            rows.append(row)
    return rows


def assess(rule: Rule, choice: Choice, report: MapSums, passes: list[PassSums],
           similarity_picks: dict[str, tuple[int, int]], confidence: tuple[str, str], *, resamples: int,
           seed: int) -> Assessment:
    """The report text's numbers for the choice, its length, every length and the similarity picks, and the
    race's ``confidence`` (level, why); ``passes``: the deeper repetition, one :class:`PassSums` per tier."""
    boot = DocumentBootstrap.draw(len(report.documents), resamples, seed)
    numbers = _Numbers(report, boot)
    rec = (choice.start, choice.end)
    same = _same_length(numbers, choice)
    neighbours = [row for row in same if abs(row["start"] - choice.start) in NEIGHBOUR_SHIFTS]
    level, why = confidence
    per_length = []
    for n, (a, cost) in sorted(choice.cheapest.items()):
        if numbers.measured(a, a + n):
            per_length.append(numbers.block(a, a + n) | {"selection_delta_nll": cost})
    similarity = []
    for view, block in similarity_picks.items():
        row = numbers.block(*block) | {"view": view, "difference": numbers.difference(tuple(block), rec)}
        similarity.append(row)
    recommended = numbers.block(*rec) | {"selection_delta_nll": choice.cheapest[choice.length][1]}
    best = not any(row["significantly_cheaper"] for row in same)
    reason = _reason(rule, choice, recommended, best, same, why)
    deeper = [row for sums in passes if sums.blocks
              for row in _passes_json(sums, DocumentBootstrap.draw(len(sums.documents), resamples, seed))]
    return Assessment(choice.split, level, reason, recommended, same, best, neighbours, per_length, deeper,
                      similarity)


def _interval_text(e: dict, digits: int = 3) -> str:
    return f"{e['value']:+.{digits}f} [{e['low']:+.{digits}f}, {e['high']:+.{digits}f}]"


def _reason(rule: Rule, choice: Choice, rec: dict, best: bool, same: list[dict], why: str) -> str:
    """Why this block, in a few clauses (the rule itself is stated once, beside it in the report)."""
    repeat = rec["repeat"]["delta_nll"]
    parts = [
        _length_clause(rule, choice),
        f"on the report text it repeats for {_interval_text(repeat)} nats (90% interval), KL "
        f"{rec['repeat']['kl']['value']:.3f}",
    ]
    if best:
        parts.append(f"no {choice.length}-layer block repeats more cheaply there with the interval of the "
                     "difference below 0")
    else:
        cheaper = ", ".join(r["split"] for r in same if r["significantly_cheaper"])
        parts.append(f"{cheaper} repeat(s) more cheaply there with the interval of the difference below 0")
    parts.append(f"confidence: {why}")
    return "; ".join(parts) + "."


def _length_clause(rule: Rule, choice: Choice) -> str:
    """How the rule arrived at this length (the placement is always the cheapest of the length)."""
    if choice.fallback:
        excess = choice.excess(rule.budget)
        return (f"no loop block of {rule.lengths[0]}-{rule.lengths[1]} layers (a quarter of the model or "
                f"more) repeats within {rule.budget:g} nats on the selection text, so the rule takes the "
                f"cheapest {choice.length}-layer block, {excess:+.3f} nats above the budget (see the cost "
                "against length)")
    if rule.fixed_length and not rule.budget_given:
        return f"{choice.split}: the length is fixed by --loop-layers {choice.length}"
    return (f"{choice.split}: {choice.length} of {rule.num_layers} layers is the longest length whose "
            f"cheapest block repeats within {rule.budget:g} nats on the selection text")

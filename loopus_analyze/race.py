"""The race: the repeat-cost map of the selection text, with the compute spent on the splits that can still
be the rule's choice.

Every split the rule may choose (:func:`candidates`) enters round 0 on the first ``ROUND0_WINDOWS`` windows
of the selection text (:func:`loopus_analyze.heldout.windows`: one document per window as long as the
documents last). After each round, with t intervals over the documents read so far (every
survivor read the same windows, so differences are paired), a split leaves the race when it can no longer
be the rule's choice (:func:`eliminate`):

- *placement*: the leader of its length (the cheapest by point estimate) repeats more cheaply, with the
  ``ELIMINATION_LEVEL`` interval of the paired difference above 0;
- *length* (rules with a budget): every block of its length repeats above the budget (interval above it),
  or a longer length surely has a block within it (interval below it), so the rule takes that one instead.
  The shortest length stays while nothing is surely within the budget: it is the default rule's fallback.

The survivors get ``GROWTH`` times as many windows in the next round, up to the windows that hold
``final_tokens`` predictions. A round runs every layer on every position of its windows but scores the head on
every ``HEAD_STRIDE``-th prediction only (the head is a quarter of an entry's time on a 49k vocabulary and
most of it on a 262k one; the intervals that eliminate are over documents, whatever each one holds). When the
next round of every survivor would pass the work cap (``RACE_SHARE`` of what the uniform map of every
candidate at ``final_tokens`` would cost; round 0 always runs), the race *narrows* to each length's leader by
point estimate (:func:`narrow`; the placements left unread are counted) and the leaders go on, the head
scored on every prediction, since they are few and the likely contenders. The race stops when one split is
left (*separated*), when the final round is read, or when even the leaders' next round does not fit the cap.

Then the rule chooses among the survivors (:func:`decide`), and the choice, its same-length neighbours and
the leaders of the other surviving lengths (:func:`length_rivals`: what the rule would take if the length
were decided the other way) are brought to every prediction of the final windows (the rest of the
windows a round sampled, then the windows it did not read); the rule chooses again until its choice's
contenders are all complete. The confidence and the *stability* (:func:`alternatives`: the blocks the final
round does not separate from the choice) are computed from those ``final_tokens`` predictions each.

Work is counted in layer-token units: an entry ``G[j, s]`` on a window of T positions with N scored
predictions costs ``T (L - s) + N H``, H the head's weight count over a layer's (:func:`head_layers`).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import numpy as np

from loopus_analyze.functional import (
    EVERY,
    MapSums,
    Sample,
    documents_of,
    empty_map,
    measure_map,
    prediction_mask,
)
from loopus_analyze.intervals import LEVEL, t_interval
from loopus_analyze.rule import Choice, Rule, cheapest_per_length, choose
from loopus_analyze.similarity import valid_pairs
from loopus_core.models import model_parts
from loopus_core.progress import Progress

log = logging.getLogger(__name__)

ROUND0_WINDOWS = 3  # windows (documents) every candidate reads in round 0
HEAD_STRIDE = 4  # race rounds score every 4th prediction past the warm-up; the contenders get the rest
ROUND_SAMPLE = Sample(HEAD_STRIDE)
GROWTH = 2  # each round gives the survivors this many times the windows of the last
RACE_SHARE = 1 / 5  # work cap of the race, against the uniform map of every candidate at final_tokens
ELIMINATION_LEVEL = 0.98  # intervals that take a split out of the race (two-sided)
MIN_DOCUMENTS = 3  # fewer documents give no interval: nothing is eliminated, the confidence is low
DECIDE_ATTEMPTS = 6  # choose, complete the contenders, choose again: at most this many times
NEIGHBOUR_SHIFTS = (1, 2)  # same-length blocks starting this many layers away: the confidence compares them


@dataclass
class Round:
    """One round of the race (``windows``/``tokens``: what each entrant had read after it)."""

    index: int
    entered: int
    windows: int
    documents: int
    tokens: int
    survivors: int
    out_placement: int
    out_length: int
    work: float
    narrowed: int = 0  # placements left unread when the race narrowed to each length's leader (work cap)


@dataclass
class Race:
    """The race's map of the selection text and its bookkeeping (``analysis.json``'s ``race``)."""

    sums: MapSums
    candidates: list[tuple[int, int]]
    survivors: list[tuple[int, int]]
    rounds: list[Round]
    cap: float
    uniform_work: float
    work: float = 0.0
    stop: str = ""
    final_tokens: int = 0
    final_windows: int = 0
    window_lengths: list[int] = field(default_factory=list)
    windows_read: dict[tuple[int, int], int] = field(default_factory=dict)  # by the rounds
    sampled: dict[tuple[int, int], int] = field(default_factory=dict)  # the first windows, head sampled
    complete: set[tuple[int, int]] = field(default_factory=set)  # every prediction of the final windows
    verdicts: dict[int, str] = field(default_factory=dict)  # length -> why its leader won or it left
    contenders: list[tuple[int, int]] = field(default_factory=list)
    narrowed: dict[int, int] = field(default_factory=dict)  # length -> placements left at the narrowing
    alternatives: list[dict] = field(default_factory=list)  # what the choice is not separated from

    @property
    def stable(self) -> bool:
        """No alternative the final round could not separate from the choice."""
        return not self.alternatives

    def stability_json(self) -> dict:
        """``analysis.json``'s ``decision.stability``: whether the final round separates the choice from
        every block the rule would take instead, those blocks, and the sentence the report shows."""
        return {"stable": self.stable, "alternatives": self.alternatives,
                "sentence": stability_sentence(self)}

    @property
    def window(self) -> int:
        """Tokens per window (BOS included): the longest window the race read."""
        return max((int(b) for b in self.window_lengths), default=0)

    @property
    def separated(self) -> bool:
        return len(self.survivors) == 1

    def to_json(self) -> dict:
        tokens = self.sums.entry_tokens()
        return {
            "rounds": [asdict(r) for r in self.rounds], "candidates": len(self.candidates),
            "survivors": [f"{a}:{b}" for a, b in self.survivors], "separated": self.separated,
            "stop": self.stop, "work": self.work, "work_cap": self.cap, "uniform_work": self.uniform_work,
            "final_tokens_asked": self.final_tokens, "window": self.window,
            "contenders": {f"{a}:{b}": int(tokens[b, a]) for a, b in self.contenders},
            "tokens_per_split": {f"{a}:{b}": int(tokens[b, a]) for a, b in self.candidates},
            "leaders": {str(n): why for n, why in sorted(self.verdicts.items())},
            "narrowed": {str(n): k for n, k in sorted(self.narrowed.items())},
            "settings": {"round0_windows": ROUND0_WINDOWS, "growth": GROWTH, "race_share": RACE_SHARE,
                         "elimination_level": ELIMINATION_LEVEL, "interval": "t over documents",
                         "head_stride": HEAD_STRIDE},
        }


def candidates(rule: Rule) -> list[tuple[int, int]]:
    """Every valid split whose length the rule allows."""
    low, high = rule.lengths
    return [(a, b) for a, b in valid_pairs(rule.num_layers).tolist() if low <= b - a <= high]


def head_layers(parts) -> float:
    """The head's weight count in layers' worth (the unit of the race's work)."""
    layer = sum(p.numel() for p in parts.layers[0].parameters())
    return parts.lm_head.weight.numel() / max(layer, 1)


def work(batches, blocks, num_layers: int, head: float, warmup: int, sample: Sample = EVERY) -> float:
    """Layer-token units of running ``blocks`` twice on ``batches``, scoring what ``sample`` keeps (see the
    module docstring)."""
    total = 0.0
    for batch in batches:
        positions = int(batch.attention_mask[:, :-1].sum())
        scored = int(prediction_mask(batch.attention_mask, warmup, sample).sum())
        total += sum(positions * (num_layers - a) + scored * head for a, _ in blocks)
    return total


def schedule(batches, final_tokens: int, warmup: int) -> list[int]:
    """Cumulative windows after each round: ``ROUND0_WINDOWS``, then ``GROWTH`` times more, up to the
    first prefix holding ``final_tokens`` predictions (or every window)."""
    scored = np.cumsum([int(prediction_mask(b.attention_mask, warmup).sum()) for b in batches])
    last = int(np.searchsorted(scored, final_tokens) + 1) if len(scored) else 0
    last = min(last, len(batches))
    rounds = [min(ROUND0_WINDOWS, last)]
    while rounds[-1] < last:
        rounds.append(min(rounds[-1] * GROWTH, last))
    return rounds


class _Intervals:
    """Repeat costs of the live splits over the documents read so far, with t intervals over documents
    (:func:`loopus_analyze.intervals.t_interval`); every live split was scored on the same predictions, so a
    difference is paired."""

    def __init__(self, sums, blocks) -> None:
        counts = np.stack([sums.entry_count[:, b, a] for a, b in blocks], axis=1)  # (D, n)
        docs = counts.sum(axis=1) > 0
        delta = np.stack([sums.nll[:, b, a] - sums.entry_base[:, b, a] for a, b in blocks], axis=1)
        self.delta, self.counts = delta[docs], counts[docs]
        self.value = delta.sum(axis=0) / np.maximum(counts.sum(axis=0), 1.0)
        self.index = {block: i for i, block in enumerate(blocks)}
        self.documents = int(docs.sum())

    def bounds(self, block, level: float = ELIMINATION_LEVEL) -> tuple[float, float]:
        i = self.index[block]
        _, low, high = t_interval(self.delta[:, i], self.counts[:, i], level)
        return low, high

    def difference_low(self, block, leader, level: float = ELIMINATION_LEVEL) -> float:
        i, k = self.index[block], self.index[leader]
        return t_interval(self.delta[:, i] - self.delta[:, k], self.counts[:, i], level)[1]


def eliminate(rule: Rule, alive: list, stats: _Intervals, verdicts: dict, round_index: int,
              narrowed: dict[int, int] | None = None) -> tuple[list, int, int]:
    """The splits that can still be the rule's choice, and how many left by placement / by length
    (``narrowed``: length -> placements the race stopped reading at the work cap, for the verdicts)."""
    if stats.documents < MIN_DOCUMENTS:
        for n in {b - a for a, b in alive}:
            verdicts[n] = (f"not separated: {stats.documents} document(s) read, an interval needs "
                           f"{MIN_DOCUMENTS}")
        return list(alive), 0, 0
    by_length: dict[int, list] = {}
    for block in alive:
        by_length.setdefault(block[1] - block[0], []).append(block)
    kept: dict[int, list] = {}
    out_placement = 0
    for n, blocks in by_length.items():
        leader = min(blocks, key=lambda blk: (stats.value[stats.index[blk]], blk))
        kept[n] = [blk for blk in blocks if blk == leader or stats.difference_low(blk, leader) <= 0]
        out_placement += len(blocks) - len(kept[n])
        verdicts[n] = (f"{leader[0]}:{leader[1]} leads ({stats.value[stats.index[leader]]:+.3f} nats, "
                       f"round {round_index}); " + _placement_verdict(len(kept[n]), (narrowed or {}).get(n)))
    lengths = _lengths_left(rule, kept, stats, verdicts, round_index)
    survivors = sorted(blk for n in lengths for blk in kept[n])
    return survivors, out_placement, sum(len(kept[n]) for n in kept if n not in lengths)


def _placement_verdict(kept: int, narrowed: int | None) -> str:
    """Why the leader of a length leads its placements."""
    if narrowed:
        return (f"chosen among its placements by point estimate: the race narrowed to each length's leader "
                f"at the work cap, {narrowed} other placement(s) not separated from it left unread")
    if kept == 1:
        return (f"every other placement repeats more expensively, paired {ELIMINATION_LEVEL:.0%} interval "
                "above 0")
    return f"{kept - 1} other placement(s) not separated from it"


def _lengths_left(rule: Rule, kept: dict, stats: _Intervals, verdicts: dict, round_index: int,
                  ) -> list[int]:
    """The lengths whose cheapest block can still be the rule's choice (see the module docstring)."""
    if rule.fixed_length and not rule.budget_given:
        return list(kept)
    bounds = {n: [stats.bounds(blk) for blk in blocks] for n, blocks in kept.items()}
    within = [n for n, b in bounds.items() if min(high for _, high in b) <= rule.budget]
    over = {n for n, b in bounds.items() if min(low for low, _ in b) > rule.budget}
    floor = max(within) if within else None
    fallback = None if (within or rule.budget_given or rule.lengths_given) else min(kept)
    left = [n for n in kept if (floor is None or n >= floor) and (n not in over or n == fallback)]
    if not left:  # every length is over a given budget: keep the cheapest for the error message
        left = [min(kept, key=lambda n: min(low for low, _ in bounds[n]))]
    for n in kept:
        if n not in left:
            shorter = floor is not None and n < floor
            why = (f"a longer length surely repeats within {rule.budget:g} nats" if shorter else
                   f"every placement repeats above {rule.budget:g} nats ({ELIMINATION_LEVEL:.0%} interval)")
            verdicts[n] = f"length out in round {round_index}: {why}; " + verdicts[n]
    return sorted(left)


def run_race(model, rule: Rule, batches: list, *, final_tokens: int, warmup: int,
             progress: Progress | None = None) -> Race:
    """The race on the selection text's one-window ``batches`` (see the module docstring)."""
    parts = model_parts(model)
    entrants = candidates(rule)
    rounds = schedule(batches, final_tokens, warmup)
    uniform = work(batches[:rounds[-1]], entrants, parts.num_layers, head_layers(parts), warmup)
    race = Race(empty_map(parts.num_layers, documents_of(batches)), entrants,
                entrants, [], RACE_SHARE * uniform, uniform, final_tokens=final_tokens,
                final_windows=rounds[-1], window_lengths=[b.input_ids.shape[1] for b in batches])
    alive, read, stats, sample = list(entrants), 0, None, ROUND_SAMPLE
    head = head_layers(parts)
    race.stop = f"the last round read {rounds[-1]} windows, the final budget of predictions"
    for index, windows in enumerate(rounds):
        cost = work(batches[read:windows], alive, parts.num_layers, head, warmup, sample)
        narrowed = 0
        if index > 0 and race.work + cost > race.cap:
            leaders = narrow(alive, stats)
            cost = work(batches[read:windows], leaders, parts.num_layers, head, warmup, EVERY)
            if len(leaders) == len(alive) or race.work + cost > race.cap:
                race.stop = (f"round {index} ({len(alive)} splits x {windows} windows) would pass the work "
                             f"cap ({race.cap:.3g} layer-tokens, {RACE_SHARE:.2g} of the uniform map)")
                break
            _note_narrowing(race, alive, leaders)
            narrowed, alive, sample = len(alive) - len(leaders), leaders, EVERY
        _measure(model, race, batches, (read, windows), alive, (warmup, sample), progress,
                 f"race round {index}")
        read = windows
        stats = _Intervals(race.sums, alive)
        entered = len(alive) + narrowed
        alive, by_place, by_length = eliminate(rule, alive, stats, race.verdicts, index, race.narrowed)
        tokens = int(race.sums.entry_tokens()[alive[0][1], alive[0][0]])
        race.rounds.append(Round(index, entered, windows, stats.documents, tokens, len(alive), by_place,
                                 by_length, cost, narrowed))
        race.survivors = alive
        if len(alive) == 1:
            race.stop = f"one split left after round {index}: separated"
            break
    return race


def narrow(alive: list, stats: _Intervals) -> list[tuple[int, int]]:
    """Each length's leader (the cheapest by point estimate): what the race goes on with when the next
    round of every survivor would pass the work cap."""
    leaders: dict[int, tuple[int, int]] = {}
    for block in sorted(alive, key=lambda blk: (stats.value[stats.index[blk]], blk)):
        leaders.setdefault(block[1] - block[0], block)
    return sorted(leaders.values())


def _note_narrowing(race: Race, alive: list, leaders: list) -> None:
    """Count, per length, the placements the narrowing leaves unread."""
    for n in {b - a for a, b in leaders}:
        left = sum(1 for a, b in alive if b - a == n) - 1
        if left:
            race.narrowed[n] = left


def _measure(model, race: Race, batches: list, span: tuple[int, int], blocks: list,
             scoring: tuple[int, Sample], progress, label: str) -> None:
    """Run ``blocks`` twice on ``batches[span]`` scoring the predictions ``scoring`` (warm-up, sample)
    keeps, add the sums to the race's map and count the work. Windows read from ``lo`` on (not a sampled
    read's rest) are recorded as read, and as sampled when the head was."""
    (lo, hi), (warmup, sample) = span, scoring
    if hi <= lo or not blocks:
        return
    sums, _ = measure_map(model, batches[lo:hi], entries=[(b, a) for a, b in blocks], passes=1,
                          documents=race.sums.documents, warmup=warmup, sample=sample, progress=progress,
                          label=label)
    race.sums.add(sums)
    parts = model_parts(model)
    race.work += work(batches[lo:hi], blocks, parts.num_layers, head_layers(parts), warmup, sample)
    if not sample.rest:  # a round's read, or the completion's read of the windows no round read
        for blk in blocks:
            race.windows_read[blk] = hi
            if sample == ROUND_SAMPLE:
                race.sampled[blk] = hi


def _complete(model, race: Race, batches: list, blocks: list, warmup: int, progress) -> None:
    """Bring ``blocks`` to every prediction of the final windows: the predictions the rounds left out of
    the windows they read with the head sampled, then the windows they did not read."""
    label = "race: the choice and its neighbours to the final windows"
    reads = {blk: (race.sampled.get(blk, 0), race.windows_read.get(blk, 0)) for blk in blocks}
    for sampled, read in sorted(set(reads.values())):
        group = [blk for blk in blocks if reads[blk] == (sampled, read)]
        _measure(model, race, batches, (0, sampled), group, (warmup, ROUND_SAMPLE.others()), progress, label)
        _measure(model, race, batches, (read, race.final_windows), group, (warmup, EVERY), progress, label)
        race.complete.update(group)


def _survivor_costs(race: Race) -> np.ndarray:
    """The selection costs of the survivors only ([A, B] grid, NaN elsewhere): what the rule chooses from."""
    costs = race.sums.repeat("delta_nll")
    keep = np.zeros(costs.shape, dtype=bool)
    for a, b in race.survivors:
        keep[a, b] = True
    return np.where(keep, costs, np.nan)


def neighbours(choice: Choice, entrants: list) -> list[tuple[int, int]]:
    """The same-length blocks starting ``NEIGHBOUR_SHIFTS`` layers from the choice, among the entrants."""
    shifted = [(choice.start + d, choice.end + d) for s in NEIGHBOUR_SHIFTS for d in (-s, s)]
    return sorted(blk for blk in shifted if blk in set(entrants))


def length_rivals(rule: Rule, race: Race, choice: Choice) -> list[tuple[int, int]]:
    """The leader of every other surviving length: the blocks the rule would take instead if the choice's
    length were decided the other way. None when the length is fixed or the rule fell back to the shortest
    length. (Where the race narrowed, the leaders read the final windows already.)"""
    if choice.fallback or (rule.fixed_length and not rule.budget_given):
        return []
    costs = _survivor_costs(race)
    lengths = sorted({b - a for a, b in race.survivors} - {choice.length})
    best = cheapest_per_length(costs, rule.lengths)
    return [(best[n][0], best[n][0] + n) for n in lengths if n in best]


def decide(model, rule: Rule, race: Race, batches: list, *, warmup: int,
           progress: Progress | None = None) -> tuple[Choice, str, str]:
    """The rule's choice among the survivors, with it, its same-length neighbours and the leaders of the
    other surviving lengths brought to the final windows (every prediction), and the confidence and the
    alternatives computed from them: ``(choice, confidence, why)``."""
    for _ in range(DECIDE_ATTEMPTS):  # completed blocks keep their costs: the choice settles
        choice = choose(rule, _survivor_costs(race))
        race.contenders = [(choice.start, choice.end), *neighbours(choice, race.candidates),
                           *length_rivals(rule, race, choice)]
        missing = [blk for blk in race.contenders if blk not in race.complete]
        if not missing:
            break
        _complete(model, race, batches, missing, warmup, progress)
    everything = cheapest_per_length(race.sums.repeat("delta_nll"), rule.lengths)
    everything[choice.length] = choice.cheapest[choice.length]
    choice = Choice(choice.start, choice.end, choice.fallback, everything)
    race.alternatives = alternatives(rule, race, choice)
    confidence, why = _confidence(rule, race, choice)
    return choice, confidence, why


def alternatives(rule: Rule, race: Race, choice: Choice) -> list[dict]:
    """The blocks the selection text does not separate from the choice (paired 90% t intervals over the
    documents of the final windows for the contenders; the race's own verdict for the lengths still in it):
    a same-length neighbour whose difference interval reaches 0, a longer length's leader whose cost
    interval reaches the budget (the rule would take it), a shorter one whose interval reaches the budget
    when the choice's own interval passes it."""
    pick = (choice.start, choice.end)
    stats = _Intervals(race.sums, [blk for blk in race.contenders if blk in race.complete])
    tokens, costs = race.sums.entry_tokens(), race.sums.repeat("delta_nll")
    _, pick_high = stats.bounds(pick, LEVEL)
    out = []

    def add(block, why):
        out.append({"split": f"{block[0]}:{block[1]}", "length": block[1] - block[0], "why": why,
                    "delta_nll": float(costs[block]),
                    "tokens": int(tokens[block[1], block[0]])})

    for blk in [blk for blk in race.contenders[1:] if blk in stats.index]:
        n = blk[1] - blk[0]
        if n == choice.length:
            low = stats.difference_low(blk, pick, LEVEL)
            if low <= 0:
                add(blk, f"same length, the paired 90% interval of the difference reaches {low:+.3f}")
        elif n > choice.length and (low := stats.bounds(blk, LEVEL)[0]) <= rule.budget:
            add(blk, f"a longer block whose 90% interval reaches the budget (from {low:+.3f})")
        elif n < choice.length and pick_high > rule.budget and stats.bounds(blk, LEVEL)[0] <= rule.budget:
            add(blk, f"a shorter block within the budget's reach: the choice's own 90% interval passes the "
                     f"budget ({pick_high:+.3f})")
    if not (choice.fallback or (rule.fixed_length and not rule.budget_given)):
        compared = {blk[1] - blk[0] for blk in race.contenders}
        for n, (a, _) in sorted(cheapest_per_length(_survivor_costs(race), rule.lengths).items()):
            if n not in compared and (n > choice.length or pick_high > rule.budget):
                add((a, a + n), f"its length is still in the race (not eliminated at the "
                                f"{ELIMINATION_LEVEL:.0%} level): the rule can take it on another text")
    return out


def stability_sentence(race: Race) -> str:
    """The stability of the choice in one sentence (the report and the CLI show it)."""
    if not race.contenders:
        return ""
    pick = "{}:{}".format(*race.contenders[0])
    if race.stable:
        return (f"stable: the final round separates {pick} from every block the rule would take instead "
                "(paired 90% intervals over documents)")
    names = ", ".join(f"{a['split']} ({a['length']} layers, {a['delta_nll']:+.3f})"
                      for a in race.alternatives)
    return (f"unstable: the selection text does not separate {pick} from {names}; another selection text "
            "(--seed, --data) or a larger --map-tokens can pick one of them")


def _confidence(rule: Rule, race: Race, choice: Choice) -> tuple[str, str]:
    """high / medium / low from the final round: the choice against its neighbours (paired 90% intervals
    over the documents of the final windows) and whether another length is among the alternatives."""
    pick = (choice.start, choice.end)
    stats = _Intervals(race.sums, race.contenders)
    tokens = int(race.sums.entry_tokens()[pick[1], pick[0]])
    value = {blk: stats.value[stats.index[blk]] for blk in race.contenders}
    rows = [(f"{a}:{b}", stats.difference_low((a, b), pick, LEVEL), value[(a, b)] - value[pick])
            for a, b in race.contenders[1:] if b - a == choice.length]
    lengths = sorted({alt["length"] for alt in race.alternatives} - {choice.length})
    settled = not lengths or (rule.fixed_length and not rule.budget_given)
    where = f"on {tokens} selection predictions from {stats.documents} documents (final round)"
    listed = ", ".join(map(str, lengths))
    open_lengths = ("" if settled else f"; the final round does not settle lengths {listed} against the "
                    f"budget ({race.stop})")
    names = ", ".join(name for name, _, _ in rows) or "none"
    if stats.documents < MIN_DOCUMENTS:
        return "low", (f"only {stats.documents} document(s) of selection text were read ({tokens} "
                       f"predictions): an interval needs {MIN_DOCUMENTS}; raise --map-tokens or give more "
                       "text with --data")
    if choice.fallback:
        return "low", (f"the rule fell back: no length of a quarter of the layers or more repeats within "
                       f"{rule.budget:g} nats {where}")
    if all(low > 0 for _, low, _ in rows) and settled and race.stable:
        return "high", (f"every neighbour ({names}) repeats more expensively, paired 90% intervals above 0, "
                        f"{where}, and every other length is settled against the budget")
    if all(value > 0 for _, _, value in rows):
        return "medium", (f"every neighbour ({names}) repeats more expensively {where}"
                          + (", but not every paired interval clears 0" if any(low <= 0 for _, low, _ in rows)
                             else "") + open_lengths)
    cheaper = ", ".join(name for name, _, value in rows if value <= 0)
    return "low", (f"neighbour(s) {cheaper} repeat as cheaply or more cheaply {where}: the race could not "
                   f"separate them within its budget ({race.stop}){open_lengths}")

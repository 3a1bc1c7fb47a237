"""The recommendation rule on synthetic repeat-cost maps: the trade, the options, the errors."""

from __future__ import annotations

import numpy as np
import pytest

from loopus_analyze.rule import (
    DEFAULT_REPEAT_BUDGET,
    Rule,
    cheapest_per_length,
    choose,
    loop_lengths,
    parse_loop_layers,
    useful_length,
)
from loopus_analyze.similarity import valid_pairs
from loopus_core.errors import LoopusError

LAYERS = 12


def costs_grid(num_layers: int, cost) -> np.ndarray:
    """[A, B] grid with ``cost(a, b)`` at every valid split, NaN elsewhere."""
    grid = np.full((num_layers + 1, num_layers + 1), np.nan)
    for a, b in valid_pairs(num_layers).tolist():
        grid[a, b] = cost(a, b)
    return grid


def test_parse_loop_layers():
    assert parse_loop_layers(None) is None
    assert parse_loop_layers("8") == (8, 8)
    assert parse_loop_layers(" 6 - 10 ") == (6, 10)
    for bad in ("", "a", "6:10", "-3", "4-"):
        with pytest.raises(LoopusError, match="malformed"):
            parse_loop_layers(bad)
    with pytest.raises(LoopusError, match="N <= M"):
        parse_loop_layers("9-4")


def test_rule_options_are_checked_against_the_model():
    assert loop_lengths(30) == (2, 28)
    rule = Rule.make(30)
    assert rule.lengths == (8, 28) and rule.budget == DEFAULT_REPEAT_BUDGET  # a quarter of 30 layers, up
    assert useful_length(30) == 8 and useful_length(18) == 5 and useful_length(8) == 2
    assert not rule.budget_given and not rule.lengths_given
    for bad in ("29", "1", "1-5", "20-29"):
        with pytest.raises(LoopusError, match="leaves no valid split .* 2..28 layers"):
            Rule.make(30, bad)
    with pytest.raises(LoopusError, match="--repeat-budget"):
        Rule.make(30, repeat_budget=-0.1)
    with pytest.raises(LoopusError, match="--repeat-budget"):
        Rule.make(30, repeat_budget=float("nan"))
    assert Rule.make(30, "8-12", 0.5).lengths == (8, 12)


def test_longest_length_within_the_budget_at_its_cheapest_placement():
    # cost grows with length, and within a length it is lowest at start 3 (a planted valley)
    grid = costs_grid(LAYERS, lambda a, b: 0.05 * (b - a) + 0.02 * abs(a - 3))
    rule = Rule.make(LAYERS, "2-10", repeat_budget=0.32)
    choice = choose(rule, grid)
    assert (choice.start, choice.end) == (3, 9)  # 6 layers: 0.30 <= 0.32 < 7 layers: 0.35
    assert choice.cheapest[6] == (3, pytest.approx(0.30)) and not choice.fallback
    assert choose(Rule.make(LAYERS, repeat_budget=10.0), grid).length == LAYERS - 2
    assert "0.32 nats" in rule.sentence() and "longest" in rule.sentence()


def test_ties_go_to_the_earlier_start():
    grid = costs_grid(LAYERS, lambda a, b: 0.01)
    assert cheapest_per_length(grid, (4, 4)) == {4: (1, 0.01)}


def test_fixed_length_ignores_the_default_budget():
    grid = costs_grid(LAYERS, lambda a, b: 1.0 + 0.1 * abs(a - 4))
    rule = Rule.make(LAYERS, "5")
    choice = choose(rule, grid)
    assert (choice.start, choice.end) == (4, 9) and not choice.fallback
    assert "--loop-layers 5" in rule.sentence()
    with pytest.raises(LoopusError, match="no loop block of 5-5 layers repeats within 0.5 nats"):
        choose(Rule.make(LAYERS, "5", 0.5), grid)


def test_no_length_within_the_budget():
    grid = costs_grid(LAYERS, lambda a, b: 1.0 + 0.01 * (b - a) + 0.01 * abs(a - 4))
    fallback = choose(Rule.make(LAYERS), grid)
    # a quarter of the layers (3 of 12), not the shortest valid block, at its cheapest placement
    assert fallback.fallback and (fallback.start, fallback.end) == (4, 7)
    assert fallback.excess(DEFAULT_REPEAT_BUDGET) == pytest.approx(1.03 - DEFAULT_REPEAT_BUDGET)
    with pytest.raises(LoopusError, match=r"cheapest is 4:7 at \+1.030; raise --repeat-budget"):
        choose(Rule.make(LAYERS, repeat_budget=0.2), grid)
    with pytest.raises(LoopusError, match="no loop block of 4-6 layers"):
        choose(Rule.make(LAYERS, "4-6"), grid)

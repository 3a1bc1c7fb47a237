"""benchmarks/bench_analyze_seeds.py: what it keeps of an analysis, and its stability verdict."""

from __future__ import annotations

from benchmarks.bench_analyze_seeds import stability, summary


def test_the_seeds_benchmark_reads_the_decision_and_its_evidence(default_analysis):
    _, analysis, _, _ = default_analysis
    row = summary(analysis)
    assert row["split"] == analysis["split"] and row["confidence"] in ("high", "medium", "low")
    assert row["window"] == analysis["repeat_map"]["window"] and row["rounds"]
    assert analysis["split"] in row["contenders"] and row["report_text"]["tokens"] > 0
    assert set(row["wall_time_s"]) >= {"measure", "map_selection", "map_report"}


def test_four_of_five_is_stable_and_three_is_not():
    picks = ["2:15", "2:15", "3:16", "2:15", "2:15"]
    assert stability(picks) == {"picks": picks, "most_common": "2:15", "share": 0.8, "stable": True}
    assert not stability(["2:15", "3:16", "2:15", "3:16", "2:15"])["stable"]

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


def _run(split: str, stable: bool, alternatives: tuple[str, ...] = ()) -> dict:
    named = [{"split": a} for a in alternatives]
    return {"split": split, "stability": {"stable": stable, "alternatives": named}}


def test_four_of_five_is_stable_and_three_is_not():
    picks = ["2:15", "2:15", "3:16", "2:15", "2:15"]
    verdict = stability([_run(p, True) for p in picks])
    assert (verdict["picks"], verdict["most_common"], verdict["share"], verdict["stable"]) == (
        picks, "2:15", 0.8, True)
    assert not stability([_run(p, True) for p in ["2:15", "3:16", "2:15", "3:16", "2:15"]])["stable"]


def test_the_verdict_counts_reports_saying_unstable_and_the_picks_they_name():
    runs = [_run("2:15", False, ("3:16",)), _run("3:16", False, ("2:15", "4:17")), _run("4:17", True)]
    verdict = stability(runs)
    assert verdict["reports_saying_unstable"] == 2
    assert verdict["other_picks_named"] == {"each": [1, 2, 0], "of": 2}

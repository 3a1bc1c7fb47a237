"""The HTML report and the JSON sidecar: self-contained, decision first, escaped, strict JSON."""

from __future__ import annotations

import copy
import html
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from loopus_analyze.analyze import run_analysis
from loopus_analyze.report import dump_json, render_html
from loopus_analyze.similarity import valid_pairs
from tests.tiny_models import LAYERS


@pytest.fixture(scope="module")
def written(tiny_llama_dir, tmp_path_factory) -> tuple[dict, str, Path]:
    """One real analysis of the tiny Llama (small budget): analysis.json and report.html read back."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("report") / "out"
        result = run_analysis(str(tiny_llama_dir), out=out, tokens=512, seq_len=32, map_tokens=222,
                              device="cpu")
    finally:
        torch.set_num_threads(before)
    assert result.json_path == out / "analysis.json" and result.report_path.is_file()
    return json.loads(result.json_path.read_text()), result.report_path.read_text(), result.json_path


@pytest.fixture(scope="module")
def analysis(written) -> dict:
    return written[0]


@pytest.fixture(scope="module")
def page(written) -> str:
    return written[1]


def test_page_is_self_contained(page):
    assert page.startswith("<!DOCTYPE html>")
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", page)
    assert "<link" not in page and "@import" not in page
    images = re.findall(r'<img [^>]*src="([^"]*)"', page)
    assert len(images) >= 8 and all(src.startswith("data:image/png;base64,") for src in images)
    assert page.count("<script") == 1


def test_decision_panel_comes_first_and_agrees(analysis, page):
    order = [page.index(f'<section id="{s}">') for s in
             ("decision", "map", "deeper", "similarity", "dynamics", "readouts", "evidence", "diagnostics",
              "provenance")]
    assert order == sorted(order)
    split = analysis["split"]
    assert analysis["decision"]["recommended"]["split"] == split
    assert f'id="recommended-split">{split}</span>' in page
    assert f'id="convert-command">{analysis["convert_command"]}</pre>' in page
    assert f"--split {split} " in analysis["convert_command"]
    assert f'{analysis["confidence"]} confidence' in page
    assert analysis["confidence"] in ("high", "medium", "low")
    assert html.escape(analysis["rule"]["sentence"], quote=True) in page
    assert html.escape(analysis["reason"], quote=True) in page


def test_numbers_shown_are_the_report_texts(analysis, page):
    """The decision panel and the tables show the report text's numbers, as analysis.json holds them."""
    repeat = analysis["decision"]["recommended"]["repeat"]["delta_nll"]
    shown = re.search(r'id="recommended-repeat">([^<]*) <span class="muted">\[([^,]*), ([^\]]*)\]', page)
    assert [float(x) for x in shown.groups()] == pytest.approx(
        [repeat["value"], repeat["low"], repeat["high"]], abs=5e-4)
    assert repeat["low"] <= repeat["value"] <= repeat["high"]
    table = page[page.index('id="per-length"'):page.index("</table>", page.index('id="per-length"'))]
    best = table[table.index('<tr class="best">'):]
    assert f"<code>{analysis['split']}</code>" in best[:200]
    for row in analysis["decision"]["per_length"]:
        assert f"<code>{row['split']}</code>" in table
    same = page[page.index('id="same-length"'):]
    assert all(f"<code>{r['split']}</code>" in same for r in analysis["decision"]["same_length"])
    assert analysis["decision"]["report_text"]["tokens"] > 0


def test_the_map_covers_every_split_the_rule_may_choose(analysis, page):
    repeat = np.array(analysis["repeat_map"]["repeat"]["delta_nll"], dtype=float)
    tokens = np.array(analysis["repeat_map"]["repeat"]["tokens"], dtype=float)
    for a, b in valid_pairs(LAYERS).tolist():  # a quarter of 8 layers is 2: every valid split
        assert np.isfinite(repeat[a, b]) and tokens[a, b] > 0
    assert np.isnan(repeat[0, 2]) and np.isnan(repeat[3, 4])
    assert analysis["repeat_map"]["window"] <= 128 and analysis["repeat_map"]["warmup"] == 16
    assert analysis["provenance"]["map_window"] == analysis["repeat_map"]["window"]
    race = analysis["repeat_map"]["race"]
    assert race["rounds"][0]["entered"] == race["candidates"] == len(valid_pairs(LAYERS))
    assert 'id="race"' in page and 'id="race-rounds"' in page and 'id="race-leaders"' in page
    stability = analysis["decision"]["stability"]
    assert stability["stable"] == (not stability["alternatives"])
    assert stability["sentence"].startswith("stable" if stability["stable"] else "unstable")
    assert 'id="stability"' in page and html.escape(stability["sentence"], quote=True) in page
    deeper = analysis["decision"]["deeper"]
    assert deeper[0]["split"] == analysis["split"] and len(deeper[0]["passes"]) == 4
    assert 'id="deeper"' in page and 'id="disagreement"' in page and 'id="massive"' in page


def test_report_reads_well(analysis, page):
    """Issue 23 item 27: no sentence in both Rule and Why, no always-zero "1 pass" column, "units" named,
    a picture before any long table, map legends off the data."""
    reason, rule = analysis["reason"], analysis["rule"]["sentence"]
    assert rule not in reason and rule[:60] not in reason
    deeper = page[page.index('id="deeper"'):page.index("</table>", page.index('id="deeper"'))]
    assert "1 pass<" not in deeper and "2 passes" in deeper
    assert " units" not in page.split('id="analysis-data"')[0]
    first_picture = page.index("<img")
    assert page[:first_picture].count("<tr") <= 10
    assert page.index('id="per-length"') > first_picture


def test_map_legends_sit_outside_the_data():
    from loopus_analyze.plots import split_map_figure

    grid = np.full((9, 9), np.nan)
    for a, b in valid_pairs(8).tolist():
        grid[a, b] = a - b
    fig = split_map_figure(grid, "t", {"recommended": (1, 7), "similarity": (2, 5)}, label="x")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    legend = fig.legends[0].get_window_extent(renderer)
    axes = fig.axes[0].get_window_extent(renderer)
    assert not legend.overlaps(axes) and legend.y1 <= axes.y0  # below the axes, off the map
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["recommended (1:7)", "similarity (2:5)"]


def test_user_strings_are_escaped(analysis):
    changed = copy.deepcopy(analysis)
    evil = "<script>alert('x')</script>"
    changed["model"]["name"] = evil
    changed["provenance"]["model_source"] = evil
    changed["provenance"]["data"] = f"/data/{evil}.txt"
    page = render_html(changed)
    assert "<script>alert" not in page and "</script><" not in page.split('id="analysis-data">')[0]
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    data_block = page.split('id="analysis-data">')[1]
    assert data_block.count("</script>") == 1  # only its own closing tag
    assert json.loads(data_block[:data_block.index("</script>")])["model"]["name"] == evil


def test_json_is_strict_and_round_trips(written):
    analysis, page, json_path = written
    text = dump_json({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": 2}})
    assert json.loads(text) == {"a": None, "b": [1.0, None], "c": {"d": 2}}

    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    again = json.loads(json_path.read_text(), parse_constant=no_constants)
    assert again["split"] == analysis["split"]
    assert again["schema_version"] == 2
    surface = again["similarity"]["surface"]
    assert any(v is None for row in surface for v in row)  # invalid (A, B) are null, not NaN
    for key in ("model_source", "model_fingerprint", "dtype", "device", "tokens_used", "seq_len", "seed",
                "date", "versions", "wall_time_s", "selection_tokens", "report_tokens", "map_units"):
        assert key in again["provenance"], key
    assert set(again["provenance"]["versions"]) >= {"torch", "transformers", "numpy", "sklearn", "loopus"}
    assert page.count(analysis["split"]) >= 3

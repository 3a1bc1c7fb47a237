"""The HTML report and the JSON sidecar: self-contained, decision first, escaped, strict JSON."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch

from loopus_analyze.analyze import run_analysis
from loopus_analyze.report import dump_json, render_html


@pytest.fixture(scope="module")
def written(tiny_llama_dir, tmp_path_factory) -> tuple[dict, str, Path]:
    """One real analysis of the tiny Llama (small budget): analysis.json and report.html read back."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("report") / "out"
        result = run_analysis(str(tiny_llama_dir), out=out, tokens=512, seq_len=32, device="cpu")
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
             ("decision", "similarity", "dynamics", "readouts", "functional", "evidence", "diagnostics",
              "provenance")]
    assert order == sorted(order)
    split = analysis["split"]
    assert analysis["decision"]["candidates"][0]["split"] == split
    assert f'id="recommended-split">{split}</span>' in page
    assert f'id="convert-command">{analysis["convert_command"]}</pre>' in page
    assert f"--split {split} " in analysis["convert_command"]
    first_row = page.index('<tr class="best">')
    assert f"<code>{split}</code>" in page[first_row:first_row + 200]
    assert f'{analysis["confidence"]} confidence' in page
    assert analysis["confidence"] in ("high", "medium", "low")


def test_functional_check_is_reported(analysis, page):
    functional = page[page.index('<section id="functional">'):page.index('<section id="evidence">')]
    for key in analysis["functional"]["controls"]:
        assert f"<code>{key}</code>" in functional
    assert "repeat KL" in functional and "skip KL" in functional
    checked = [c for c in analysis["decision"]["candidates"] if c["functional"]]
    assert 1 <= len(checked) <= 3
    for c in checked:
        assert c["functional"]["controls"], c
        for ctrl in c["functional"]["controls"]:
            a, b = (int(x) for x in ctrl["split"].split(":"))
            assert b - a == c["end"] - c["start"]


def test_functional_check_missing_is_said(analysis):
    changed = copy.deepcopy(analysis)
    changed["functional"] = None
    changed["functional_skipped"] = "too little held-out text"
    page = render_html(changed)
    assert "The functional check was not run: too little held-out text." in page


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
    assert again["schema_version"] == 1
    surface = again["search"]["surface"]
    assert any(v is None for row in surface for v in row)  # invalid (A, B) are null, not NaN
    for key in ("model_source", "model_fingerprint", "dtype", "device", "tokens_used", "seq_len", "seed",
                "date", "versions", "wall_time_s"):
        assert key in again["provenance"], key
    assert set(again["provenance"]["versions"]) >= {"torch", "transformers", "numpy", "sklearn", "loopus"}
    assert page.count(analysis["split"]) >= 3

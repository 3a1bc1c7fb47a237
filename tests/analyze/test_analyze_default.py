"""``loopus analyze`` (no MODEL) on the embedded default model (SmolLM2-135M-Instruct), run once."""

from __future__ import annotations

import re

import numpy as np
import pytest

from loopus_analyze import analyze
from loopus_core.split import LayerSplit

pytestmark = pytest.mark.slow

LAYERS = 30


@pytest.fixture(scope="module")
def run(default_analysis):
    """The session's ``loopus analyze`` of the default model: (stdout, analysis, report page)."""
    stdout, analysis, page, _ = default_analysis
    return stdout, analysis, page


def test_cka_matrix_is_clean(run):
    _, analysis, _ = run
    assert analysis["model"]["num_layers"] == LAYERS
    assert "embedded default" in analysis["provenance"]["model_source"]
    for name in ("cka_debiased", "cka_biased"):
        cka = np.array(analysis["measurements"][name], dtype=float)
        assert cka.shape == (LAYERS + 1, LAYERS + 1)
        assert not np.isnan(cka).any(), name
        assert np.allclose(np.diag(cka), 1.0, atol=1e-6), name
        assert np.allclose(cka, cka.T, atol=1e-9), name
    assert analysis["measurements"]["nan_count"] == 0
    assert analysis["provenance"]["tokens_used"] >= 2048


def test_recommendation_agrees_everywhere(run):
    stdout, analysis, page = run
    split = analysis["split"]
    parsed = LayerSplit.parse(split, LAYERS)
    assert parsed.loop_size >= 2
    candidates = analysis["decision"]["candidates"]
    assert candidates[0]["split"] == split and candidates[0]["rank"] == 1
    assert len(candidates) == 6  # the recommendation and five alternatives
    assert analysis["decision"]["split"] == split
    assert analysis["convert_command"].startswith(f"loopus convert --split {split} --out ")
    shown = re.search(r'id="recommended-split">([^<]*)<', page).group(1)
    command = re.search(r'id="convert-command">([^<]*)<', page).group(1)
    assert shown == split
    assert command == analysis["convert_command"]
    assert f"recommended split: {split} ({analysis['confidence']} confidence)" in stdout
    assert f"{analysis['confidence']} confidence" in page and analysis["reason"].split(";")[0] in page


def test_functional_check_is_in_json_and_html(run):
    _, analysis, page = run
    functional = analysis["functional"]
    assert functional is not None and functional["tokens"] > 0 and functional["base_nll"] > 0
    checked = [c for c in analysis["decision"]["candidates"] if c["functional"]]
    assert len(checked) == 3
    for c in checked:
        f = c["functional"]
        assert f["repeat"]["kl"] > 0 and f["skip"]["kl"] > 0
        assert len(f["controls"]) == analyze.FUNCTIONAL_CONTROLS
        assert f"<code>{c['split']}</code>" in page[page.index('<section id="functional">'):]
    # the recommended block is the functionally best of the checked ones (the re-rank)
    ratios = []
    for c in checked:
        controls = np.median([x["repeat"]["kl"] for x in c["functional"]["controls"]])
        ratios.append(c["functional"]["repeat"]["kl"] / controls)
    assert checked[0]["split"] == analysis["split"]
    assert ratios[0] == pytest.approx(min(ratios))

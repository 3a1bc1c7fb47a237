"""``loopus analyze`` (no MODEL) on the embedded default model (SmolLM2-135M-Instruct), run once per session:
the recommendation is substantial and the best of its length on text the selection never saw, and the
report, the JSON and the printed summary agree."""

from __future__ import annotations

import contextlib
import html
import re

import numpy as np
import pytest
import torch

from loopus_analyze import heldout
from loopus_analyze.functional import prediction_mask, repeat_indices
from loopus_analyze.race import MIN_DOCUMENTS
from loopus_core.models import layer_surgery, open_model
from loopus_core.split import LayerSplit
from loopus_core.texts import load_texts

pytestmark = pytest.mark.slow

LAYERS = 30


@pytest.fixture(scope="module")
def run(default_analysis):
    """The session's ``loopus analyze`` of the default model: (stdout, analysis, report page)."""
    stdout, analysis, page, _ = default_analysis
    return stdout, analysis, page


def test_similarity_matrices_are_clean(run):
    _, analysis, _ = run
    assert analysis["model"]["num_layers"] == LAYERS
    assert "embedded default" in analysis["provenance"]["model_source"]
    m = analysis["measurements"]
    for cka in [m["cka_debiased"], m["cka_biased"]] + [v["cka"] for v in m["views"].values()]:
        cka = np.array(cka, dtype=float)
        assert cka.shape == (LAYERS + 1, LAYERS + 1) and not np.isnan(cka).any()
        assert np.allclose(np.diag(cka), 1.0, atol=1e-6) and np.allclose(cka, cka.T, atol=1e-9)
    assert set(m["views"]) == {"normed", "no_massive"}
    assert m["massive_activations"]["channels"]  # SmolLM2 has massive-activation channels
    assert m["nan_count"] == 0


def test_recommendation_is_substantial_and_the_best_of_its_length(run):
    _, analysis, _ = run
    split = LayerSplit.parse(analysis["split"], LAYERS)
    assert split.loop_size >= LAYERS / 4
    decision = analysis["decision"]
    assert decision["recommended"]["split"] == analysis["split"]
    assert decision["best_within_interval"]
    rec = decision["recommended"]["repeat"]["delta_nll"]
    same = decision["same_length"]
    assert len(same) == LAYERS - 1 - split.loop_size  # every placement of that length was measured
    pick = next(r for r in same if r["split"] == analysis["split"])
    assert [pick["difference"][k] for k in ("value", "low", "high")] == [0.0, 0.0, 0.0]
    assert pick["repeat"]["delta_nll"] == rec
    # a difference is read on the documents both blocks were read on, and is significant on 3 or more: this
    # fixture's budget reads one document, so no claim is made either way, and the confidence says why
    assert all(1 <= r["difference"]["documents"] < MIN_DOCUMENTS for r in same)
    assert not any(r["significantly_cheaper"] for r in same)
    assert analysis["confidence"] == "low" and "only 1 document(s) of selection text" in analysis["reason"]


def test_report_json_and_stdout_agree(run):
    stdout, analysis, page = run
    split = analysis["split"]
    assert re.search(r'id="recommended-split">([^<]*)<', page).group(1) == split
    assert re.search(r'id="convert-command">([^<]*)<', page).group(1) == analysis["convert_command"]
    assert analysis["convert_command"].startswith(f"loopus convert --split {split} --out ")
    assert f"recommended split: {split} ({analysis['confidence']} confidence)" in stdout
    assert f"{analysis['confidence']} confidence" in page
    assert analysis["decision"]["stability"]["sentence"] in stdout.replace("\n", " ")
    assert html.escape(analysis["reason"], quote=True) in page
    rec = analysis["decision"]["recommended"]["repeat"]["delta_nll"]
    shown = re.search(r'id="recommended-repeat">([^<]*) ', page).group(1)
    assert float(shown) == pytest.approx(rec["value"], abs=5e-4)
    assert f"{rec['value']:+.3f} [{rec['low']:+.3f}, {rec['high']:+.3f}]" in analysis["reason"]


def _repeat_cost(model, batches, start: int, end: int) -> float:
    """Held-out NLL change of the model run with layers start..end-1 twice (direct, no cached states)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            valid = prediction_mask(batch.attention_mask, heldout.WARMUP)
            targets = batch.input_ids[:, 1:][valid]
            out = []
            for order in (None, repeat_indices(LAYERS, start, end)):
                with layer_surgery(model, order) if order else contextlib.nullcontext():
                    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                   use_cache=False).logits[:, :-1][valid]
                out.append(-torch.log_softmax(logits.float(), -1).gather(1, targets[:, None]).double().sum())
            total += float(out[1] - out[0])
            count += int(targets.numel())
    return total / count


def test_numbers_shown_come_from_text_the_selection_did_not_use(run, default_model_dir):
    _, analysis, _ = run
    prov = analysis["provenance"]
    texts = heldout.three_ways(load_texts(None), prov["seed"])
    assert not set(texts.selection) & set(texts.report)  # disjoint documents
    assert not (set(texts.selection) | set(texts.report)) & set(texts.measured)
    opened = open_model(str(default_model_dir))
    selection, report = heldout.map_batches(opened.tokenizer, texts, prov["map_tokens_requested"],
                                            prov["seed"])
    split = LayerSplit.parse(analysis["split"], LAYERS)
    torch.set_num_threads(1)
    shown = analysis["decision"]["recommended"]
    on_report = _repeat_cost(opened.model, report, split.start, split.end)
    on_selection = _repeat_cost(opened.model, selection, split.start, split.end)
    assert shown["repeat"]["delta_nll"]["value"] == pytest.approx(on_report, abs=1e-4)
    assert shown["selection_delta_nll"] == pytest.approx(on_selection, abs=1e-4)
    assert abs(on_report - on_selection) > 1e-3  # two different texts
    assert analysis["decision"]["report_text"]["tokens"] == prov["report_tokens"]

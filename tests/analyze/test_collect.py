"""The streamed measuring pass on the tiny model of every family."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loopus_analyze.collect import Measurements, measure
from loopus_analyze.corpus import TokenBatch, make_batches
from loopus_core.models import model_parts
from loopus_core.texts import load_texts
from tests.tiny_models import FAMILIES


@pytest.fixture(scope="module")
def texts():
    return load_texts(None)


def _open(path):
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_measures_without_nan(tiny_model_dirs, texts, family):
    model, tok = _open(tiny_model_dirs[family])
    batches = make_batches(tok, texts, tokens=240, seq_len=16, batch_size=4, seed=0)
    m = measure(model, tok, batches, probes=False)
    states = model.config.num_hidden_layers + 1
    assert m.num_layers == states - 1 and m.num_batches == len(batches)
    assert m.tokens_used == sum(b.measured_tokens for b in batches)
    assert m.nan_count == 0
    for name in ("cka_debiased", "cka_biased", "distance"):
        matrix = getattr(m, name)
        assert matrix.shape == (states, states) and np.all(np.isfinite(matrix))
        assert np.allclose(matrix, matrix.T)
    assert np.allclose(np.diag(m.cka_debiased), 1.0) and np.allclose(np.diag(m.distance), 0.0)
    assert m.hsic_batches.shape == (len(batches), states, states)
    for curve in (m.drift, m.drift_centred, m.rel_update):
        assert curve.shape == (states - 1,) and np.all(np.isfinite(curve)) and np.all(curve > 0)
    assert np.allclose(m.drift, np.diagonal(m.distance, offset=1), atol=2e-3)
    assert m.lens_kl[-1] == pytest.approx(0.0, abs=1e-6) and m.lens_top1[-1] == 1.0
    assert np.all(np.isfinite(m.lens_kl)) and np.all(m.lens_entropy > 0)
    assert all(np.all(np.isfinite(v)) for v in m.massive.values())
    assert m.probes == {}
    assert not any(layer._forward_hooks or layer._forward_pre_hooks for layer in model_parts(model).layers)


def test_states_are_layer_inputs_and_outputs_before_the_final_norm(tiny_llama_dir, texts):
    model, tok = _open(tiny_llama_dir)
    batches = make_batches(tok, texts, tokens=60, seq_len=16, batch_size=4, seed=1)[:1]
    m = measure(model, tok, batches, probes=False, lens=False)
    with torch.inference_mode():
        hidden = model(input_ids=batches[0].input_ids, attention_mask=batches[0].attention_mask,
                       output_hidden_states=True).hidden_states
    select = batches[0].attention_mask.bool()
    select[:, 0] = False
    # hidden_states[0..L-1] are the inputs of layers 0..L-1; hidden_states[L] has the final norm applied
    expected = np.array([h[select].abs().max().item() for h in hidden[:-1]])
    assert np.allclose(m.massive["max_abs"][:-1], expected, rtol=1e-5)
    assert not np.isclose(m.massive["max_abs"][-1], hidden[-1][select].abs().max().item(), rtol=1e-3)
    assert np.all(np.isnan(m.lens_kl))


def test_padding_changes_nothing_and_first_position_is_excluded(tiny_llama_dir, texts):
    model, tok = _open(tiny_llama_dir)
    batches = make_batches(tok, texts, tokens=200, seq_len=24, batch_size=8, seed=2)[:1]
    b = batches[0]
    pad = torch.full((b.input_ids.shape[0], 6), tok.pad_token_id)
    padded = [TokenBatch(torch.cat([b.input_ids, pad], 1), torch.cat([b.attention_mask, 0 * pad], 1),
                         b.doc_ids)]
    a, p = (measure(model, tok, x, probes=False) for x in (batches, padded))
    assert a.tokens_used == p.tokens_used
    for name in ("cka_debiased", "cka_biased", "distance", "drift", "drift_centred", "rel_update", "lens_kl"):
        assert np.allclose(getattr(a, name), getattr(p, name), atol=1e-5), name
    assert not np.allclose(a.cka_with_bos, a.cka_debiased, atol=1e-3)


def test_probes_on_tiny_model_and_json_round_trip(tiny_llama_dir, texts):
    model, tok = _open(tiny_llama_dir)
    batches = make_batches(tok, texts, tokens=1200, seq_len=32, batch_size=8, seed=3)
    seen = []

    class Recorder:
        @contextlib.contextmanager
        def task(self, description, total):
            seen.append((description, total))
            yield lambda n=1: seen.append(n)

    m = measure(model, tok, batches, probes=True, max_probe_tokens=1000, progress=Recorder())
    assert seen[0] == ("measuring layers", len(batches)) and seen.count(1) == len(batches)
    assert m.probe_tokens == 1000
    current = m.probes["current"]
    assert current["accuracy"][0] > 0.9  # state 0 = token embeddings
    assert current["control"][0] < current["accuracy"][0]
    assert set(m.probes) == {"current", "previous", "next", "position"}
    for task in m.probes.values():
        assert all(v.shape == (m.num_layers + 1,) for v in task.values())
    back = Measurements.from_json(json.loads(json.dumps(m.to_json())))
    assert back.num_layers == m.num_layers and back.seed == m.seed
    assert np.array_equal(back.cka_debiased, m.cka_debiased)
    assert np.array_equal(back.hsic_batches, m.hsic_batches)
    assert np.array_equal(back.probes["next"]["selectivity"], m.probes["next"]["selectivity"])
    assert np.array_equal(back.massive["ratio_to_median"], m.massive["ratio_to_median"])


def test_a_short_last_batch_still_fills_the_probe_sample(tiny_llama_dir, texts):
    """Each batch gives the probe sample its share of the measurable tokens: with three full batches and a
    last one of a single window, the sample still holds ``max_probe_tokens`` (an equal share per batch
    leaves it short)."""
    model, tok = _open(tiny_llama_dir)
    full = make_batches(tok, texts, tokens=3 * 8 * 31, seq_len=32, batch_size=8, seed=4)[:3]
    last = full[-1]
    short = TokenBatch(last.input_ids[:1], last.attention_mask[:1], last.doc_ids[:1])
    batches = [*full, short]
    measurable = sum(int(b.attention_mask[:, 1:].sum()) for b in batches)
    capacity = measurable * 3 // 4
    equal = -(-capacity // len(batches))  # what an equal share per batch would take
    assert 3 * equal + min(equal, int(short.attention_mask[:, 1:].sum())) < capacity
    m = measure(model, tok, batches, probes=True, max_probe_tokens=capacity, seed=0)
    assert m.probe_tokens == capacity

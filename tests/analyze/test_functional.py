"""The repeat-cost map from cached states equals the model run with the block applied twice / skipped /
applied K times, for every split of tiny models; padding, documents and the first position are handled."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from loopus_analyze.functional import (
    map_entries,
    measure_map,
    prediction_mask,
    repeat_indices,
    skip_indices,
)
from loopus_analyze.similarity import valid_pairs
from loopus_core.models import layer_surgery, open_model

LAYERS = 8


def test_layer_orders():
    assert repeat_indices(8, 2, 5) == [0, 1, 2, 3, 4, 2, 3, 4, 5, 6, 7]
    assert repeat_indices(8, 2, 4, passes=3) == [0, 1, 2, 3, 2, 3, 2, 3, 4, 5, 6, 7]
    assert skip_indices(8, 2, 5) == [0, 1, 5, 6, 7]


def test_entries_cover_every_valid_split_twice():
    entries = map_entries(LAYERS)
    pairs = [tuple(p) for p in valid_pairs(LAYERS).tolist()]
    assert len(entries) == 2 * len(pairs) == len(set(entries))
    assert {(b, a) for a, b in pairs} | {(a, b) for a, b in pairs} == set(entries)
    assert map_entries(LAYERS, [(2, 5)]) == [(5, 2), (2, 5)]  # by starting layer s: (j, s)


def test_prediction_mask_drops_first_position_and_padding():
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert prediction_mask(mask).tolist() == [[False, True, True, True], [False, True, False, False]]


def _batch(rows: list[list[int]], docs: list[int]) -> SimpleNamespace:
    length = max(map(len, rows))
    ids = torch.zeros((len(rows), length), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        ids[r, :len(row)] = torch.tensor(row)
        mask[r, :len(row)] = 1
    return SimpleNamespace(input_ids=ids, attention_mask=mask, doc_ids=torch.tensor(docs))


def _rows(seed: int, lengths=(15, 9, 12, 11)) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, 384, (n,), generator=g).tolist() for n in lengths]


def _direct(model, rows, docs, order) -> dict[int, np.ndarray]:
    """Per document: sums of NLL, KL to the base and top-1 agreement, and the count, of the model run with
    its layers in ``order`` (each row alone, no padding)."""
    out: dict[int, np.ndarray] = {}
    for row, doc in zip(rows, docs, strict=True):
        ids = torch.tensor([row])
        with torch.no_grad():
            base = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), -1)[0, 1:-1]
            with layer_surgery(model, order):
                var = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), -1)[0, 1:-1]
        target = ids[0, 2:]
        values = np.array([
            float(-var.gather(1, target[:, None]).double().sum()),
            float((base.exp() * (base - var)).sum(-1).double().sum()),
            float((var.argmax(-1) == base.argmax(-1)).double().sum()),
            float(-base.gather(1, target[:, None]).double().sum()),
            len(target),
        ])
        out[doc] = out.get(doc, 0) + values
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text"])
def test_map_equals_direct_computation_for_every_split(tiny_model_dirs, family):
    model = open_model(str(tiny_model_dirs[family])).model
    rows, docs = _rows(0), [3, 7, 3, 9]
    sums, _ = measure_map(model, [_batch(rows[:2], docs[:2]), _batch(rows[2:], docs[2:])], max_tokens=64)
    assert sums.documents.tolist() == [3, 7, 9]
    assert sums.tokens == sum(len(r) - 2 for r in rows)
    pairs = valid_pairs(LAYERS).tolist()
    assert sums.measured.sum() == 2 * len(pairs)
    for a, b in pairs:
        for kind, order, (j, s) in (("repeat", repeat_indices(LAYERS, a, b), (b, a)),
                                    ("skip", skip_indices(LAYERS, a, b), (a, b))):
            direct = _direct(model, rows, docs, order)
            for d, doc in enumerate(sums.documents.tolist()):
                nll, kl, agree, base_nll, count = direct[doc]
                assert sums.count[d] == count and sums.base_nll[d] == pytest.approx(base_nll, abs=1e-4)
                assert sums.nll[d, j, s] == pytest.approx(nll, abs=1e-4), (kind, a, b)
                assert sums.kl[d, j, s] == pytest.approx(kl, abs=1e-4), (kind, a, b)
                assert sums.agree[d, j, s] == agree, (kind, a, b)
            total = sum(direct.values())
            grid = sums.repeat if kind == "repeat" else sums.skip
            assert grid("delta_nll")[a, b] == pytest.approx((total[0] - total[3]) / total[4], abs=1e-4)
            assert grid("kl")[a, b] == pytest.approx(total[1] / total[4], abs=1e-4)
    assert np.isnan(sums.repeat("kl")[0, 2]) and np.isnan(sums.skip("kl")[1, 8])  # invalid: not measured
    lower = np.tril(np.ones((LAYERS + 1, LAYERS + 1), dtype=bool))
    assert np.isnan(sums.repeat("kl")[lower]).all() and np.isnan(sums.skip("kl")[lower]).all()  # A >= B
    assert len(model.model.layers if family != "gpt2" else model.transformer.h) == LAYERS  # restored


def test_deeper_passes_equal_the_block_applied_k_times(tiny_llama_dir):
    model = open_model(str(tiny_llama_dir)).model
    rows, docs = _rows(1), [0, 1, 2, 2]
    blocks = [(2, 5), (1, 7), (3, 5)]
    _, deep = measure_map(model, [_batch(rows, docs)], entries=[], deep_blocks=blocks, passes=4)
    assert deep.nll.shape == (3, 3, 4)
    for b, (start, end) in enumerate(blocks):
        for k in range(1, 5):
            direct = _direct(model, rows, docs, repeat_indices(LAYERS, start, end, passes=k))
            for d, doc in enumerate(deep.documents.tolist()):
                nll, kl, agree, _, count = direct[doc]
                assert deep.count[d] == count
                assert deep.nll[d, b, k - 1] == pytest.approx(nll, abs=1e-4), (start, end, k)
                assert deep.kl[d, b, k - 1] == pytest.approx(kl, abs=1e-4), (start, end, k)
                assert deep.agree[d, b, k - 1] == agree
    assert np.all(deep.kl[:, :, 0] == 0) and np.all(deep.change > 0)


def test_padding_and_batching_do_not_change_the_map(tiny_llama_dir):
    model = open_model(str(tiny_llama_dir)).model
    rows, docs = _rows(2), [0, 1, 2, 3]
    padded, _ = measure_map(model, [_batch(rows, docs)])
    alone = [_batch([r], [d]) for r, d in zip(rows, docs, strict=True)]
    separate, _ = measure_map(model, alone, max_tokens=1)
    for metric in ("delta_nll", "kl", "agree"):
        assert np.allclose(padded.grid(metric), separate.grid(metric), atol=1e-5, equal_nan=True)


def test_head_chunks_do_not_change_the_map(tiny_llama_dir, monkeypatch):
    """The head runs on many variants' predictions per matmul; chunks of one and of two variants give the
    same sums as the default chunks (``HEAD_ROWS`` = 512 rows: about 23 variants here)."""
    import loopus_analyze.functional as functional

    model = open_model(str(tiny_llama_dir)).model
    rows, docs = _rows(3), [0, 1, 2, 3]
    batches = [_batch(rows[:2], docs[:2]), _batch(rows[2:], docs[2:])]
    whole, _ = measure_map(model, batches)
    predictions = sum(len(r) - 2 for r in rows[:2])
    for head_rows in (1, 2 * predictions + 1):  # one variant per matmul; two per matmul
        monkeypatch.setattr(functional, "HEAD_ROWS", head_rows)
        chunked, _ = measure_map(model, batches)
        for metric in ("nll", "kl", "agree"):
            assert np.allclose(getattr(chunked, metric), getattr(whole, metric), atol=1e-6, rtol=0)
        assert (chunked.measured == whole.measured).all() and chunked.measured.sum() > 0


def test_deeper_blocks_share_their_second_pass_with_the_grid(tiny_llama_dir):
    """A block both in the grid and among the deeper blocks: the grid's entry for running it twice comes
    from the deeper passes' second pass, and equals the grid computed alone; the other entries too."""
    model = open_model(str(tiny_llama_dir)).model
    rows, docs = _rows(4), [0, 1, 2, 2]
    batches = [_batch(rows[:2], docs[:2]), _batch(rows[2:], docs[2:])]
    entries = map_entries(LAYERS, [(2, 5), (1, 7), (3, 6)])
    alone, _ = measure_map(model, batches, entries=entries)
    both, deep = measure_map(model, batches, entries=entries, deep_blocks=[(2, 5), (1, 7), (4, 6)], passes=3)
    assert (both.measured == alone.measured).all() and both.measured.sum() == len(entries)
    for metric in ("nll", "kl", "agree"):
        assert np.allclose(getattr(both, metric), getattr(alone, metric), atol=1e-6, rtol=0), metric
    for b, (start, end) in enumerate(deep.blocks[:2]):  # the shared ones: pass 2 = the grid's entry
        assert np.allclose(deep.nll[:, b, 1], alone.nll[:, end, start], atol=1e-6, rtol=0)

"""The functional check: layer orders, controls, masking of padding and the first position, the numbers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from loopus_analyze.functional import (
    control_blocks,
    functional_check,
    prediction_mask,
    repeat_indices,
    skip_indices,
)
from loopus_core.models import layer_surgery, open_model


def test_layer_orders():
    assert repeat_indices(8, 2, 5) == [0, 1, 2, 3, 4, 2, 3, 4, 5, 6, 7]
    assert skip_indices(8, 2, 5) == [0, 1, 5, 6, 7]


@pytest.mark.parametrize(("num_layers", "start", "end"), [(30, 4, 20), (8, 1, 7), (8, 3, 5), (30, 2, 28)])
def test_controls_have_the_same_length_elsewhere(num_layers, start, end):
    ctrl = control_blocks(num_layers, start, end, 2)
    assert 1 <= len(ctrl) <= 2
    for a, b in ctrl:
        assert b - a == end - start
        assert a != start and 0 <= a and b <= num_layers
    assert len(set(ctrl)) == len(ctrl)


def test_controls_avoid_the_candidate_and_the_extremes_when_there_is_room():
    assert control_blocks(30, 10, 14, 2) == [(14, 18), (19, 23)]
    assert control_blocks(30, 11, 22, 2) == [(1, 12), (18, 29)]  # never layer 0 or 29 when avoidable,
    assert control_blocks(30, 11, 21, 3) == [(1, 11), (2, 12), (19, 29)]  # and from both sides of the block
    assert control_blocks(8, 1, 7, 2) == [(0, 6), (2, 8)]  # no room: overlapping blocks are all there is


def test_prediction_mask_drops_first_position_and_padding():
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert prediction_mask(mask).tolist() == [[False, True, True, True], [False, True, False, False]]


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return open_model(str(tiny_llama_dir))


def _batch(rows: list[list[int]]) -> SimpleNamespace:
    length = max(map(len, rows))
    ids = torch.zeros((len(rows), length), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        ids[r, :len(row)] = torch.tensor(row)
        mask[r, :len(row)] = 1
    return SimpleNamespace(input_ids=ids, attention_mask=mask)


def _rows(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, 384, (n,), generator=g).tolist() for n in (15, 9, 12)]


def test_numbers_match_a_direct_computation(tiny):
    model = tiny.model
    rows = _rows()
    result = functional_check(model, [_batch(rows)], [(2, 5)], controls=2)
    assert result.tokens == sum(len(r) - 2 for r in rows)
    assert result.controls["2:5"] == ["1:4", "4:7"]
    assert set(result.effects) == {"2:5", "1:4", "4:7"}
    # direct: row by row, no padding
    base_nll, rep_nll, kl = [], [], []
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row])
            base = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), -1)[0, 1:-1]
            with layer_surgery(model, repeat_indices(8, 2, 5)):
                rep = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), -1)[0, 1:-1]
            target = ids[0, 2:]
            base_nll.append(-base.gather(1, target[:, None]).squeeze(1))
            rep_nll.append(-rep.gather(1, target[:, None]).squeeze(1))
            kl.append((base.exp() * (base - rep)).sum(-1))
    base_nll, rep_nll, kl = (torch.cat(x).double().mean().item() for x in (base_nll, rep_nll, kl))
    assert result.base_nll == pytest.approx(base_nll, abs=1e-4)
    repeat = result.effects["2:5"]["repeat"]
    assert repeat["nll"] == pytest.approx(rep_nll, abs=1e-4)
    assert repeat["delta_nll"] == pytest.approx(rep_nll - base_nll, abs=1e-4)
    assert repeat["kl"] == pytest.approx(kl, abs=1e-4)
    assert repeat["kl"] > 0
    for effects in result.effects.values():
        for kind in ("repeat", "skip"):
            assert effects[kind]["kl"] >= -1e-6
            assert 0.0 <= effects[kind]["top1_agreement"] <= 1.0
    summary = result.summary("2:5")
    assert [c["split"] for c in summary["controls"]] == result.controls["2:5"]
    # the model is restored after the surgery
    assert len(model.model.layers) == 8 and model.config.num_hidden_layers == 8


def test_padding_does_not_change_the_result(tiny):
    rows = _rows(1)
    padded = functional_check(tiny.model, [_batch(rows)], [(3, 6)], controls=1)
    separate = functional_check(tiny.model, [_batch([r]) for r in rows], [(3, 6)], controls=1)
    assert padded.tokens == separate.tokens
    for key in padded.effects:
        for kind in ("repeat", "skip"):
            for metric in ("nll", "kl"):
                assert padded.effects[key][kind][metric] == pytest.approx(
                    separate.effects[key][kind][metric], abs=1e-4)

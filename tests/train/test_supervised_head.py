"""Issue 24 (1)-(2): the head scores only the supervised positions, and a zero-weighted term costs nothing,
with the same losses and gradients as the code before (kept here as the reference, not in the library)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loopus_convert.measure import IGNORE_INDEX, loss_per_loops, next_token_ce, supervised_targets
from loopus_train.optim import select_trainable
from loopus_train.rds import monotonicity, rds_micro_batch

PARTS = ("loop", "gate", "decoder", "head")


def reference_rds(model, input_ids, steps, *, passes=1, beta=1.0, conf_weight=1.0, labels=None):
    """The RDS micro-batch before issue 24 (one process, no noise): the decoder and the head at every
    position, the previous-CE pass and the confidence head whatever their weights. Returns the summed
    (loss, CE, mono, BCE) over the supervised steps and accumulates the gradients."""
    counts = supervised_targets(input_ids, labels)
    normaliser, rows = counts.sum().clamp(min=1).float(), counts > 0
    ctx = model.prepare(input_ids)
    with torch.no_grad():
        h = model.encode(ctx)
    prev_ce, totals = None, torch.zeros(4)

    def ce_of(logits):
        if labels is None:
            return next_token_ce(logits, input_ids)
        ce, correct = next_token_ce(logits, input_ids, "sum", labels)
        return ce / normaliser, correct

    for step in range(1, max(steps) + 1):
        h_in = h.detach()
        if step not in steps:
            with torch.no_grad():
                h = model.loop_step(h_in, ctx)
            prev_ce = None
            continue
        if prev_ce is None:
            with torch.no_grad():
                prev_ce, _ = ce_of(model.decode(h_in, ctx))
        h_out = h_in
        for _ in range(passes):
            h_out = model.loop_step(h_out, ctx)
        ce, correct = ce_of(model.decode(h_out, ctx))
        q = model.confidence_logit(h_out, ctx).float()
        per = F.binary_cross_entropy_with_logits(q, correct, reduction="none")
        bce = (per * rows).sum() / rows.sum().clamp(min=1)
        mono = monotonicity(ce, prev_ce, None)
        loss = ce + beta * mono + conf_weight * bce
        (loss / len(steps)).backward()
        totals += torch.stack([loss, ce, mono, bce]).detach()
        h, prev_ce = h_out.detach(), ce.detach()
    return totals


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _answer_only(ids: torch.Tensor, answer: int) -> torch.Tensor:
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -answer:] = ids[:, -answer:]
    return labels


@pytest.mark.parametrize(
    "beta, conf_weight, passes, labelled",
    [
        (1.0, 1.0, 1, False),
        (1.0, 1.0, 2, True),
        (0.0, 1.0, 1, True),
        (1.0, 0.0, 1, True),
        (0.0, 0.0, 2, False),
    ],
)
def test_gradients_equal_the_every_position_code(looped_tiny, beta, conf_weight, passes, labelled):
    from loopus_convert import load_looped

    model = load_looped(looped_tiny).train()
    select_trainable(model, PARTS)
    ids = torch.randint(3, 300, (3, 24), generator=torch.Generator().manual_seed(5))
    labels = _answer_only(ids, 3) if labelled else None
    steps = [2, 3]
    stats = rds_micro_batch(
        model,
        ids,
        steps,
        passes=passes,
        beta=beta,
        conf_weight=conf_weight,
        scale=1 / len(steps),
        labels=labels,
    )
    ours = _grads(model)
    model.zero_grad(set_to_none=True)
    ref = reference_rds(model, ids, steps, passes=passes, beta=beta, conf_weight=conf_weight, labels=labels)
    theirs = _grads(model)
    assert set(ours) == set(theirs) and ours
    for name in ours:
        # the two codes sum in different orders: float32's rounding error scales with the tensor's largest
        # terms, not with each element (an AVX-512 CPU left 2e-8 on an element of 2e-4, 8e-7 of the largest)
        scale = float(theirs[name].abs().max())
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-5 * scale)
    assert stats.loss == pytest.approx(float(ref[0]), rel=1e-5)
    assert stats.ce == pytest.approx(float(ref[1]), rel=1e-5)
    assert stats.mono == (pytest.approx(float(ref[2]), rel=1e-5, abs=1e-7) if beta else 0.0)
    assert stats.bce == (pytest.approx(float(ref[3]), rel=1e-5) if conf_weight else 0.0)


class _Counting:
    """Counts the decoder passes, the rows the head scores, and the confidence-head calls of a model."""

    def __init__(self, model, monkeypatch) -> None:
        self.decoder, self.head_rows, self.confidence = 0, [], 0
        decoder_states, head, conf = model.decoder_states, model.head, model.confidence_head.forward

        def counted_decoder(h, ctx):
            self.decoder += 1
            return decoder_states(h, ctx)

        def counted_head(h):
            self.head_rows.append(h.shape[0])
            return head(h)

        def counted_conf(x):
            self.confidence += 1
            return conf(x)

        monkeypatch.setattr(model, "decoder_states", counted_decoder)
        monkeypatch.setattr(model, "head", counted_head)
        monkeypatch.setattr(model.confidence_head, "forward", counted_conf)


@pytest.mark.parametrize(
    "beta, conf_weight, decoder_passes, confidence",
    [(1.0, 1.0, 4, 2), (0.0, 1.0, 2, 2), (1.0, 0.0, 4, 0), (0.0, 0.0, 2, 0)],
)
def test_the_head_sees_only_supervised_rows_and_zero_weights_cost_nothing(
    looped_tiny, monkeypatch, beta, conf_weight, decoder_passes, confidence
):
    """Steps [1, 3] of 3: each supervised step decodes its state, and its input state (the previous CE)
    only when beta != 0; the head scores the 3 x 2 answer predictions, never the 3 x 31 positions."""
    from loopus_convert import load_looped

    model = load_looped(looped_tiny).train()
    select_trainable(model, PARTS)
    ids = torch.randint(3, 300, (3, 32), generator=torch.Generator().manual_seed(1))
    seen = _Counting(model, monkeypatch)
    rds_micro_batch(model, ids, [1, 3], beta=beta, conf_weight=conf_weight, labels=_answer_only(ids, 2))
    assert seen.decoder == decoder_passes
    assert seen.head_rows == [3 * 2] * decoder_passes
    assert seen.confidence == confidence


def test_evaluation_scores_only_supervised_rows_with_the_same_numbers(looped_tiny, monkeypatch):
    """``loss_per_loops`` through the head at the supervised rows equals the full logits' CE."""
    from loopus_convert import load_looped

    model = load_looped(looped_tiny).eval()
    ids = torch.randint(3, 300, (4, 20), generator=torch.Generator().manual_seed(3))
    labels = _answer_only(ids, 4)
    with torch.no_grad():
        ce, correct = next_token_ce(model(ids, num_loops=3).logits, ids, "sum", labels)
    seen = _Counting(model, monkeypatch)
    result = loss_per_loops(model, ids, [3], batch_size=4, labels=labels)
    assert seen.head_rows == [4 * 4]  # 4 answer tokens per row, never the 4 x 19 predictions
    assert result["loops"]["3"]["loss"] == pytest.approx(float(ce) / 16, rel=1e-5)
    assert result["loops"]["3"]["accuracy"] == pytest.approx(float(correct.mean()), rel=1e-6)

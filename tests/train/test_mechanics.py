"""The trainer's pieces alone: schedule, step draw, sampler, packing, RDS semantics, optimizer state."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from loopus_core.errors import LoopusError
from loopus_train.config import TrainConfig
from loopus_train.data import BlockSampler, all_blocks
from loopus_train.optim import build_optimizer, lr_at, select_trainable
from loopus_train.rds import draw_supervised_steps, rds_micro_batch
from loopus_train.state import load_optimizer, save_optimizer
from tests.train.standin import StandInLooped


def test_lr_warmup_then_cosine_to_min():
    kw = dict(lr=1e-3, min_lr=1e-4, warmup=4, total=20)
    lrs = [lr_at(u, **kw) for u in range(20)]
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    after = lrs[3:]
    assert all(a >= b for a, b in zip(after, after[1:], strict=False))  # monotone after warmup
    assert lr_at(20, **kw) == pytest.approx(1e-4)  # ends at min_lr, never rises again
    assert lr_at(40, **kw) == pytest.approx(1e-4)
    assert lrs[12] == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 8 / 16)))


def test_supervised_steps_are_a_pure_function_of_seed_and_step():
    a = draw_supervised_steps(0, 7, 1, 20, 5)
    assert a == draw_supervised_steps(0, 7, 1, 20, 5)
    assert a == sorted(set(a)) and len(a) == 5 and 1 <= a[0] and a[-1] <= 20
    draws = {tuple(draw_supervised_steps(0, u, 0, 20, 5)) for u in range(30)}
    assert len(draws) > 20  # different updates draw different steps
    assert draw_supervised_steps(0, 3, 0, 4, 4) == [1, 2, 3, 4]


def test_sampler_resumes_exactly_and_covers_each_epoch():
    sampler = BlockSampler(7, seed=3)
    first = sampler.take(7)
    assert sorted(first) == list(range(7))
    sampler.take(3)
    state = sampler.state_dict()
    expected = sampler.take(11)
    restored = BlockSampler(7, seed=3)
    restored.load_state_dict(state)
    assert restored.take(11) == expected
    with pytest.raises(LoopusError):
        BlockSampler(8, seed=3).load_state_dict(state)


def test_packing_joins_documents_with_eos_without_padding(tiny_llama_dir, tmp_path):
    import json

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    texts = ["The quick brown fox.", "Call me Ishmael.", "12 plus 30 is 42."]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    stream = []
    for t in texts:
        stream += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    blocks = all_blocks(tok, str(tmp_path / "docs.jsonl"), block_size=5)[:]
    assert blocks.shape == (len(stream) // 5, 5)
    assert blocks.flatten().tolist() == stream[: blocks.numel()]
    assert tok.pad_token_id not in blocks.flatten().tolist()


def _reference_loss(model, ids, steps, beta=1.0):
    """The RDS loss written out by hand for one supervised step ``t`` (the state detached before it)."""
    (t,) = steps
    ctx = model.prepare(ids)
    with torch.no_grad():
        h = model.encode(ctx)
        for _ in range(t - 1):
            h = model.loop_step(h, ctx)
        prev = F.cross_entropy(model.decode(h, ctx)[:, :-1].reshape(-1, 48), ids[:, 1:].reshape(-1))
    h = model.loop_step(h, ctx)
    logits = model.decode(h, ctx)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, 48), ids[:, 1:].reshape(-1))
    correct = (logits[:, :-1].argmax(-1) == ids[:, 1:]).float().mean(1)
    bce = F.binary_cross_entropy_with_logits(model.confidence_logit(h, ctx), correct)
    return ce + beta * F.silu(ce - prev) + bce


def test_rds_step_gradient_matches_the_written_out_loss():
    ids = torch.randint(0, 48, (3, 10), generator=torch.Generator().manual_seed(0))
    model = StandInLooped()
    select_trainable(model, ("loop", "gate", "decoder", "head"))
    stats = rds_micro_batch(model, ids, [3], beta=0.5)
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ref = _reference_loss(model, ids, [3], beta=0.5)
    ref.backward()
    assert stats.loss == pytest.approx(ref.item(), rel=1e-6)
    assert set(ours) == {n for n, p in model.named_parameters() if p.requires_grad}
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(ours[name], p.grad, rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in model.encoder.parameters())  # the encoder stays frozen by default


@pytest.mark.parametrize("passes", [1, 2])
def test_rds_skips_steps_after_the_last_supervised_one(passes):
    ids = torch.randint(0, 48, (2, 8), generator=torch.Generator().manual_seed(1))
    model = StandInLooped()
    select_trainable(model, ("loop", "gate", "decoder", "head"))
    stats = rds_micro_batch(model, ids, [2, 5, 9], passes=passes)
    assert stats.count == 3
    assert model.loop_calls == 9 + (passes - 1) * 3  # steps 10.. never run


def _saved_bytes(model, fn) -> int:
    """Activation bytes autograd keeps for backward while ``fn`` runs (each storage once, weights not)."""
    seen = {p.untyped_storage().data_ptr() for p in model.parameters()}
    total = 0

    def pack(t):
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_graph_does_not_grow_with_the_number_of_loop_steps():
    ids = torch.randint(0, 48, (2, 8), generator=torch.Generator().manual_seed(2))
    model = StandInLooped()
    select_trainable(model, ("loop", "gate", "decoder", "head"))
    short = _saved_bytes(model, lambda: rds_micro_batch(model, ids, [2]))
    long = _saved_bytes(model, lambda: rds_micro_batch(model, ids, [16]))
    assert short == long > 0


def test_optimizer_state_round_trips_through_distributed_checkpoint(tmp_path):
    model = StandInLooped()
    named = select_trainable(model, ("loop", "gate", "decoder", "head"))
    cfg = TrainConfig(checkpoint="x", out="y")
    opt, names = build_optimizer(named, cfg, torch.device("cpu"))
    no_decay = dict(zip(names[1], opt.param_groups[1]["params"], strict=True))
    assert "gate.A_log" in no_decay and "norm.weight" in no_decay and "gate.delta_proj.bias" in no_decay
    assert opt.param_groups[1]["weight_decay"] == 0.0 and opt.param_groups[0]["weight_decay"] == 0.1
    ids = torch.randint(0, 48, (2, 8))
    rds_micro_batch(model, ids, [1, 2])
    opt.step()
    save_optimizer(model, opt, tmp_path / "optimizer")
    opt2, _ = build_optimizer(named, cfg, torch.device("cpu"))
    load_optimizer(model, opt2, tmp_path / "optimizer")
    assert len(opt2.state) == len(opt.state) == len(named)
    for _, param in named:
        for key, value in opt.state[param].items():
            torch.testing.assert_close(opt2.state[param][key], value, rtol=0, atol=0)


def test_config_validation_names_the_flag():
    with pytest.raises(LoopusError, match="--supervised 6 is greater than --loop-steps 5"):
        TrainConfig(checkpoint="x", out="y", loop_steps=5, supervised=6).validate()
    with pytest.raises(LoopusError, match="--passes-per-step"):
        TrainConfig(checkpoint="x", out="y", passes_per_step=3).validate()
    with pytest.raises(LoopusError, match="--train"):
        TrainConfig(checkpoint="x", out="y", train_parts=("loops",)).validate()
    assert TrainConfig(checkpoint="x", out="y", loop_steps=20).resolved_eval_loops() == [1, 2, 4, 8, 16, 20]


def test_gradient_checkpointing_is_really_on(looped_tiny):
    from loopus_convert import load_looped

    ids = torch.randint(3, 384, (2, 16), generator=torch.Generator().manual_seed(3))
    grads, saved = [], []
    for checkpointing in (False, True):
        model = load_looped(looped_tiny)
        select_trainable(model, ("loop", "gate", "decoder", "head"))
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        saved.append(_saved_bytes(model, lambda m=model: rds_micro_batch(m, ids, [2, 3])))
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert saved[1] < 0.5 * saved[0]  # activations of the layers are recomputed, not kept
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)

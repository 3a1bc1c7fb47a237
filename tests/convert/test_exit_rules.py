"""The exit rule on its own, the loop settings resolved per call, and the zero-shot criteria kl and argmax."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from loopus_convert import LoopusConfig
from loopus_convert.modeling_loopus import ExitSettings, PassSignals, stop_rule
from tests.convert.conftest import random_ids
from tests.tiny_models import tiny_config


def _settings(**overrides) -> ExitSettings:
    config = LoopusConfig(base_config=tiny_config("llama").to_dict(), split_start=2, split_end=6, num_loops=4)
    return ExitSettings.resolve(config, **overrides)


# ------------------------------------------------------------------------------------------ the rule alone

RULE_CASES = [  # strategy, settings, signals of three rows, rows that stop
    (
        "threshold",
        dict(exit_threshold=0.9),
        dict(confidence=torch.tensor([-3.0, 2.0, 3.0])),
        [False, False, True],
    ),
    ("cdf", dict(exit_threshold=0.9), dict(survival=torch.tensor([0.5, 0.05, 0.2])), [False, True, False]),
    ("convergence", dict(convergence_tol=1e-3), dict(rel_change=torch.tensor([1e-2, 1e-4, 1e-3])), [0, 1, 0]),
    ("kl", dict(kl_threshold=5e-4), dict(kl=torch.tensor([float("nan"), 1e-3, 1e-5])), [False, False, True]),
    ("argmax", dict(argmax_patience=2), dict(stable_passes=torch.tensor([0, 1, 2])), [False, False, True]),
    ("none", dict(), dict(), [False, False, False]),
]


@pytest.mark.parametrize(("strategy", "settings", "signals", "expected"), RULE_CASES)
def test_stop_rule_applies_each_strategy(strategy, settings, signals, expected):
    signals = {"confidence": torch.zeros(3), **signals}
    stop = stop_rule(_settings(exit_strategy=strategy, **settings), 3, PassSignals(**signals))
    assert stop.tolist() == [bool(x) for x in expected]


@pytest.mark.parametrize(("strategy", "settings", "signals", "expected"), RULE_CASES[:-1])
def test_stop_rule_never_stops_before_min_loops(strategy, settings, signals, expected):
    signals = PassSignals(**{"confidence": torch.zeros(3), **signals})
    settings = _settings(exit_strategy=strategy, min_loops=3, **settings)
    assert not stop_rule(settings, 2, signals).any()
    assert stop_rule(settings, 3, signals).tolist() == [bool(x) for x in expected]


# ------------------------------------------------------------------------------------------ settings


def test_settings_are_read_from_the_config_at_call_time(looped_llama):
    """lm-eval sets config attributes after `from_pretrained`: the next call uses them; a keyword wins."""
    model = looped_llama
    ids = random_ids(2, 8, seed=30)
    with torch.no_grad():
        explicit = model(ids, num_loops=3, kv_strategy="first").logits
        model.config.num_loops, model.config.kv_strategy = 3, "first"
        out = model(ids)
        assert out.confidence.shape == (2, 3) and torch.equal(out.logits, explicit)
        assert model(ids, num_loops=1).loops_used.tolist() == [1, 1]
        model.config.kl_threshold = -1.0  # checked when a call resolves it, not only when the config is built
        with pytest.raises(ValueError, match="kl_threshold must be > 0, got -1.0"):
            model(ids)


BAD_SETTINGS = [
    ("kl_threshold", 0.0, "kl_threshold must be > 0, got 0.0"),
    ("kl_threshold", float("nan"), "kl_threshold must be > 0, got nan"),
    ("argmax_patience", 0, "argmax_patience must be an integer >= 1, got 0"),
    ("argmax_patience", 1.5, "argmax_patience must be an integer >= 1, got 1.5"),
    ("kv_strategy", "cycle", "kv_strategy 'cycle' is not one of full, last, first"),
    (
        "exit_strategy",
        "entropy",
        "exit_strategy 'entropy' is not one of none, threshold, cdf, convergence, kl",
    ),
    ("exit_threshold", 1.5, r"exit_threshold must be in \(0, 1\), got 1.5"),
    ("convergence_tol", 0, "convergence_tol must be > 0, got 0"),
    ("num_loops", "7", "num_loops must be an integer >= 1, got '7'"),
    ("max_loops", 0, r"max_loops must be an integer >= min_loops \(1\), got 0"),
]


@pytest.mark.parametrize(("name", "value", "message"), BAD_SETTINGS)
def test_bad_settings_name_the_field_and_the_range(looped_llama, name, value, message):
    with pytest.raises(ValueError, match=message):
        looped_llama(random_ids(1, 4), **{name: value})
    with pytest.raises(ValueError, match=message):
        LoopusConfig(base_config=tiny_config("llama").to_dict(), split_start=2, split_end=6, **{name: value})


def test_settings_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        _settings().num_loops = 2


# ----------------------------------------------------------------------------------------- zero-shot criteria


class _IdentityAfterFirstPass(torch.nn.Module):
    """A gate that keeps the first pass (``h_1 = u``) and makes every later pass the identity (``h_k = h_1``):
    from pass 2 on the next-token distribution has converged exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, u: torch.Tensor, h_old: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return u if self.calls == 1 else h_old


def _converged_after_one_pass(model):
    gate = _IdentityAfterFirstPass()
    model.gate = gate
    model.register_forward_pre_hook(lambda *args, **kwargs: setattr(gate, "calls", 0))  # one count per call
    return model


def _count_loop_rows(model) -> list[int]:
    """The batch size of every call of the first loop-block layer (the rows each pass runs)."""
    sizes: list[int] = []
    first = model.layers[model.config.split_start]
    first.register_forward_hook(lambda module, args, output: sizes.append(args[0].shape[0]))
    return sizes


ZERO_SHOT = [  # settings, passes every row takes when the passes after the first change nothing
    (dict(exit_strategy="kl", kl_threshold=1e-9), 2),  # KL(p_1 || p_2) = 0: the earliest it can be measured
    (dict(exit_strategy="kl", kl_threshold=1e-9, min_loops=4), 4),
    (dict(exit_strategy="argmax", argmax_patience=1), 2),
    (dict(exit_strategy="argmax", argmax_patience=3), 4),
    (dict(exit_strategy="argmax", argmax_patience=1, min_loops=5), 5),
]


@pytest.mark.parametrize(("settings", "passes"), ZERO_SHOT)
def test_zero_shot_criteria_stop_where_the_distribution_has_converged(looped_llama, settings, passes):
    """Per sequence in forward, per token in generation; never before min_loops; the passes are saved."""
    model = _converged_after_one_pass(looped_llama)
    ids = random_ids(2, 10, seed=31)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    sizes = _count_loop_rows(model)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, max_loops=6, **settings)
        assert out.loops_used.tolist() == [passes, passes] and sizes == [2] * passes
        model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=5,
            do_sample=False,
            pad_token_id=0,
            max_loops=6,
            **settings,
        )
    assert torch.stack(model.loop_record).tolist() == [[passes, passes]] * 5


def test_kl_runs_to_max_loops_where_every_pass_still_changes_the_distribution(looped_llama):
    ids = random_ids(2, 10, seed=31)
    with torch.no_grad():
        out = looped_llama(ids, exit_strategy="kl", kl_threshold=1e-9, max_loops=6)
    assert out.loops_used.tolist() == [6, 6]


def _per_pass_next_token(model, ids, passes: int) -> torch.Tensor:
    """log p(next token) at the last position after each pass 1..passes, without early exit: (P, B, V)."""
    ctx = model.prepare(ids)
    h, out = model.encode(ctx), []
    for _ in range(passes):
        h = model.loop_step(h, ctx)
        out.append(F.log_softmax(model.decode(h, ctx)[:, -1].float(), dim=-1))
    return torch.stack(out)


def _first_pass_where(condition: torch.Tensor, passes: int) -> list[int]:
    """Per row, the first pass (1-based) whose condition (P, B) holds, else ``passes``."""
    return [
        next((k + 1 for k in range(passes) if condition[k, row]), passes) for row in range(condition.shape[1])
    ]


def test_kl_and_argmax_follow_their_definitions(looped_llama):
    """On the converted model (no trained head): exit at the first pass whose KL to the previous pass is below
    the threshold, or whose top token has stayed the same for `patience` passes, row by row."""
    model = looped_llama
    ids = random_ids(6, 12, seed=32)
    passes = 6
    with torch.no_grad():
        log_p = _per_pass_next_token(model, ids, passes)  # (P, B, V)
        kl = torch.full(log_p.shape[:2], float("nan"))
        kl[1:] = F.kl_div(log_p[1:], log_p[:-1], reduction="none", log_target=True).sum(
            -1
        )  # KL(p_{k-1} || p_k)
        values = sorted(kl[1:].flatten().tolist())
        gaps = [
            (low * high) ** 0.5 for low, high in zip(values, values[1:], strict=False) if high > 1.05 * low
        ]
        threshold = next(t for t in gaps if len(set(_first_pass_where(kl < t, passes))) >= 2)
        expected = _first_pass_where(kl < threshold, passes)
        out = model(ids, exit_strategy="kl", kl_threshold=threshold, max_loops=passes)
        assert out.loops_used.tolist() == expected
        top = log_p.argmax(-1)  # (P, B)
        same = torch.zeros_like(top, dtype=torch.bool)
        same[1:] = top[1:] == top[:-1]
        out = model(ids, exit_strategy="argmax", argmax_patience=1, max_loops=passes)
        assert out.loops_used.tolist() == _first_pass_where(same, passes)


def test_zero_shot_generation_equals_recomputation(looped_llama):
    """The per-pass trial decodes read the cache and write nothing: a kl generation, with tokens exiting at
    different depths, gives the logits of an uncached run told each token's depth."""
    model = looped_llama
    ids = random_ids(2, 9, seed=33)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        log_p = _per_pass_next_token(model, random_ids(4, 12, seed=34), 4)
        threshold = F.kl_div(log_p[1:], log_p[:-1], reduction="none", log_target=True).sum(-1).median().item()
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=10,
            do_sample=False,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
            exit_strategy="kl",
            kl_threshold=threshold,
            max_loops=4,
        )
        record = torch.stack(model.loop_record)  # (steps, B)
        assert len(set(record[1:].flatten().tolist())) >= 2
        depths = torch.cat([record[0][:, None].expand(-1, ids.shape[1]), record[1:].T], dim=1)
        full = out.sequences[:, :-1]
        full_mask = torch.cat([mask, torch.ones(2, full.shape[1] - ids.shape[1], dtype=mask.dtype)], dim=1)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(
            full, attention_mask=full_mask, position_ids=positions, exit_depths=depths, max_loops=4
        ).logits
    for step, step_logits in enumerate(out.logits):
        assert (step_logits - logits[:, ids.shape[1] - 1 + step]).abs().max().item() <= 1e-4


def test_the_trial_decode_of_a_pass_writes_nothing_to_the_cache(looped_llama):
    """The next-token distribution of a pass runs the decoder layers on the cached history, storing nothing:
    the decoder's slots hold only what the call's real decode writes."""
    model = looped_llama
    ids = random_ids(2, 7, seed=35)
    with torch.no_grad():
        cache = model(ids[:, :6], use_cache=True, num_loops=2).cache
        decoder = {j: [t.clone() for t in cache.slots[(0, j)]] for j in model.decoder_range}
        ctx = model.prepare(ids[:, 6:], cache=cache)
        cache.begin_step(1)
        h = model.loop_step(model.encode(ctx), ctx)
        log_p = model.next_token_log_probs(h, ctx)
    assert log_p.shape == (2, model.config.vocab_size)
    assert torch.allclose(log_p.exp().sum(-1), torch.ones(2))
    for j, kv in decoder.items():
        assert all(torch.equal(a, b) for a, b in zip(cache.slots[(0, j)], kv, strict=True))

"""KV strategies of the loop block: `full` exact, `last` and `first` with the base model's memory.

Every family's tiny model, converted at 2:6, generates under each strategy with left padding and tokens that
exit at different depths; each strategy's cached generation is checked against its own definition.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from loopus_convert.modeling_loopus import LoopusCache
from tests.convert.conftest import random_ids
from tests.convert.test_generation import _generate, _recompute
from tests.tiny_models import FAMILIES

MAX_LOOPS = 4


@pytest.fixture(scope="session")
def looped_family_dirs(tiny_model_dirs, tmp_path_factory) -> dict[str, object]:
    """family -> its tiny model converted at split 2:6."""
    from loopus_convert import convert_model

    root = tmp_path_factory.mktemp("looped-families")
    return {
        family: convert_model(str(path), root / family, split="2:6").out
        for family, path in tiny_model_dirs.items()
    }


def _looped(looped_family_dirs, family: str):
    from loopus_convert import load_looped

    return load_looped(looped_family_dirs[family])


class _ScatteredHead(torch.nn.Module):
    """A stand-in confidence head whose logit is a pseudo-random function of the state, about +-10: under
    the threshold rule at tau 0.5 a token stops after each pass with probability ~1/2, in every family."""

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return 10 * torch.sin(1e3 * feature.float().sum(dim=-1))  # (B, D) -> (B,)


def _left_padded(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = random_ids(2, 9, seed=seed)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return ids, mask


def _generate_early_exit(model, ids, mask, new: int, kv_strategy: str):
    """Cached generation with early exit, and each token's depth (B, prompt + new - 1). Sampled (seeded):
    greedy decoding of a tiny random model soon repeats one token, which then always exits at one depth."""
    torch.manual_seed(0)
    out = _generate(
        model,
        ids,
        mask,
        new,
        min_new_tokens=new,
        do_sample=True,
        exit_strategy="threshold",
        exit_threshold=0.5,
        max_loops=MAX_LOOPS,
        kv_strategy=kv_strategy,
    )
    record = torch.stack(model.loop_record)  # (steps, B): the prompt's loops, then each fed token's
    depths = torch.cat([record[0][:, None].expand(-1, ids.shape[1]), record[1:].T], dim=1)
    return out, depths


def _stepwise(model, sequences, prompt_mask, depths, cache, **kwargs) -> list[torch.Tensor]:
    """Logits at each generation step from the prompt as one call, then one call per token, through
    ``cache``, with every token's depth fixed."""
    total = sequences.shape[1] - 1
    extra = torch.ones(prompt_mask.shape[0], total - prompt_mask.shape[1], dtype=prompt_mask.dtype)
    mask = torch.cat([prompt_mask, extra], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    bounds = [0, prompt_mask.shape[1], *range(prompt_mask.shape[1] + 1, total + 1)]
    logits = []
    with torch.no_grad():
        for start, end in zip(bounds, bounds[1:], strict=False):
            out = model(
                sequences[:, start:end],
                attention_mask=mask[:, :end],
                position_ids=positions[:, start:end],
                cache=cache,
                use_cache=True,
                exit_depths=depths[:, start:end],
                num_loops=MAX_LOOPS,
                **kwargs,
            )
            logits.append(out.logits[:, -1])
    return logits


class _LastByDefinition(LoopusCache):
    """``last`` as its definition says: ``full``, then at the end of each call every new token's final-pass
    K/V (the deepest slot holds it after propagation) written into all of its pass slots."""

    def end_step(self) -> None:
        start = self.seq_length
        for layer in self.loop_layers:
            final = self.slots[(self.num_passes, layer)]
            for k in range(1, self.num_passes):
                for i in range(2):
                    self.slots[(k, layer)][i][:, :, start:] = final[i][:, :, start:]
        super().end_step()


def _assert_steps_match(out, reference) -> None:
    """Every generation step's logits within 1e-4 of the reference's."""
    assert len(reference) == len(out.logits)
    for step, logits in enumerate(out.logits):
        assert (logits - reference[step]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_first_cached_generation_equals_an_uncached_forward(looped_family_dirs, family):
    """`first`: every pass attends to the first pass's K/V, which later passes never change, so generation
    token by token gives the logits of one uncached forward (with each token's depth), on every family."""
    model = _looped(looped_family_dirs, family)
    model.confidence_head = _ScatteredHead()
    ids, mask = _left_padded(seed=9)
    out, depths = _generate_early_exit(model, ids, mask, 8, "first")
    assert len(set(depths[:, ids.shape[1] - 1 :].flatten().tolist())) >= 2  # tokens exit at different depths
    uncached = dict(exit_depths=depths, num_loops=MAX_LOOPS)
    reference = _recompute(model, out.sequences, mask, 8, kv_strategy="first", **uncached)
    _assert_steps_match(out, reference)
    exact = _recompute(model, out.sequences, mask, 8, kv_strategy="full", **uncached)
    assert max((a - b).abs().max().item() for a, b in zip(reference, exact, strict=True)) > 1e-3  # not `full`


@pytest.mark.parametrize("family", FAMILIES)
def test_last_cached_generation_follows_its_definition(looped_family_dirs, family):
    """`last` (one slot per loop layer, overwritten by each pass) gives the logits of its definition, on
    every family: `full` with every token's final-pass K/V written into all its pass slots (plain `full`
    differs)."""
    model = _looped(looped_family_dirs, family)
    model.confidence_head = _ScatteredHead()
    ids, mask = _left_padded(seed=9)
    out, depths = _generate_early_exit(model, ids, mask, 8, "last")
    assert len(set(depths[:, ids.shape[1] - 1 :].flatten().tolist())) >= 2
    by_definition = _LastByDefinition(model.loop_range)
    reference = _stepwise(model, out.sequences, mask, depths, by_definition, kv_strategy="full")
    _assert_steps_match(out, reference)
    exact = _stepwise(model, out.sequences, mask, depths, LoopusCache(model.loop_range), kv_strategy="full")
    assert max((a - b).abs().max().item() for a, b in zip(reference, exact, strict=True)) > 1e-3


def test_one_call_under_last_computes_what_full_does(looped_llama):
    """Within one call every token attends to the others at the current pass: `last` = `full` there, also
    with tokens stopped at different depths; `first` differs from the second pass on."""
    ids = random_ids(2, 12, seed=21)
    depths = torch.randint(1, 5, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for kwargs in (dict(num_loops=3), dict(exit_depths=depths)):
            full = looped_llama(ids, use_cache=True, kv_strategy="full", **kwargs)
            last = looped_llama(ids, use_cache=True, kv_strategy="last", **kwargs)
            assert (full.logits - last.logits).abs().max().item() <= 1e-5
        one = [looped_llama(ids, num_loops=1, kv_strategy=s).logits for s in ("full", "first")]
        three = [looped_llama(ids, num_loops=3, kv_strategy=s).logits for s in ("full", "first")]
    assert (one[0] - one[1]).abs().max().item() <= 1e-5
    assert (three[0] - three[1]).abs().max().item() > 1e-3


def _dynamic_cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_bytes_per_strategy(looped_family_dirs, tiny_model_dirs, family):
    """Bytes held after the same generation: `last` and `first` as the base model's cache (<= 1.1x), `full`
    (L + (P - 1)(B - A)) / L of it: one slot set per pass of the 4 loop layers."""
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[family]).eval()
    model = _looped(looped_family_dirs, family)
    ids = random_ids(2, 6, seed=22)  # 11 cached tokens: under the tiny Gemma's sliding window (16)
    settings = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    settings["return_dict_in_generate"] = True
    with torch.no_grad():
        base_bytes = _dynamic_cache_bytes(base.generate(ids, **settings).past_key_values)
        held = {
            strategy: model.generate(
                ids, num_loops=MAX_LOOPS, kv_strategy=strategy, **settings
            ).past_key_values.memory_bytes()
            for strategy in ("full", "last", "first")
        }
    assert held["last"] <= 1.1 * base_bytes and held["first"] <= 1.1 * base_bytes
    assert held["full"] == base_bytes * (8 + (MAX_LOOPS - 1) * 4) // 8


def test_a_cache_keeps_its_strategy(looped_llama):
    ids = random_ids(1, 5, seed=23)
    with torch.no_grad():
        cache = looped_llama(ids, num_loops=2, use_cache=True, kv_strategy="last").cache
        with pytest.raises(ValueError, match="kv_strategy 'last'"):
            looped_llama(ids[:, -1:], cache=cache, num_loops=2, kv_strategy="full")
        # one slot per loop layer: a later call may run deeper than the first (`full` refuses, see
        # test_generation_keeps_the_loop_count_of_its_cache)
        deeper = looped_llama(ids[:, -1:], cache=cache, num_loops=4, kv_strategy="last")
    assert deeper.loops_used.tolist() == [4] and cache.get_seq_length() == 6


@pytest.mark.parametrize("bad", ["middle", "cycle:2", ""])
def test_an_unknown_kv_strategy_is_a_value_error(looped_llama, bad):
    with pytest.raises(ValueError, match="kv_strategy .* is not one of full, last, first"):
        looped_llama(random_ids(1, 4), kv_strategy=bad)


def test_kv_strategy_stats_measure_each_strategy_against_full(looped_llama):
    """`loopus eval --kv-strategy`: token-by-token decoding per strategy and K; `full` is exact (the CE of one
    uncached forward), one loop is the same for every strategy, and the bytes are the promised ones."""
    from loopus_convert.measure import kv_strategy_stats

    model = looped_llama
    blocks = random_ids(3, 12, seed=24)
    stats = kv_strategy_stats(model, blocks, ["last", "first"], [1, 3], batch_size=2)
    assert stats["prompt_tokens"] == 6 and stats["decoded_tokens"] == 3 * 6
    per = stats["strategies"]
    assert list(per) == ["full", "last", "first"]
    with torch.no_grad():
        logits = model(blocks, num_loops=3).logits[:, 5:-1]
    uncached = F.cross_entropy(logits.flatten(0, 1), blocks[:, 6:].flatten()).item()
    assert per["full"]["3"]["loss"] == pytest.approx(uncached, abs=1e-5)
    for name in ("last", "first"):
        assert per[name]["1"]["loss"] == pytest.approx(per["full"]["1"]["loss"], abs=1e-5)
        assert per[name]["1"]["agreement"] == 1.0 and per[name]["3"]["vs_base"] == 1.0
        assert abs(per[name]["3"]["loss"] - per["full"]["3"]["loss"]) > 1e-4
        assert 0.0 <= per[name]["3"]["agreement"] <= 1.0
    assert per["full"]["3"]["agreement"] == 1.0 and per["full"]["3"]["vs_base"] == (8 + 2 * 4) / 8
    assert per["full"]["3"]["cache_bytes"] == 2 * per["last"]["3"]["cache_bytes"]

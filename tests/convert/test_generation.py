"""Running the looped model: cached generation = recomputation, left padding, early exit saves compute."""

from __future__ import annotations

import pytest
import torch

from loopus_convert.modeling_loopus import LoopusCache
from tests.convert.conftest import random_ids


def _recompute(model, sequences, prompt_mask, num_new, **kwargs):
    """Uncached logits of a full sequence (prompt + all generated tokens but the last)."""
    full = sequences[:, :-1]
    mask = torch.cat(
        [
            prompt_mask,
            torch.ones(full.shape[0], full.shape[1] - prompt_mask.shape[1], dtype=prompt_mask.dtype),
        ],
        dim=1,
    )
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(full, attention_mask=mask, position_ids=positions, **kwargs).logits
    start = prompt_mask.shape[1] - 1
    return [logits[:, start + i] for i in range(num_new)]


def _generate(model, ids, mask, new, **kwargs):
    """Greedy unless told otherwise, with the raw logits of every step."""
    settings = dict(do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=new, **{**settings, **kwargs})


def test_cached_generation_equals_recomputation_at_fixed_k(looped_llama):
    ids = random_ids(2, 10, seed=8)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    out = _generate(looped_llama, ids, mask, 6, num_loops=3)
    assert [r.tolist() for r in looped_llama.loop_record] == [[3, 3]] * 6
    recomputed = _recompute(looped_llama, out.sequences, mask, 6, num_loops=3)
    for step, logits in enumerate(out.logits):
        assert (logits - recomputed[step]).abs().max().item() <= 1e-4
        assert torch.equal(logits.argmax(-1), out.sequences[:, 10 + step])


def _noisy_confidence_head(model, seed: int = 0, scale: float = 1.0) -> None:
    """A confidence head whose logit swings around 0 from token to token: tokens exit at varied depths."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.confidence_head.proj.weight.copy_(torch.randn(1, 64, generator=generator) * scale)
        model.confidence_head.proj.bias.zero_()


def test_cached_early_exit_generation_equals_recomputation(looped_llama):
    """Tokens exit at different depths; deeper passes of later tokens see the exited tokens' propagated K/V,
    and an uncached recomputation told each token's depth gives the same logits and tokens."""
    model = looped_llama
    _noisy_confidence_head(model, seed=3, scale=0.2)
    ids = random_ids(2, 9, seed=9)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    new = 10
    out = _generate(model, ids, mask, new, exit_strategy="cdf", exit_threshold=0.8, max_loops=4)
    record = torch.stack(model.loop_record)  # (steps, B): loops used by the prompt, then each fed token
    assert record.shape == (new, 2)
    assert len(set(record[:, 0].tolist())) >= 3  # really different depths within one sequence
    assert int(record.min()) >= 1 and int(record.max()) <= 4
    depths = torch.cat([record[0][:, None].expand(-1, ids.shape[1]), record[1:].T], dim=1)  # (B, T + new - 1)
    recomputed = _recompute(model, out.sequences, mask, new, exit_depths=depths, max_loops=4)
    for step, logits in enumerate(out.logits):
        assert (logits - recomputed[step]).abs().max().item() <= 1e-4
        assert torch.equal(logits.argmax(-1), out.sequences[:, ids.shape[1] + step])
    # without propagation (deeper slots left empty) the history would be wrong: check the cache is complete
    cache = out.past_key_values
    assert isinstance(cache, LoopusCache)
    lengths = {kv[0].shape[2] for kv in cache.slots.values()}
    assert lengths == {ids.shape[1] + new - 1} and cache.num_passes == 4
    for layer in model.loop_range:  # every deeper slot holds the exit pass's K/V, and that one is real
        for row in range(2):
            for pos in range(depths.shape[1]):
                exit_pass = int(depths[row, pos])
                exit_kv = cache.slots[(exit_pass, layer)][0][row, :, pos]
                assert exit_kv.abs().sum() > 0
                for deeper in range(exit_pass + 1, 5):
                    assert torch.equal(cache.slots[(deeper, layer)][0][row, :, pos], exit_kv)


def test_left_padded_batch_gives_the_same_tokens_as_each_prompt_alone(looped_llama):
    model = looped_llama
    prompts = [random_ids(1, n, seed=10 + n)[0] for n in (5, 11, 8)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    batched = _generate(model, ids, mask, 8, num_loops=2).sequences[:, width:]
    for row, prompt in enumerate(prompts):
        alone = _generate(model, prompt[None], torch.ones(1, len(prompt), dtype=torch.long), 8, num_loops=2)
        assert torch.equal(alone.sequences[0, len(prompt) :], batched[row])


def test_sampling_runs_and_is_seeded(looped_llama):
    ids = random_ids(1, 6, seed=11)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        with torch.no_grad():
            runs.append(
                looped_llama.generate(
                    ids,
                    max_new_tokens=6,
                    do_sample=True,
                    temperature=0.9,
                    top_p=0.9,
                    num_loops=2,
                    pad_token_id=0,
                )
            )
    assert torch.equal(runs[0], runs[1]) and runs[0].shape == (1, 12)


def _count_loop_rows(model):
    """Record the batch size of every call of the first loop-block layer."""
    sizes: list[int] = []
    first = model.layers[model.config.split_start]
    handle = first.register_forward_hook(lambda module, args, output: sizes.append(args[0].shape[0]))
    return sizes, handle


def _expected_exit(sig: torch.Tensor, tau: float, min_loops: int, max_loops: int) -> list[int]:
    depths = []
    for row in sig:
        depth = max_loops
        for k in range(min_loops, max_loops + 1):
            if row[k - 1] > tau:
                depth = k
                break
        depths.append(depth)
    return depths


def test_early_exit_rows_leave_the_batch(looped_llama):
    """A sequence that exits at loop k costs k loop passes, and loops_used reports k."""
    model = looped_llama
    _noisy_confidence_head(model, seed=1)
    ids = random_ids(4, 12, seed=12)
    with torch.no_grad():
        sig = torch.sigmoid(model(ids, num_loops=4).confidence)  # (B, 4) the q of each pass, nobody exiting
    values = sorted(sig.flatten().tolist())
    chosen = None
    for low, high in zip(
        values, values[1:], strict=False
    ):  # a tau far from every q that gives varied exit depths
        tau = (low + high) / 2
        depths = _expected_exit(sig, tau, 1, 4)
        if high - low > 1e-3 and 0 < tau < 1 and len(set(depths)) >= 2 and min(depths) < 4:
            chosen = tau, depths
            break
    assert chosen is not None
    tau, depths = chosen
    sizes, handle = _count_loop_rows(model)
    with torch.no_grad():
        out = model(ids, exit_strategy="threshold", exit_threshold=tau, max_loops=4)
    handle.remove()
    assert out.loops_used.tolist() == depths
    assert sizes == [sum(d >= k for d in depths) for k in range(1, max(depths) + 1)]
    assert sum(sizes) == sum(depths)  # each row paid exactly its own passes
    assert torch.isnan(out.confidence[torch.tensor(depths) < 4, -1]).all()


@pytest.mark.parametrize("strategy", ["cdf", "convergence"])
def test_other_exit_strategies(looped_llama, strategy):
    model = looped_llama
    with torch.no_grad():
        model.confidence_head.proj.weight.zero_()
        model.confidence_head.proj.bias.fill_(0.0)  # sigmoid(q) = 0.5 at every pass
    ids = random_ids(2, 8, seed=13)
    with torch.no_grad():
        if strategy == "cdf":  # 1 - 0.5^k > 0.8 first at k = 3
            out = model(ids, exit_strategy="cdf", exit_threshold=0.8, max_loops=6)
            assert out.loops_used.tolist() == [3, 3]
        else:  # a huge tolerance stops at min_loops, a tiny one runs to max_loops
            assert model(
                ids, exit_strategy="convergence", convergence_tol=1e6, min_loops=2, max_loops=5
            ).loops_used.tolist() == [2, 2]
            assert model(
                ids, exit_strategy="convergence", convergence_tol=1e-12, max_loops=5
            ).loops_used.tolist() == [5, 5]


def test_generation_keeps_the_loop_count_of_its_cache(looped_llama):
    ids = random_ids(1, 5, seed=14)
    with torch.no_grad():
        out = looped_llama(ids, num_loops=2, use_cache=True)
        with pytest.raises(ValueError, match="loop passes"):
            looped_llama(ids[:, -1:], cache=out.cache, num_loops=3)

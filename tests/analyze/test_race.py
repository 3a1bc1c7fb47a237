"""The race over the splits (loopus_analyze.race): elimination never removes the split the uniform map would
choose, a model whose repeat costs all exceed the budget still gets a useful block, a race that cannot
separate says so, and the bookkeeping adds up."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loopus_analyze import heldout
from loopus_analyze import race as race_module
from loopus_analyze.assess import _reason
from loopus_analyze.functional import Sample, measure_map, prediction_mask, stack_windows
from loopus_analyze.intervals import t_interval
from loopus_analyze.race import (
    GROWTH,
    HEAD_STRIDE,
    ROUND0_WINDOWS,
    candidates,
    decide,
    run_race,
    schedule,
    stability_sentence,
)
from loopus_analyze.rule import Rule, choose, useful_length
from tests.analyze.test_planted import LAYERS, planted_model, sampled_ids

WARMUP = heldout.WARMUP


def _windows(ids: torch.Tensor) -> list:
    """One-window batches, one document each (as heldout.windows makes them)."""
    return [heldout.corpus.TokenBatch(row[None], torch.ones_like(row[None]), torch.tensor([d]))
            for d, row in enumerate(ids)]


def _uniform_choice(model, rule: Rule, batches: list) -> tuple[int, int]:
    """The rule applied to the uniform map: every candidate on every window."""
    blocks = candidates(rule)
    sums, _ = measure_map(model, batches, entries=[(b, a) for a, b in blocks], passes=1,
                          warmup=WARMUP)
    costs = sums.repeat("delta_nll")
    choice = choose(rule, costs)
    return choice.start, choice.end


@pytest.fixture(scope="module")
def random_model():
    """No plant: every block's repeat cost is substantial and the blocks are close to each other."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny_models import VOCAB

    torch.manual_seed(5)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    return model


@pytest.mark.parametrize("seed", range(5))
def test_elimination_never_removes_the_split_the_uniform_map_chooses(random_model, seed):
    batches = _windows(sampled_ids(random_model, 12, 64, seed=10 + seed))
    final = sum(64 - 1 - WARMUP for _ in batches)
    fixed = Rule.make(LAYERS, "4")  # placement only
    budgeted = Rule.make(LAYERS, repeat_budget=None)  # the default rule: lengths and placements
    for rule in (fixed, budgeted):
        race = run_race(random_model, rule, batches, final_tokens=final, warmup=WARMUP)
        uniform = _uniform_choice(random_model, rule, batches[:race.final_windows])
        # a survivor has read every window of the round it survived; the uniform choice is among them
        assert uniform in race.survivors, (seed, rule.lengths, uniform, race.survivors, race.stop)


def test_elimination_happens_and_the_bookkeeping_adds_up(random_model):
    batches = _windows(sampled_ids(random_model, 12, 64, seed=3))
    rule = Rule.make(LAYERS)
    race = run_race(random_model, rule, batches, final_tokens=10_000, warmup=WARMUP)
    rounds = race.rounds
    assert rounds[0].entered == len(candidates(rule)) == 21  # lengths 3..8 of 10 layers
    assert rounds[0].windows == ROUND0_WINDOWS and rounds[0].documents == ROUND0_WINDOWS
    for before, after in zip(rounds, rounds[1:], strict=False):
        assert after.entered == before.survivors
        assert after.windows == min(before.windows * GROWTH, race.final_windows)
        assert after.tokens > before.tokens
    for r in rounds:
        assert r.entered - r.survivors == r.out_placement + r.out_length + r.narrowed
    assert sum(r.out_placement + r.out_length for r in rounds) > 0  # it does eliminate
    tokens = race.sums.entry_tokens()
    for a, b in race.survivors:  # every survivor read the last round's windows
        assert tokens[b, a] == rounds[-1].tokens
    # round 0 always runs; a later round only when it fits the cap
    assert race.work <= max(race.cap, rounds[0].work) + 1e-6
    assert race.work == pytest.approx(sum(r.work for r in rounds))
    record = race.to_json()
    assert [r["survivors"] for r in record["rounds"]] == [r.survivors for r in rounds]
    assert record["tokens_per_split"] and record["leaders"]


def test_a_model_whose_repeat_costs_all_exceed_the_budget_gets_a_quarter_of_its_layers(random_model):
    batches = _windows(sampled_ids(random_model, 12, 64, seed=4))
    rule = Rule.make(LAYERS)  # default budget 0.25 nats
    race = run_race(random_model, rule, batches, final_tokens=2000, warmup=WARMUP)
    costs = race.sums.repeat("delta_nll")
    assert np.nanmin(costs) > rule.budget  # every block repeats above the budget on this model
    choice, confidence, why = decide(random_model, rule, race, batches, warmup=WARMUP)
    assert choice.fallback and choice.length == useful_length(LAYERS) == 3 and choice.length >= LAYERS / 4
    same = {a: costs[a, a + 3] for a in range(1, LAYERS - 3) if (a, a + 3) in race.survivors}
    assert choice.start == min(same, key=same.get)  # its cheapest placement among those still racing
    assert choice.excess(rule.budget) > 0
    rec = {"repeat": {"delta_nll": {"value": 1.0, "low": 0.9, "high": 1.1}, "kl": {"value": 0.5}}}
    text = _reason(rule, choice, rec, True, [], why)
    assert f"{choice.excess(rule.budget):+.3f} nats above the budget" in text and "3-layer block" in text


def _near_identity_race():
    """The race of ``--loop-layers 4`` on the planted model with every layer near-identity: every block
    repeats for free, nothing separates."""
    model = planted_model()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(1e-4)
            layer.mlp.down_proj.weight.mul_(1e-4)
    batches = _windows(sampled_ids(model, 8, 48, seed=1))
    rule = Rule.make(LAYERS, "4")
    return model, rule, run_race(model, rule, batches, final_tokens=10_000, warmup=WARMUP), batches


def test_a_race_that_cannot_separate_is_low_confidence_and_says_why():
    model, rule, race, batches = _near_identity_race()
    assert not race.separated
    choice, confidence, why = decide(model, rule, race, batches, warmup=WARMUP)
    assert confidence in ("low", "medium")
    assert "could not separate" in why or "not every paired interval clears 0" in why


def test_map_tokens_smaller_than_one_window_is_refused():
    from loopus_analyze.analyze import _Settings
    from loopus_core.errors import LoopusError

    settings = _Settings(None, 512, 32, 0, "float32", "cpu", False, heldout.MIN_MAP_TOKENS - 1, None, None)
    with pytest.raises(LoopusError, match=f"--map-tokens {heldout.MIN_MAP_TOKENS - 1} is out of range"):
        settings.validate()
    assert heldout.MIN_MAP_TOKENS == heldout.MAP_SEQ_LEN - 1 - WARMUP


def test_schedule_doubles_up_to_the_final_windows():
    batches = _windows(torch.ones((60, 64), dtype=torch.long))
    per_window = 64 - 1 - WARMUP
    rounds = schedule(batches, 2000, WARMUP)
    assert rounds[0] == ROUND0_WINDOWS and rounds[-1] * per_window >= 2000
    assert (rounds[-1] - 1) * per_window < 2000
    assert all(b == min(a * 2, rounds[-1]) for a, b in zip(rounds, rounds[1:], strict=False))


def test_predictions_are_scored_past_the_warm_up():
    mask = torch.ones((1, 8), dtype=torch.long)
    assert prediction_mask(mask, 3).tolist() == [[False, False, False, True, True, True, True]]
    assert prediction_mask(mask, 0).tolist() == prediction_mask(mask).tolist() == [[False] + [True] * 6]


def test_too_few_documents_eliminate_nothing_and_say_so(random_model):
    batches = _windows(sampled_ids(random_model, 2, 64, seed=6))  # two windows: two documents
    rule = Rule.make(LAYERS)
    race = run_race(random_model, rule, batches, final_tokens=10_000, warmup=WARMUP)
    assert race.survivors == candidates(rule) and race.rounds[0].documents == 2
    choice, confidence, why = decide(random_model, rule, race, batches, warmup=WARMUP)
    assert confidence == "low" and "only 2 document(s)" in why and "raise --map-tokens" in why


SUMS = ("count", "base_nll", "nll", "kl", "agree", "entry_count", "entry_base")


def test_a_sampled_read_and_its_rest_score_every_prediction_once(random_model):
    batches = _windows(sampled_ids(random_model, 3, 64, seed=8))
    entries = [(b, a) for a, b in candidates(Rule.make(LAYERS, "4"))]
    every, _ = measure_map(random_model, batches, entries=entries, passes=1, warmup=WARMUP)
    half, _ = measure_map(random_model, batches, entries=entries, passes=1, warmup=WARMUP,
                          sample=Sample(HEAD_STRIDE))
    rest, _ = measure_map(random_model, batches, entries=entries, passes=1, warmup=WARMUP,
                          sample=Sample(HEAD_STRIDE).others())
    assert 0 < half.tokens < rest.tokens and half.tokens + rest.tokens == every.tokens
    half.add(rest)
    for name in SUMS:
        np.testing.assert_allclose(getattr(half, name), getattr(every, name), rtol=1e-5, atol=1e-6)
    mask = torch.ones((1, 12), dtype=torch.long)
    assert prediction_mask(mask, 3, Sample(4)).nonzero()[:, 1].tolist() == [3, 7]


def test_stacked_windows_give_the_sums_of_one_window_at_a_time(random_model):
    ids = sampled_ids(random_model, 4, 64, seed=9)
    short = heldout.corpus.TokenBatch(ids[2:3, :40], torch.ones((1, 40), dtype=torch.long), torch.tensor([2]))
    batches = [*_windows(ids[:2]), short, *_windows(ids[3:])]
    stacked = stack_windows(batches, 1)  # one batch, the short window right-padded
    assert len(stacked) == 1 and stacked[0].input_ids.shape == (4, 64)
    assert stacked[0].attention_mask.sum() == 64 * 3 + 40
    assert len(stack_windows(batches, 1, limit=2 * 64)) == 2  # two rows of 64 positions at most
    entries = [(b, a) for a, b in candidates(Rule.make(LAYERS, "4"))]
    together, _ = measure_map(random_model, batches, entries=entries, passes=1, warmup=WARMUP)
    alone = [measure_map(random_model, [batch], entries=entries, passes=1, warmup=WARMUP,
                         documents=together.documents)[0] for batch in batches]
    for other in alone[1:]:
        alone[0].add(other)
    alone = alone[0]
    for name in SUMS:
        np.testing.assert_allclose(getattr(together, name), getattr(alone, name), rtol=1e-4, atol=1e-5)


def test_the_t_interval_is_the_textbook_one_for_equal_documents():
    from scipy import stats

    means = np.array([0.3, 0.5, 0.1, 0.4])
    value, low, high = t_interval(means * 10, np.full(4, 10.0), 0.9)
    half = stats.t.ppf(0.95, 3) * means.std(ddof=1) / np.sqrt(4)
    assert value == pytest.approx(means.mean()) and (low, high) == pytest.approx((value - half, value + half))
    assert t_interval(np.array([1.0]), np.array([2.0]), 0.9)[1:] == (-np.inf, np.inf)


def test_the_contenders_read_every_prediction_of_the_final_windows(random_model):
    batches = _windows(sampled_ids(random_model, 12, 64, seed=3))
    rule = Rule.make(LAYERS)
    race = run_race(random_model, rule, batches, final_tokens=300, warmup=WARMUP)
    full = sum(int(prediction_mask(b.attention_mask, WARMUP).sum()) for b in batches[:race.final_windows])
    sampled = sum(int(prediction_mask(b.attention_mask, WARMUP, Sample(HEAD_STRIDE)).sum())
                  for b in batches[:race.rounds[0].windows])
    assert race.rounds[0].tokens == sampled < full
    choice, _, _ = decide(random_model, rule, race, batches, warmup=WARMUP)
    tokens = race.sums.entry_tokens()
    assert race.contenders[0] == (choice.start, choice.end)
    assert all(tokens[b, a] == full >= 300 for a, b in race.contenders)


def _planted_race(monkeypatch, share: float):
    """The default rule's race on the planted model with the work cap at ``share`` of the uniform map."""
    monkeypatch.setattr(race_module, "RACE_SHARE", share)
    model = planted_model()
    batches = _windows(sampled_ids(model, 12, 64, seed=3))
    rule = Rule.make(LAYERS)
    race = run_race(model, rule, batches, final_tokens=10_000, warmup=WARMUP)
    return model, rule, race, batches


def test_at_the_work_cap_the_race_narrows_to_each_lengths_leader(monkeypatch):
    model, rule, race, batches = _planted_race(monkeypatch, 0.4)
    first, second = race.rounds[:2]
    assert second.narrowed == sum(race.narrowed.values()) > 0  # round 1 of every survivor did not fit
    assert second.entered == first.survivors
    assert second.entered - second.survivors == second.out_placement + second.out_length + second.narrowed
    read_on = [blk for blk, windows in race.windows_read.items() if windows == second.windows]
    lengths = [b - a for a, b in read_on]
    assert len(read_on) == second.entered - second.narrowed and len(set(lengths)) == len(lengths)
    later = batches[first.windows:second.windows]
    full = sum(int(prediction_mask(w.attention_mask, WARMUP).sum()) for w in later)
    for a, b in read_on:  # round 0 scored every 4th prediction, the narrowed round every one
        assert race.sampled[(a, b)] == first.windows and race.sums.entry_tokens()[b, a] == first.tokens + full
    for n in race.narrowed:  # one leader per length read on; its verdict says how it was chosen
        assert "by point estimate" in race.verdicts[n] or "length out" in race.verdicts[n]
    assert race.to_json()["narrowed"] == {str(n): k for n, k in sorted(race.narrowed.items())}


def test_an_unseparated_choice_is_unstable_and_names_its_alternatives():
    model, rule, race, batches = _near_identity_race()
    choice, confidence, _ = decide(model, rule, race, batches, warmup=WARMUP)
    assert not race.stable and confidence != "high"
    sentence = stability_sentence(race)
    assert sentence.startswith(f"unstable: the selection text does not separate {choice.split} from ")
    for alt in race.alternatives:
        a, b = map(int, alt["split"].split(":"))
        assert alt["split"] in sentence and alt["length"] == b - a == 4
        assert alt["why"].startswith("same length")
        assert (a, b) in race.contenders and alt["tokens"] == race.sums.entry_tokens()[b, a] > 0
    assert race.stability_json() == {"stable": False, "alternatives": race.alternatives, "sentence": sentence}


@pytest.mark.parametrize("share", [1 / 6, 1.0])
def test_a_separated_choice_is_stable(monkeypatch, share):
    model, rule, race, batches = _planted_race(monkeypatch, share)  # 1/6: round 0 only; 1.0: every round
    choice, confidence, _ = decide(model, rule, race, batches, warmup=WARMUP)
    assert choice.split == "3:7"  # the planted near-identity layers 3..6
    rivals = [blk for blk in race.contenders if blk[1] - blk[0] != choice.length]
    assert {b - a for a, b in rivals} == {b - a for a, b in race.survivors} - {4}  # each length's leader
    assert all(blk in race.complete for blk in race.contenders)  # read on every prediction
    assert race.stable and race.alternatives == [] and confidence == "high"
    assert stability_sentence(race).startswith("stable: the final round separates 3:7 ")

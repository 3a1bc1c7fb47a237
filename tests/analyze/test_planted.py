"""A planted loop-friendly block: a tiny Llama whose layers 3..6 are made near-identity (their residual
branches scaled by 1e-4), so that running any block inside them twice changes nothing, while repeating or
skipping any other layer changes the predictions a lot. The map and the recommendation must find 3:7.

The text is sampled from the planted model itself, so that the base model predicts it well and a variant's
NLL change is (in expectation) its KL to the base model: on random tokens a random model is confidently
wrong and any flattening of its predictions would "help". A word-level tokenizer (token i is the word
``t{i}``) makes text and token ids round-trip exactly.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from loopus_analyze.analyze import run_analysis
from loopus_analyze.functional import measure_map
from loopus_analyze.rule import Rule, choose
from tests.tiny_models import VOCAB

LAYERS = 10
PLANT = range(3, 7)  # near-identity layers: the loop-friendly block is 3:7


def planted_model(plant: range = PLANT):
    """The tiny Llama with the layers in ``plant`` near-identity (none: every repeated block costs a lot)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            if i in plant:
                layer.self_attn.o_proj.weight.mul_(1e-4)
                layer.mlp.down_proj.weight.mul_(1e-4)
        model.lm_head.weight.mul_(30.0)  # confident predictions: changes to the stream show in the NLL
    return model


def sampled_ids(model, rows: int, length: int, seed: int) -> torch.Tensor:
    """``rows`` sequences [BOS] + ``length - 1`` tokens sampled from the model (no special tokens)."""
    torch.manual_seed(seed)
    return model.generate(torch.ones((rows, 1), dtype=torch.long), do_sample=True, top_k=0,
                          max_new_tokens=length - 1, min_new_tokens=length - 1, pad_token_id=0,
                          suppress_tokens=[0, 1, 2])


def word_tokenizer():
    """Token i <-> the word ``t{i}``: text and ids round-trip exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2} | {f"t{i}": i for i in range(3, VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>")


@pytest.fixture(scope="module")
def model():
    return planted_model()


def test_the_map_finds_the_planted_block(model):
    ids = sampled_ids(model, 8, 32, seed=1)
    batch = SimpleNamespace(input_ids=ids, attention_mask=torch.ones_like(ids), doc_ids=torch.arange(8))
    sums, _ = measure_map(model, [batch])
    repeat = sums.repeat("delta_nll")
    assert abs(repeat[3, 7]) < 1e-3  # the planted block repeats for free
    inside = [repeat[a, b] for a in PLANT for b in range(a + 2, PLANT.stop + 1)]
    assert max(abs(v) for v in inside) < 1e-3
    others = [repeat[a, b] for a in range(1, LAYERS - 1) for b in range(a + 2, LAYERS)
              if np.isfinite(repeat[a, b]) and not (a >= PLANT.start and b <= PLANT.stop)]
    assert min(others) > 0.3  # any block with another layer in it costs a lot
    skip = sums.skip("delta_nll")
    assert abs(skip[3, 7]) < 1e-3 and np.nanmin(skip[1:3, 8:10]) > 0.3  # removing the plant is free too
    choice = choose(Rule.make(LAYERS), repeat)
    assert (choice.start, choice.end) == (3, 7) and not choice.fallback


@pytest.fixture(scope="module")
def planted_dir(model, tmp_path_factory):
    """The planted model saved with a word-level tokenizer, and 200 documents sampled from it."""
    root = tmp_path_factory.mktemp("planted")
    path = root / "planted"
    model.save_pretrained(path)
    tokenizer = word_tokenizer()
    tokenizer.save_pretrained(path)
    data = root / "sampled.jsonl"
    with data.open("w") as fh:
        for row in sampled_ids(model, 200, 48, seed=2):
            text = " ".join(f"t{i}" for i in row[1:].tolist())
            assert tokenizer(text, add_special_tokens=False)["input_ids"] == row[1:].tolist()
            fh.write(json.dumps({"text": text}) + "\n")
    return path, data


def _analysed(path, data, out) -> tuple:
    """``run_analysis`` of a planted-style model on its sampled text (one thread, no probes): the result and
    its analysis.json."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run_analysis(str(path), out=out, data=str(data), tokens=512, seq_len=32, device="cpu",
                              probes=False)
    finally:
        torch.set_num_threads(before)
    return result, json.loads(result.json_path.read_text())


def test_the_recommendation_finds_the_planted_block(planted_dir, tmp_path, figures_not_drawn):
    path, data = planted_dir
    result, analysis = _analysed(path, data, tmp_path / "report")
    assert result.split == analysis["split"] == "3:7"
    assert analysis["decision"]["best_within_interval"]
    recommended = analysis["decision"]["recommended"]["repeat"]["delta_nll"]
    assert abs(recommended["value"]) < 1e-2 and recommended["high"] < 0.05
    same = {r["split"]: r for r in analysis["decision"]["same_length"]}
    assert all(r["difference"]["low"] > 0 for s, r in same.items() if s != "3:7")
    assert result.confidence == "high"
    # found by the race with fewer predictions than the uniform map of every candidate at the same budget
    race = analysis["repeat_map"]["race"]
    spent = sum(race["tokens_per_split"].values())
    assert spent < race["candidates"] * race["contenders"]["3:7"]
    assert race["work"] < race["uniform_work"]
    assert analysis["repeat_map"]["window"] == 48 and analysis["provenance"]["map_warmup"] == 16


def test_a_budget_that_leaves_no_valid_split_is_a_one_line_error(planted_dir, cli, tmp_path):
    path, data = planted_dir
    out = tmp_path / "out"
    code, stdout, stderr = cli("analyze", path, "--data", data, "--out", out, "--tokens", "248", "--seq-len",
                               "32", "--map-tokens", "222", "--no-probes", "--device", "cpu",
                               "--loop-layers", "5-8", "--repeat-budget", "0.1")
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and stderr.strip().endswith(errors[0]), stderr  # after the logs
    assert errors[0].startswith("error: no loop block of 5-8 layers repeats within 0.1 nats")
    assert "raise --repeat-budget" in errors[0] and "Traceback" not in stdout + stderr
    assert not out.exists()


def test_no_useful_block_within_the_budget_gives_a_quarter_length_block_and_says_so(
    tmp_path, figures_not_drawn
):
    """Issue 26 item 4: a model whose every repeated block costs more than the default budget (no plant)."""
    from loopus_analyze.rule import DEFAULT_REPEAT_BUDGET, useful_length

    model = planted_model(range(0))
    path = tmp_path / "unplanted"
    model.save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    data = tmp_path / "sampled.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(f"t{i}" for i in row[1:].tolist())}) + "\n"
                            for row in sampled_ids(model, 120, 48, seed=2)))
    result, analysis = _analysed(path, data, tmp_path / "report")
    start, end = (int(x) for x in analysis["split"].split(":"))
    length = useful_length(LAYERS)
    assert end - start == length == 3  # a quarter of 10 layers, rounded up: not the shortest valid block
    cheapest = min(r["selection_delta_nll"] for r in analysis["decision"]["per_length"]
                   if r["length"] == length)
    row = next(r for r in analysis["decision"]["per_length"] if r["length"] == length)
    assert row["split"] == analysis["split"]
    assert row["selection_delta_nll"] == cheapest > DEFAULT_REPEAT_BUDGET
    assert f"{cheapest - DEFAULT_REPEAT_BUDGET:+.3f} nats above the budget" in analysis["reason"]
    assert analysis["rule"]["fallback"] and result.confidence == "low"
    assert "the rule fell back" in result.reason

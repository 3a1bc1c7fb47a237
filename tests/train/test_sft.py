"""Instruction and task data (issue 14): labels through the shards, --loss-on, supervised-only losses, the
confidence target and the evaluation on supervised positions, pre-tokenised records, bad input."""

from __future__ import annotations

import copy
import json
import logging
import re

import numpy as np
import pytest
import torch

from loopus_convert.measure import IGNORE_INDEX, Supervision, loss_per_loops, next_token_ce
from loopus_train import rds as rds_module
from loopus_train.data import SequenceBlocks, load_blocks
from loopus_train.rds import batch_counts, rds_micro_batch
from tests.train.conftest import read_metrics, tiny_args
from tests.train.test_errors import _one_line_error

CHAT = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome is the capital of Italy."},
]


def _jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def chatml(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture(scope="module")
def tiny_tok(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


# ------------------------------------------------------------------------------------- chat (acceptance 1)


def test_chat_labels_are_exactly_the_assistant_turns_of_the_chatml_template(chatml, tmp_path):
    """Through the shards: each token is labelled iff it lies in an assistant turn's content or its
    <|im_end|>, found here independently by searching the rendered text."""
    data = _jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}, {"messages": CHAT[:3]}] * 2)
    split = load_blocks(chatml, str(data), block_size=256, held_out=0.25, seed=0)
    assert isinstance(split.train, SequenceBlocks)
    rendered = chatml.apply_chat_template(CHAT, tokenize=False)
    spans = []
    for turn in (m for m in CHAT if m["role"] == "assistant"):
        head = rendered.index("<|im_start|>assistant\n" + turn["content"]) + len("<|im_start|>assistant\n")
        spans.append((head, head + len(turn["content"]) + len("<|im_end|>")))
    encoded = chatml(rendered, add_special_tokens=False, return_offsets_mapping=True)
    full = max(range(len(split.train)), key=lambda i: _length(split.train, i))  # a whole CHAT record
    ids, labels = split.train[full], split.train.labels(full)
    n = len(encoded["input_ids"])
    assert _length(split.train, full) == n
    assert ids[:n].tolist() == encoded["input_ids"]  # the template's rendering, whole
    assert (labels[n:] == IGNORE_INDEX).all() and (ids[n:] == chatml.eos_token_id).all()  # padding
    print("\nsupervised text (| between tokens; [.] = not supervised):")
    pieces = []
    for token, label, (start, _) in zip(
        ids[:n].tolist(), labels[:n].tolist(), encoded["offset_mapping"], strict=True
    ):
        text = chatml.decode([token])
        inside = any(a <= start < b for a, b in spans)
        assert (label == token) == inside and (label == IGNORE_INDEX) == (not inside), (text, start)
        pieces.append(text if inside else "[.]")
    print("|".join(pieces))
    supervised = chatml.decode(
        [t for t, lab in zip(ids[:n].tolist(), labels[:n].tolist(), strict=True) if lab >= 0]
    )
    assert supervised == "The capital of France is Paris.<|im_end|>Rome is the capital of Italy.<|im_end|>"


def _length(blocks: SequenceBlocks, i: int) -> int:
    return int(blocks._stop[i] - blocks._start[i])


# --------------------------------------------------------------------- the loss terms (acceptance 2 and 3)


def test_masked_ce_and_confidence_target_count_only_supervised_positions():
    """Predictions right everywhere except at the supervised positions: the masked target is 0 and the CE
    is the CE of the supervised positions alone."""
    torch.manual_seed(0)
    ids = torch.randint(0, 10, (2, 6))
    logits = torch.full((2, 6, 10), -5.0)
    logits[:, :-1].scatter_(2, ids[:, 1:, None], 5.0)  # every next token predicted
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, 3:] = (ids[:, 3:] + 1) % 10  # supervised: 3 positions, never the input's next token
    ce, correct = next_token_ce(logits, ids, labels=labels)
    plain_ce, plain_correct = next_token_ce(logits, ids)
    assert correct.tolist() == [0.0, 0.0] and plain_correct.tolist() == [1.0, 1.0]
    by_hand = torch.nn.functional.cross_entropy(logits[:, 2:5].reshape(-1, 10), labels[:, 3:].reshape(-1))
    assert torch.allclose(ce, by_hand) and ce > 5 > plain_ce


def test_under_data_parallelism_the_ranks_average_is_the_batch_mean():
    """Each rank divides its CE sum by the ranks' mean count (:func:`batch_counts`, what RDS uses): the
    average over the ranks is the whole batch's mean CE, although the ranks' counts differ."""
    torch.manual_seed(1)
    ids = torch.randint(0, 10, (4, 8))
    logits = torch.randn(4, 8, 10)
    labels = ids.clone()
    labels[2:, :6] = IGNORE_INDEX  # rank 0 holds 14 supervised predictions, rank 1 only 4
    whole, _ = next_token_ce(logits, ids, labels=labels)
    per_rank = [Supervision.of(ids[rows], labels[rows]) for rows in ([0, 1], [2, 3])]
    assert [int(s.counts.sum()) for s in per_rank] == [14, 4]
    mean = torch.tensor([(14 + 4) / 2, 2.0], dtype=torch.float64)  # scored predictions, records with one
    ranks = []
    for rows, sup in zip(([0, 1], [2, 3]), per_rank, strict=True):
        norm, _ = batch_counts(sup, lambda t: mean.to(t.dtype))
        ce_sum = torch.nn.functional.cross_entropy(
            logits[rows][sup.rows, sup.cols], sup.targets, reduction="sum"
        )
        ranks.append(ce_sum / norm)
    assert torch.allclose((ranks[0] + ranks[1]) / 2, whole)
    assert not torch.allclose(next_token_ce(logits[:2], ids[:2], labels=labels[:2])[0], ranks[0])


def test_rds_leaves_prompt_positions_out_of_every_term(looped_tiny, monkeypatch):
    """The gradient reaches the decoder's output at supervised positions only (CE and the monotonicity
    term), and the confidence head's target is the fraction of correct supervised predictions."""
    from loopus_convert import load_looped

    model = load_looped(looped_tiny)
    torch.manual_seed(0)
    ids = torch.randint(3, 300, (2, 12))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, 9:] = ids[:, 9:]  # a long prompt, a 3-token completion
    grads, states_seen, targets = [], [], []
    decoder_states = model.decoder_states

    def watched(h, ctx):
        out = decoder_states(h, ctx)
        if out.requires_grad:
            out.register_hook(grads.append)
            states_seen.append(out.detach())
        return out

    real_bce = rds_module.confidence_bce

    def watched_bce(q, correct, rows, *rest):
        targets.append(correct)
        return real_bce(q, correct, rows, *rest)

    monkeypatch.setattr(model, "decoder_states", watched)
    monkeypatch.setattr(rds_module, "confidence_bce", watched_bce)
    stats = rds_micro_batch(model, ids, [1, 3], labels=labels)
    assert len(grads) == 2 and stats.count == 2
    logits_seen = []
    with torch.no_grad():
        for grad, states, target in zip(grads, states_seen, targets, strict=True):
            assert (grad[:, :8] == 0).all()  # position t predicts labels[t + 1]: 0..7 are the prompt's
            assert (grad[:, 8:11].abs().sum(-1) > 0).all() and (grad[:, 11] == 0).all()
            logits = model.head(states)
            logits_seen.append(logits)
            expected = (logits[:, 8:11].argmax(-1) == ids[:, 9:]).float().mean(1)
            assert torch.allclose(target, expected)
    masked = sum(float(next_token_ce(x, ids, labels=labels)[0]) for x in logits_seen)
    every = sum(float(next_token_ce(x, ids)[0]) for x in logits_seen)
    assert stats.ce == pytest.approx(masked, rel=1e-5) and stats.ce != pytest.approx(every, rel=1e-3)


def test_evaluation_reads_only_supervised_positions(looped_tiny):
    from loopus_convert import load_looped

    model = load_looped(looped_tiny).eval()
    torch.manual_seed(2)
    ids = torch.randint(3, 300, (3, 10))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, 6:] = ids[:, 6:]
    result = loss_per_loops(model, ids, [2], batch_size=2, labels=labels)
    with torch.no_grad():
        out = model(ids, num_loops=2)
        ce, correct = next_token_ce(out.logits, ids, labels=labels)
    assert result["tokens"] == 3 * 4
    assert result["loops"]["2"]["loss"] == pytest.approx(float(ce), rel=1e-5)
    assert result["loops"]["2"]["accuracy"] == pytest.approx(float(correct.mean()), rel=1e-6)
    assert result["calibration"]["mean_correct"] == pytest.approx(float(correct.mean()), rel=1e-6)
    plain = loss_per_loops(model, ids, [2], batch_size=2)
    assert plain["tokens"] == 27 and plain["loops"]["2"]["loss"] != pytest.approx(float(ce), rel=1e-3)


def test_early_exit_reads_each_padded_records_confidence_at_its_own_last_token(looped_tiny):
    """Records of 5, 9 and 12 tokens, one per right-padded block of 12 with their position ids (a held-out
    record's layout): early exit gives the loss and the loops of each record run alone, unpadded."""
    from loopus_convert import load_looped
    from loopus_convert.measure import early_exit_stats, record_mask

    model = load_looped(looped_tiny).eval()
    torch.manual_seed(3)
    torch.nn.init.normal_(model.confidence_head.proj.weight, std=2.0)  # confidences that differ by token
    lengths = [5, 9, 12]
    ids = torch.randint(3, 300, (3, 12))
    labels = ids.clone()
    positions = torch.arange(12).repeat(3, 1)
    for row, n in enumerate(lengths):
        ids[row, n:], labels[row, n:] = 0, IGNORE_INDEX
        positions[row, n:] = torch.arange(12 - n)
    settings = dict(max_loops=4, batch_size=3)
    padded = early_exit_stats(model, ids, [0.5], labels=labels, position_ids=positions, **settings)
    alone = [early_exit_stats(model, ids[r : r + 1, :n], [0.5], **settings) for r, n in enumerate(lengths)]
    tokens = [n - 1 for n in lengths]
    for key in ("full", "0.5"):
        loss = sum(a["thresholds"][key]["loss"] * t for a, t in zip(alone, tokens, strict=True)) / sum(tokens)
        loops = sum(a["thresholds"][key]["mean_loops"] for a in alone) / 3
        assert padded["thresholds"][key]["loss"] == pytest.approx(loss, rel=1e-5)
        assert padded["thresholds"][key]["mean_loops"] == pytest.approx(loops)
    # the confidence it exits on is the record's; read at the block's last position it is not
    with torch.no_grad():
        masked = model(ids, attention_mask=record_mask(ids, labels, positions), num_loops=2).confidence
        unmasked = model(ids, num_loops=2).confidence
        first = model(ids[:1, :5], num_loops=2).confidence
    torch.testing.assert_close(masked[:1], first, rtol=1e-5, atol=1e-5)
    assert (unmasked[0] - first[0]).abs().max() > 1e-3


# ---------------------------------------------------------------------- prompt/completion (acceptance 2)


def _completion_records(n: int, seed: int = 0) -> list[dict]:
    """A long, varied prompt (tokens that would dominate an every-token loss) and a short answer that a
    keyword near its end decides."""
    rng = np.random.default_rng(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron".split()
    answers = {"red": " apple", "blue": " sky", "green": " grass"}
    out = []
    for _ in range(n):
        key = str(rng.choice(list(answers)))
        filler = " ".join(rng.choice(words, size=int(rng.integers(4, 9))))
        out.append({"prompt": f"{filler}. The colour is {key}. It is the", "completion": answers[key]})
    return out


def test_loss_on_completion_lowers_the_held_out_completion_loss(looped_tiny, tiny_tok, tmp_path, cli, caplog):
    from loopus_convert import load_looped

    data = _jsonl(tmp_path / "pairs.jsonl", _completion_records(120))
    split = load_blocks(tiny_tok, str(data), block_size=64, held_out=0.1, seed=0)
    held, held_labels = split.held_out[:8], split.held_out.labels(slice(0, 8))
    supervised = int((held_labels[:, 1:] != IGNORE_INDEX).sum())
    real = int(sum(_length(split.held_out, i) - 1 for i in range(8)))
    assert supervised * 5 < real  # the prompt's tokens would dominate an every-token loss
    model = load_looped(looped_tiny)
    before = loss_per_loops(model, held, [4], labels=held_labels)["loops"]["4"]["loss"]
    out = tmp_path / "run"
    args = tiny_args(looped_tiny, data, out, steps=25, save_every=25, eval_every=25, eval_blocks=8)
    code, stdout, stderr = cli(*args, "--block-size", "64", "--held-out", "0.1", "--loss-on", "completion")
    assert code == 0, stderr
    last = read_metrics(out, "eval")[-1]
    after = last["loops"]["4"]["loss"]
    assert last["tokens"] == supervised  # the run's evaluation counts the completion's tokens only
    print(f"\nheld-out completion loss at K=4: {before:.3f} before, {after:.3f} after 25 updates")
    assert after < before - 1.0, (before, after)
    # `loopus eval` on the run reads the same supervised positions of the run's held-out records
    code, stdout, stderr = cli(
        "eval", out, "--loops", "1,4", "--max-blocks", "8", "--json", tmp_path / "e.json"
    )
    assert code == 0, stderr
    again = json.loads((tmp_path / "e.json").read_text())
    assert again["tokens"] == supervised and again["loops"]["4"]["loss"] == pytest.approx(after, rel=1e-4)
    # and reads the confidence head where the run's evaluation does, at each record's last token (at the
    # block's last position, the padding, the calibration differed by 8e-4 relative)
    assert again["calibration"] == pytest.approx(last["calibration"], rel=1e-6)


def test_long_records_are_truncated_with_a_count_and_never_share_a_block(tiny_tok, tmp_path, caplog):
    records = _completion_records(30)
    records[3]["prompt"] = "word " * 200  # its completion is cut away: dropped
    data = _jsonl(tmp_path / "pairs.jsonl", records)
    with caplog.at_level(logging.WARNING, logger="loopus_train.data"):
        split = load_blocks(tiny_tok, str(data), block_size=64, held_out=0.1, seed=0)
    assert len(split.train) + len(split.held_out) == 29
    message = next(r.getMessage() for r in caplog.records if "truncated" in r.getMessage())
    cut = sum(
        len(tiny_tok(r["prompt"])["input_ids"] + tiny_tok(r["completion"])["input_ids"]) + 1 > 64
        for r in records
    )
    assert cut > 1 and f"{cut} of 30 records are longer than --block-size 64" in message
    assert "1 dropped" in message
    for blocks in (split.train, split.held_out):
        for i in range(len(blocks)):
            assert len(blocks.documents(i)) == 1  # one record per block: nothing attends across records


# ------------------------------------------------------------------ pre-tokenised input_ids / labels


def test_pre_tokenised_labels_go_through_the_shards_and_train_towards_them(looped_tiny, tmp_path, cli):
    """Labels that are not the next input token (a constant answer token at the supervised positions):
    the shards keep them, and training moves the predictions there."""
    from loopus_convert import load_looped

    rng = np.random.default_rng(0)
    answer = 7
    records = []
    for _ in range(60):
        ids = rng.integers(10, 300, size=int(rng.integers(14, 20))).tolist()
        labels = [IGNORE_INDEX] * 6 + [answer] * (len(ids) - 6)
        records.append({"input_ids": ids, "labels": labels})
    data = _jsonl(tmp_path / "tokens.jsonl", records)
    from transformers import AutoTokenizer

    split = load_blocks(
        AutoTokenizer.from_pretrained(looped_tiny), str(data), block_size=24, held_out=0.1, seed=0
    )
    first = int(split.train.doc_ids[0])
    assert split.train[0][: len(records[first]["input_ids"])].tolist() == records[first]["input_ids"]
    n = len(records[first]["labels"])
    assert split.train.labels(0)[:n].tolist() == records[first]["labels"]
    assert (split.train.labels(0)[n:] == IGNORE_INDEX).all()
    held, held_labels = split.held_out[:6], split.held_out.labels(slice(0, 6))
    before = loss_per_loops(load_looped(looped_tiny), held, [4], labels=held_labels)["loops"]["4"]
    out = tmp_path / "run"
    code, _, stderr = cli(
        *tiny_args(looped_tiny, data, out, steps=20, save_every=20, eval_every=20, eval_blocks=6),
        "--block-size",
        "24",
    )
    assert code == 0, stderr
    after = read_metrics(out, "eval")[-1]["loops"]["4"]
    assert before["accuracy"] < 0.1 and after["accuracy"] > 0.9, (before, after)
    assert after["loss"] < before["loss"]  # measured: 6.04 -> 4.39 (20 updates)


# -------------------------------------------------------------------------------- bad input (acceptance 4)


def test_bad_instruction_data_is_one_line_errors(looped_tiny, tmp_path, cli, train_text):
    def run(data, *extra):
        return cli(*tiny_args(looped_tiny, data, tmp_path / "out"), *extra)

    chat = _jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}] * 4)
    _one_line_error(run(chat), "chat records", "no chat template")
    broken = [{"messages": CHAT}, {"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}]
    _one_line_error(run(_jsonl(tmp_path / "b.jsonl", broken)), "record 2", "entry 1", "'content'")
    no_role = [{"messages": [{"content": "hi"}]}]
    _one_line_error(run(_jsonl(tmp_path / "r.jsonl", no_role)), "record 1", "'role'")
    _one_line_error(run(train_text, "--loss-on", "completion"), "--loss-on completion", "plain text")
    long = [{"prompt": "word " * 100, "completion": " end"}] * 5
    _one_line_error(run(_jsonl(tmp_path / "l.jsonl", long)), "every one of its 5 records", "--block-size 32")
    bad_ids = [{"input_ids": [1, 2, 99999], "labels": [-100, 2, 3]}] * 3
    _one_line_error(run(_jsonl(tmp_path / "t.jsonl", bad_ids)), "record 1", "99999", "vocabulary 0..383")
    short = [{"input_ids": [1, 2, 3], "labels": [-100, 2]}] * 3
    _one_line_error(run(_jsonl(tmp_path / "s.jsonl", short)), "record 1", "labels 2")
    pairs = _jsonl(tmp_path / "p.jsonl", _completion_records(6))
    _one_line_error(run(pairs, "--loss-on", "assistant"), "--loss-on assistant", "prompt/completion pairs")
    _one_line_error(run(pairs, "--loss-on", "prompt"), "--loss-on 'prompt'", "all, completion, assistant")
    assert not (tmp_path / "out").exists()


def test_the_built_in_chat_set_is_supervised_on_its_assistant_turns(chatml):
    """``--data builtin:chat`` with the embedded model's tokenizer: every conversation fits 256 tokens, and
    the supervised tokens are exactly those of the assistant turns (each turn's content and <|im_end|>)."""
    from loopus_train.records import encode_chat
    from loopus_train.sources import BUILTIN_CHAT

    split = load_blocks(chatml, "builtin:chat", block_size=256, held_out=0.05, seed=0)
    records = [json.loads(line)["messages"] for line in BUILTIN_CHAT.read_text().splitlines()]
    assert len(split.train) + len(split.held_out) == len(records) >= 250
    assert sum(len(r) for r in records) >= 600  # a few hundred turns
    expected = sum(
        len(chatml(m["content"] + "<|im_end|>", add_special_tokens=False)["input_ids"])
        for r in records
        for m in r
        if m["role"] == "assistant"
    )
    labels = torch.cat(
        [split.train.labels(slice(0, len(split.train))), split.held_out.labels(slice(0, None))]
    )
    assert int((labels != IGNORE_INDEX).sum()) == expected
    ids, lab = encode_chat(chatml, records[0])
    assert split.shards.kind == "chat" and len(ids) == len(lab)


def test_prepared_conversations_name_their_labels_and_keep_their_template(cli, default_model_dir, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    from loopus_core.errors import LoopusError
    from loopus_train.shards import open_data

    out = tmp_path / "shards"
    code, stdout, stderr = cli("prepare-data", "builtin:chat", "--tokenizer", default_model_dir, "--out", out)
    assert code == 0, stderr
    assert "chat records with labels:" in stdout and "supervised tokens" in stdout
    other = tmp_path / "other-template"
    shutil.copytree(default_model_dir, other)
    template = other / "chat_template.jinja"
    template.write_text(template.read_text().replace("<|im_start|>", "<|im_start|> "))
    with pytest.raises(LoopusError, match="another chat template"):
        open_data(AutoTokenizer.from_pretrained(other), str(out))
    assert open_data(AutoTokenizer.from_pretrained(default_model_dir), str(out)).kind == "chat"


def test_loss_on_all_supervises_every_real_token_of_labelled_records(tiny_tok, tmp_path):
    data = _jsonl(tmp_path / "pairs.jsonl", _completion_records(20))
    given = load_blocks(tiny_tok, str(data), block_size=64, held_out=0.1, seed=0)
    every = load_blocks(tiny_tok, str(data), block_size=64, held_out=0.1, seed=0, loss_on="all")
    assert given.fingerprint != every.fingerprint  # a resume must not mix them
    for i in range(len(every.train)):
        n = _length(every.train, i)
        ids, labels = every.train[i], every.train.labels(i)
        assert labels[:n].tolist() == ids[:n].tolist() and (labels[n:] == IGNORE_INDEX).all()
        assert (given.train.labels(i) != IGNORE_INDEX).sum() < n // 3  # the completion only


GENERATION_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}{% generation %}"
    "{{ m['content'] }}<|im_end|>{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_template_with_generation_markers_masks_like_the_turn_by_turn_rendering(chatml, monkeypatch):
    """transformers' own assistant mask (``{% generation %}``) and ours from rendering turn by turn give
    the same labels on the same template."""
    from loopus_train import records

    tok = copy.deepcopy(chatml)
    tok.chat_template = GENERATION_TEMPLATE
    marked = records.encode_chat(tok, CHAT)
    monkeypatch.setattr(records, "_GENERATION", re.compile("(?!x)x"))  # never matches: turn by turn
    rendered = records.encode_chat(tok, CHAT)
    assert marked == rendered
    assert sum(label != IGNORE_INDEX for label in marked[1]) == sum(
        len(chatml(m["content"] + "<|im_end|>", add_special_tokens=False)["input_ids"])
        for m in CHAT
        if m["role"] == "assistant"
    )

"""Issue 24 (3): records packed several to a block compute exactly what they compute alone, in every
attention layer of the encoder, of every loop pass and of the decoder, and train exactly as one per block."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from loopus_convert.measure import IGNORE_INDEX, Supervision
from loopus_core.errors import LoopusError
from loopus_train.data import load_blocks
from loopus_train.optim import select_trainable
from loopus_train.packing import (
    DocumentMasked,
    PackedRecords,
    fewest_blocks_bound,
    least_slack_bins,
    training_view,
)
from loopus_train.rds import rds_micro_batch

FAMILIES = ("llama", "gemma3_text", "qwen3")  # gemma3_text: sliding-window layers (16) beside full ones


@pytest.fixture(scope="module")
def looped_families(tiny_model_dirs, tmp_path_factory) -> dict:
    """Each family's tiny model converted at 2:6, in fp32 with SDPA attention."""
    from loopus_convert import convert_model, load_looped

    root = tmp_path_factory.mktemp("packing")
    out = {}
    for family in FAMILIES:
        path = convert_model(str(tiny_model_dirs[family]), root / family, split="2:6").out
        out[family] = path
    return {family: load_looped(path).float() for family, path in out.items()}


def _records(lengths, seed=0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (n,), generator=generator) for n in lengths]


def _pack(records, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One block: the records side by side, positions restarting at each, then padding (its own record)."""
    ids = torch.cat(records)
    pad = block - len(ids)
    ids = torch.cat([ids, torch.zeros(pad, dtype=torch.long)])
    positions = torch.cat([torch.arange(len(r)) for r in records] + [torch.arange(pad)])
    return ids[None], positions[None]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("loops", [1, 2, 3])
def test_a_packed_record_has_the_logits_it_has_alone(looped_families, family, loops):
    """Records of 7, 30 (longer than the sliding window) and 5 tokens packed into 48 positions: each
    record's logits equal its run alone, and the padding changes nothing."""
    model = looped_families[family].eval()
    records = _records([7, 30, 5], seed=loops)
    ids, positions = _pack(records, 48)
    with torch.no_grad():
        packed = model(ids, position_ids=positions, num_loops=loops).logits  # (1, 48, V)
        start = 0
        for record in records:
            alone = model(record[None], num_loops=loops).logits
            torch.testing.assert_close(packed[:, start : start + len(record)], alone, rtol=1e-5, atol=1e-5)
            start += len(record)
        # and without the position ids the records would attend to each other: the test can fail
        unmasked = model(ids, num_loops=loops).logits
        assert (unmasked[:, 7:37] - packed[:, 7:37]).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kv_strategy", ["full", "last", "first"])
def test_a_packed_block_through_the_cache_has_each_records_logits_alone(looped_families, family, kv_strategy):
    """The prefill that fills the cache (use_cache=True) over a packed block: each record's logits equal its
    run alone at K = 1, 2, 3, under every KV strategy; a later call on that cache is refused (its tokens
    would attend to every record)."""
    model = looped_families[family].eval()
    records = _records([7, 30, 5], seed=11)
    ids, positions = _pack(records, 48)
    for loops in (1, 2, 3):
        settings = dict(num_loops=loops, kv_strategy=kv_strategy)
        with torch.no_grad():
            out = model(ids, position_ids=positions, use_cache=True, **settings)
            start = 0
            for record in records:
                alone = model(record[None], **settings).logits
                got = out.logits[:, start : start + len(record)]
                torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)
                start += len(record)
            with pytest.raises(ValueError, match="packed"):
                model(ids[:, :1], position_ids=positions[:, :1], cache=out.cache, use_cache=True, **settings)


def _pairs_file(path, count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    with path.open("w") as fh:
        for _ in range(count):
            prompt = " ".join(rng.choice(words, size=int(rng.integers(1, 6))))
            answer = " ".join(rng.choice(words, size=int(rng.integers(1, 4))))
            fh.write(json.dumps({"prompt": prompt + " :", "completion": " " + answer}) + "\n")
    return path


@pytest.fixture(scope="module")
def pair_blocks(tiny_llama_dir, tmp_path_factory):
    """Prompt/completion records of 5-20 tokens, cut into blocks of 48."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    path = _pairs_file(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", 40)
    return load_blocks(tok, str(path), block_size=48, held_out=0.1, seed=0)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
def test_rds_on_packed_records_equals_rds_one_record_per_block(looped_families, pair_blocks, family):
    """Loss, its terms and every gradient of a packed batch equal those of the same records padded one per
    block (beta = 1, the confidence term on: its target and feature per record)."""
    model = looped_families[family].train()
    select_trainable(model, ("loop", "gate", "decoder", "head"))
    packed = PackedRecords(pair_blocks.train)
    padded = PackedRecords(pair_blocks.train, pack=False)
    chosen = [i for i in range(len(packed)) if len(packed.documents(i)) > 1][:3]  # several records a block
    records = np.concatenate([packed.members(i) for i in chosen]).tolist()
    assert len(chosen) == 3 and len(records) >= 6
    results = []
    for blocks, keys in ((packed, chosen), (padded, records)):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        stats = rds_micro_batch(
            model,
            blocks[keys],
            [1, 3],
            beta=1.0,
            conf_weight=1.0,
            labels=blocks.labels(keys),
            position_ids=blocks.position_ids(keys),
        )
        results.append((stats, _grads(model)))
    (a, grads_a), (b, grads_b) = results
    for term in ("loss", "ce", "mono", "bce"):
        assert getattr(a, term) == pytest.approx(getattr(b, term), rel=1e-5, abs=1e-7), term
    assert set(grads_a) == set(grads_b) and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-7)


def test_the_confidence_head_reads_each_record_at_its_own_last_token():
    ids = torch.arange(12).reshape(1, 12)
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0, 1, 0, 1, 2]])  # records of 3, 4, 2 tokens, 3 pads
    labels = ids.clone()
    labels[0, 9:] = IGNORE_INDEX
    sup = Supervision.of(ids, labels, positions)
    assert sup.record_last.tolist() == [2, 6, 8, 11] and sup.counts.tolist() == [2, 3, 1, 0]
    assert (sup.cols + 1).tolist() == [1, 2, 4, 5, 6, 8]  # no prediction of a record's first token


def test_least_slack_bins_places_every_record_once_within_the_block():
    lengths = np.random.default_rng(0).integers(1, 129, 500)
    bins = least_slack_bins(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(lengths[b].sum() <= 128 for b in bins)
    assert len(bins) == fewest_blocks_bound(lengths, 128) == 278  # as few blocks as any packing can have
    assert bins == least_slack_bins(lengths, 128)  # a pure function of the lengths: resumable
    tiny = np.full(3000, 2)  # more items a block than the search's budget: topped up, still full
    assert [len(b) for b in least_slack_bins(tiny, 2048)] == [1024, 1024, 952]


def test_packed_blocks_pad_only_at_the_end_and_label_no_record_start(pair_blocks):
    records = pair_blocks.train
    packed = PackedRecords(records)
    assert len(packed) < len(records) and packed.real_fraction() > 0.8
    for index in range(len(packed)):
        ids, labels, positions = packed[index], packed.labels(index), packed.position_ids(index)
        members = packed.members(index)
        lengths = packed.lengths[members]
        starts = np.r_[0, np.cumsum(lengths)]
        for m, a, b in zip(members, starts[:-1], starts[1:], strict=True):
            n = b - a
            assert ids[a:b].tolist() == records[int(m)][:n].tolist()
            assert labels[a].item() == IGNORE_INDEX
            assert labels[a + 1 : b].tolist() == records.labels(int(m))[1:n].tolist()
            assert positions[a:b].tolist() == list(range(n))
        assert (labels[starts[-1] :] == IGNORE_INDEX).all()
    assert sorted(np.concatenate([packed.documents(i) for i in range(len(packed))]).tolist()) == sorted(
        records.doc_ids.tolist()
    )


def test_split_records_fill_every_block_and_cut_records_go_on_as_records_of_their_own(pair_blocks):
    """--split-records: every block but the last is full; the records in order, one cut at a block's end
    continues at the next block's start with positions from 0; no prediction crosses a piece."""
    records = pair_blocks.train
    split = PackedRecords(records, split=True)
    size = records.block_size
    assert len(split) == -(-records.num_tokens // size) and split.cuts() > 0
    assert all(split.real_tokens(i) == size for i in range(len(split) - 1))
    ids, labels, positions = split[:], split.labels(slice(None)), split.position_ids(slice(None))
    real = positions.new_zeros(positions.shape, dtype=torch.bool).flatten()
    real[: records.num_tokens] = True
    stream = torch.cat([records[i][: int(n)] for i, n in enumerate(split.lengths)])
    assert ids.flatten()[real].tolist() == stream.tolist()  # the records' tokens, in order, none lost
    targets = torch.cat([records.labels(i)[: int(n)] for i, n in enumerate(split.lengths)])
    starts = (positions.flatten() == 0)[real]
    kept = labels.flatten()[real]
    assert (kept[starts] == IGNORE_INDEX).all()  # a piece's first token is not predicted
    assert kept[~starts].tolist() == targets[~starts].tolist()  # every other label as it was
    for index in range(1, len(split)):
        member, first, _ = split._pieces[index][0].tolist()
        if first:  # a continuation: the cut record's rest, from position 0
            assert split._pieces[index - 1][-1].tolist()[::2] == [member, first]


def test_training_view_packs_records_and_masks_documents_only_when_asked(
    pair_blocks, tiny_llama_dir, train_text
):
    from transformers import AutoTokenizer

    view = training_view(pair_blocks)
    assert isinstance(view.train, PackedRecords) and view.fingerprint.endswith("/packed-whole")
    assert len(view.held_out) == len(pair_blocks.held_out)  # held-out records stay one per block
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    text = load_blocks(tok, str(train_text), block_size=32, held_out=0.1, seed=0)
    assert training_view(text).train is text.train
    assert training_view(pair_blocks, split_records=True).fingerprint.endswith("/packed-split")
    with pytest.raises(LoopusError, match="--split-records packs labelled records"):
        training_view(text, split_records=True)
    masked = training_view(text, doc_mask=True)
    assert isinstance(masked.train, DocumentMasked) and masked.fingerprint.endswith("/doc-mask")
    eos = tok.eos_token_id
    for index in range(len(masked.train)):
        ids, positions = masked.train[index], masked.train.position_ids(index)
        after_eos = torch.cat([torch.tensor([True]), ids[:-1] == eos])
        assert ((positions == 0) == after_eos).all()
        assert (masked.train.labels(index)[after_eos] == IGNORE_INDEX).all()


@pytest.mark.parametrize("kind", ["records", "doc-mask"])
def test_sigkill_then_resume_with_packing_matches_an_uninterrupted_run(
    looped_tiny, train_text, tmp_path, kind
):
    """Packed prompt/completion records, and text under --doc-mask: a run killed after its checkpoint 4 and
    resumed gives the losses and weights of the run never interrupted."""
    from loopus_train.state import list_checkpoints
    from tests.train.conftest import read_metrics, run_subprocess, tiny_args
    from tests.train.test_resume import _assert_same_run

    if kind == "records":
        data, extra = _pairs_file(tmp_path / "pairs.jsonl", 60), dict(block_size=48, held_out=0.1)
    else:
        data, extra = train_text, {"doc-mask": True}
    reference = run_subprocess(tiny_args(looped_tiny, data, tmp_path / "reference", **extra))
    assert reference.returncode == 0, reference.stderr[-3000:]
    out = tmp_path / "run"
    killed = run_subprocess(tiny_args(looped_tiny, data, out, **extra), {"LOOPUS_TEST_KILL": "after-save:4"})
    assert killed.returncode == -9
    assert [step for step, _ in list_checkpoints(out)] == [2, 4]
    resumed = run_subprocess(tiny_args(looped_tiny, data, out, resume=True, **extra))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_run(out, tmp_path / "reference", from_step=5)
    assert all(r["loss"] > 0 for r in read_metrics(out))


def test_the_split_records_flag_reaches_the_run_and_is_refused_on_text(
    cli, looped_tiny, train_text, tmp_path
):
    """``loopus finetune --split-records``: labelled records fill every block (the log counts the cut
    records); on plain text, which fills every block already, the flag is one line, exit 2, no run left."""
    pairs = _pairs_file(tmp_path / "pairs.jsonl", 60)
    common = ("--steps", 1, "--block-size", 24, "--batch-size", 2, "--device", "cpu", "--eval-loops", "1",
              "--eval-blocks", 1, "--loop-steps", 2, "--supervised", 1)
    code, stdout, stderr = cli("finetune", looped_tiny, "--data", pairs, "--out", tmp_path / "run",
                               "--split-records", *common)
    assert code == 0, stderr
    assert "records cut at a block's end" in stderr
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["config"]["split_records"] is True
    code, stdout, stderr = cli("finetune", looped_tiny, "--data", train_text, "--out", tmp_path / "text",
                               "--split-records", *common)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "--split-records packs labelled records" in errors[0]
    assert "Traceback" not in stdout + stderr and not (tmp_path / "text").exists()

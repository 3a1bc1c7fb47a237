"""Issue 24: what scoring only the supervised positions, skipping zero-weighted passes and packing records
buy. Ratios measured side by side in one run (interleaved, medians), on the embedded default model
(SmolLM2-135M-Instruct) converted at 2:15, trainable parts as the default recipe, fp32 (CPU, or
``--device cuda``).

1. ``update``: time per optimizer update (one RDS micro-batch, its backward passes and AdamW) on
   answer-only records (``--batch-size`` blocks of ``--answer-block`` tokens, the last two labelled: one
   supervised token per 67 positions, like the variable-chain records of ``benchmarks/evidence``), at RDS
   (``--loop-steps 4 --supervised 2``, beta 1, the confidence term on) and plain (``--loop-steps 1
   --supervised 1 --beta 0``): ``before`` is the code before issue 24, kept here as the reference
   (:func:`before_rds`: decoder, final norm and lm_head at every position, the previous-CE pass and the
   confidence head whatever their weights), ``after`` is ``loopus_train.rds.rds_micro_batch``. Reports
   the medians and ``speedup = before / after``.
2. ``packing``: ``builtin:chat`` at ``--block-size`` 128 and 512: real tokens/s of one RDS micro-batch of
   ``--batch-size`` blocks, one record per padded block against records packed
   (``loopus_train.packing.PackedRecords``), same code, interleaved. ``real_positions`` (counts, no
   timing): the share of real positions one record per block, whole records packed, the most any packing
   of whole records can reach (``fewest_blocks_bound``), and records split at the blocks' ends
   (``split_records``), with the records cut and the predictions the cuts drop.
3. ``head_memory``: the bytes autograd keeps for the backward pass of one supervised step's loss on the
   answer-only batch (decoder, head, CE, confidence), before and after: the logits of every position
   against those of the supervised ones.

Writes ``benchmarks/results/bench_packing.json`` (and prints it): the parts run replace theirs, the parts
skipped keep what the file records; ``runs`` says which command measured each part, and when.

Usage: HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 python benchmarks/bench_packing.py [--repeats 5] [--device cpu]
       [--skip update packing memory]   (the real-position counts only: no model, seconds)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RESULTS = REPO / "benchmarks" / "results" / "bench_packing.json"
PARTS = ("loop", "gate", "decoder", "head")
SETTINGS = {
    "rds": dict(loop_steps=4, supervised=2, beta=1.0),
    "plain": dict(loop_steps=1, supervised=1, beta=0.0),
}


def before_rds(model, input_ids, steps, *, beta=1.0, conf_weight=1.0, scale=1.0, labels=None):
    """The RDS micro-batch before issue 24 (one process, no noise): every position through the head, the
    previous-CE pass and the confidence head whatever their weights."""
    from loopus_convert.measure import next_token_ce, supervised_targets
    from loopus_train.rds import monotonicity

    counts = supervised_targets(input_ids, labels)
    normaliser, rows = counts.sum().clamp(min=1).float(), counts > 0
    ctx = model.prepare(input_ids)
    with torch.no_grad():
        h = model.encode(ctx)
    prev_ce = None
    for step in range(1, max(steps) + 1):
        h_in = h.detach()
        if step not in steps:
            with torch.no_grad():
                h = model.loop_step(h_in, ctx)
            prev_ce = None
            continue
        if prev_ce is None:
            with torch.no_grad():
                prev_ce = next_token_ce(model.decode(h_in, ctx), input_ids, "sum", labels)[0] / normaliser
        h_out = model.loop_step(h_in, ctx)
        ce, correct = next_token_ce(model.decode(h_out, ctx), input_ids, "sum", labels)
        ce = ce / normaliser
        q = model.confidence_logit(h_out, ctx).float()
        per = F.binary_cross_entropy_with_logits(q, correct, reduction="none")
        bce = (per * rows).sum() / rows.sum().clamp(min=1)
        loss = ce + beta * monotonicity(ce, prev_ce, None) + conf_weight * bce
        (loss * scale).backward()
        h, prev_ce = h_out.detach(), ce.detach()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    began = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - began


def _answer_only(
    vocab: int, batch: int, block: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(10, vocab, (batch, block), generator=torch.Generator().manual_seed(0)).to(device)
    labels = torch.full_like(ids, -100)
    labels[:, -2:] = ids[:, -2:]  # 2 supervised tokens per block of 134: one per 67
    return ids, labels


def update_times(model, optimizer, args, device) -> dict:
    """Part 1: before / after, RDS and plain, interleaved; median seconds per update and the speedup."""
    from loopus_train.rds import draw_supervised_steps, rds_micro_batch

    ids, labels = _answer_only(model.config.vocab_size, args.batch_size, args.answer_block, device)
    out = {}
    for mode, s in SETTINGS.items():
        steps = draw_supervised_steps(0, 0, 0, s["loop_steps"], s["supervised"])
        common = dict(beta=s["beta"], scale=1.0 / len(steps), labels=labels)

        def run(which, steps=steps, common=common):
            optimizer.zero_grad(set_to_none=True)
            (before_rds if which == "before" else rds_micro_batch)(model, ids, steps, **common)
            optimizer.step()

        times = {"before": [], "after": []}
        for repeat in range(args.repeats + 1):
            for which in ("before", "after") if repeat % 2 else ("after", "before"):
                took = _timed(lambda which=which: run(which), device)
                if repeat:  # the first round warms up
                    times[which].append(took)
        med = {k: statistics.median(v) for k, v in times.items()}
        out[mode] = {
            **s,
            "steps": steps,
            "s_before": med["before"],
            "s_after": med["after"],
            "speedup": med["before"] / med["after"],
            "samples": times,
        }
    return out


def packing(model, tokenizer, args, device) -> dict:
    """Part 2: real positions per block and real tokens/s of one RDS micro-batch, padded vs packed."""
    from loopus_train.data import load_blocks
    from loopus_train.packing import PackedRecords
    from loopus_train.rds import rds_micro_batch

    out = {}
    for block in args.chat_blocks:
        records = load_blocks(tokenizer, "builtin:chat", block_size=block, held_out=0.05, seed=0).train
        views = {"padded": PackedRecords(records, pack=False), "packed": PackedRecords(records)}
        batch = max(1, args.batch_size * 128 // block)
        rows = list(range(batch))
        inputs = {
            name: (
                v[rows].to(device),
                v.labels(rows).to(device),
                v.position_ids(rows).to(device),
                sum(v.real_tokens(i) for i in rows),
            )
            for name, v in views.items()
        }
        times = {name: [] for name in views}
        for repeat in range(args.repeats + 1):
            for name in views if repeat % 2 else reversed(list(views)):
                ids, labels, positions, _ = inputs[name]

                def run(ids=ids, labels=labels, positions=positions):
                    model.zero_grad(set_to_none=True)
                    rds_micro_batch(model, ids, [2, 4], labels=labels, position_ids=positions, scale=0.5)

                took = _timed(run, device)
                if repeat:
                    times[name].append(took)
        entry = {"block_size": block, "records": records.num_documents, "batch_blocks": batch}
        for name, view in views.items():
            med = statistics.median(times[name])
            entry[name] = {
                "blocks": len(view),
                "real_positions": view.real_fraction(),
                "real_tokens_per_s": inputs[name][3] / med,
                "s_per_micro_batch": med,
            }
        entry["tokens_per_s_ratio"] = (
            entry["packed"]["real_tokens_per_s"] / entry["padded"]["real_tokens_per_s"]
        )
        out[str(block)] = entry
    return out


def _targets(view) -> int:
    """The supervised predictions every block of ``view`` holds."""
    return int((view.labels(slice(None))[:, 1:] != -100).sum())


def real_positions(tokenizer, args) -> dict:
    """Part 2a: the share of real positions per block on ``builtin:chat``: one record per block, whole
    records packed (and the most any whole-record packing can reach: :func:`fewest_blocks_bound`), and
    records split at the blocks' ends (``split_records``: the cuts and the predictions they drop)."""
    from loopus_train.data import load_blocks
    from loopus_train.packing import PackedRecords, fewest_blocks_bound

    out = {}
    for block in args.chat_blocks:
        records = load_blocks(tokenizer, "builtin:chat", block_size=block, held_out=0.05, seed=0).train
        views = {
            "padded": PackedRecords(records, pack=False),
            "packed": PackedRecords(records),
            "split": PackedRecords(records, split=True),
        }
        bound = fewest_blocks_bound(views["padded"].lengths, block)
        entry = {
            "records": records.num_documents,
            "tokens": records.num_tokens,
            "records_over_half_a_block": int((2 * views["padded"].lengths > block).sum()),
            "whole_record_bound": {"blocks": bound, "real_positions": records.num_tokens / (bound * block)},
        }
        whole_targets = _targets(views["padded"])
        for name, view in views.items():
            entry[name] = {"blocks": len(view), "real_positions": view.real_fraction()}
        entry["split"].update(
            cuts=views["split"].cuts(),
            targets=_targets(views["split"]),
            targets_whole=whole_targets,
            targets_lost=whole_targets - _targets(views["split"]),
        )
        out[str(block)] = entry
    return out


def _saved_bytes(model, fn) -> int:
    """Bytes of the tensors autograd keeps for the backward pass while ``fn`` runs (each storage once, the
    weights not counted)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def head_memory(model, args, device) -> dict:
    """Part 3: bytes kept for backward by one supervised step's decoder + head + losses, before and after."""
    from loopus_convert.measure import Supervision, head_ce, next_token_ce

    ids, labels = _answer_only(model.config.vocab_size, args.batch_size, args.answer_block, device)
    ctx = model.prepare(ids)
    with torch.no_grad():
        h = model.loop_step(model.encode(ctx), ctx)
    sup = Supervision.of(ids, labels)

    def before():
        next_token_ce(model.decode(h, ctx), ids, "sum", labels)

    def after():
        head_ce(model, sup.states(model.decoder_states(h, ctx)), sup.targets)

    def head_only_before():
        next_token_ce(model.head(h), ids, "sum", labels)

    def head_only_after():
        head_ce(model, sup.states(h), sup.targets)

    result = {
        name: _saved_bytes(model, fn)
        for name, fn in (
            ("decoder_and_head_before", before),
            ("decoder_and_head_after", after),
            ("head_before", head_only_before),
            ("head_after", head_only_after),
        )
    }
    result["head_ratio"] = result["head_before"] / max(1, result["head_after"])
    result["decoder_and_head_ratio"] = result["decoder_and_head_before"] / result["decoder_and_head_after"]
    result["logits_before"] = ids.numel() * model.config.vocab_size
    result["logits_after"] = int(sup.targets.numel()) * model.config.vocab_size
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--answer-block", type=int, default=134)
    parser.add_argument("--chat-blocks", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--skip", nargs="*", default=[], choices=["positions", "update", "packing", "memory"])
    args = parser.parse_args()
    from datetime import datetime, timezone

    device = torch.device(args.device)
    # a part not re-run keeps what the file records, and each part says which run measured it
    result = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    command = "python benchmarks/bench_packing.py " + " ".join(sys.argv[1:])
    runs = result.setdefault("runs", {})
    parts = (
        ("real_positions", "positions"),
        ("head_memory", "memory"),
        ("update", "update"),
        ("packing", "packing"),
    )
    chosen = [part for part in parts if part[1] not in args.skip]
    model = optimizer = tokenizer = None
    if any(flag != "positions" for _, flag in chosen):
        model, tokenizer, optimizer = _model(device)
    else:
        from transformers import AutoTokenizer

        from loopus_core.models import default_model_dir

        tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    for key, flag in chosen:  # the file is rewritten after each part: a part cut short keeps the others
        if flag == "positions":
            result[key] = real_positions(tokenizer, args)
        elif flag == "update":
            result[key] = update_times(model, optimizer, args, device)
        elif flag == "packing":
            result[key] = packing(model, tokenizer, args, device)
        else:
            result[key] = head_memory(model, args, device)
        when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        runs[key] = {
            "command": command,
            "date": when,
            "device": str(device),
            "threads": torch.get_num_threads(),
        }
        RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1), flush=True)


def _model(device: torch.device):
    """The embedded model converted at 2:15 in fp32, its tokenizer, and AdamW over the trained parts."""
    from loopus_convert import convert_model
    from loopus_convert.checkpoint import load_with_tokenizer
    from loopus_core.models import default_model_dir
    from loopus_train.config import TrainConfig
    from loopus_train.optim import build_optimizer, select_trainable

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = convert_model(str(default_model_dir()), Path(tmp) / "smol-2-15", split="2:15").out
        model, tokenizer = load_with_tokenizer(ckpt, device)
    model = model.float().train()
    select_trainable(model, PARTS)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer, _ = build_optimizer(named, TrainConfig(checkpoint="-", out="-"), device)
    return model, tokenizer, optimizer


if __name__ == "__main__":
    main()

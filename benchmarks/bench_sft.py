"""SFT benchmark: what the label mask costs (tokens/s of an SFT run against a plain-text run, same size).

Measured on the embedded default model (SmolLM2-135M-Instruct) converted at 4:26, trainable parts as the
default recipe, fp32 on CPU with one intra-op thread (or ``--device cuda``).

1. The mask alone: the same (batch, block) input ids (conversations of the built-in chat set, one per block,
   padded) through one RDS micro-batch (``rds_micro_batch``) with their labels (loss on the assistant
   turns) and without (every next token), interleaved, median of ``--repeats``: tokens/s and the ratio.
   The only code that differs is the loss on the decoder's logits, so the mask's own cost is also timed
   alone (``loss_only``): the masked CE + confidence target + BCE against the plain ones on the same (batch,
   block, vocabulary) logits, median of 30, and that difference as a share of one micro-batch's time.
2. Whole runs of the same size: ``loopus finetune`` (the ``train`` function) on ``--data builtin:chat``
   (``--loss-on`` implied: assistant) and on the built-in text corpus, same model, block size, batch, loop
   and step counts: median tokens/s of the logged updates after the first. Also: the share of the SFT
   blocks' positions that hold a real token (not padding) and that are supervised.

Usage: HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/bench_sft.py [--block-size 128] [--batch-size 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_train import converted_default  # noqa: E402
from loopus_convert.measure import next_token_ce, supervised_targets  # noqa: E402


def mask_cost(ckpt: Path, args, device: torch.device) -> dict:
    """Part 1: one RDS micro-batch on the same inputs with and without labels, interleaved."""
    from loopus_convert.checkpoint import load_with_tokenizer
    from loopus_train.data import load_blocks
    from loopus_train.optim import select_trainable
    from loopus_train.rds import rds_micro_batch

    model, tokenizer = load_with_tokenizer(ckpt, device)
    select_trainable(model, ("loop", "gate", "decoder", "head"))
    model.train()
    blocks = load_blocks(tokenizer, "builtin:chat", block_size=args.block_size, held_out=0.05, seed=0).train
    rows = list(range(args.batch_size))
    ids, labels = blocks[rows].to(device), blocks.labels(rows).to(device)
    steps = list(range(1, args.loop_steps + 1))[-args.supervised :]
    times: dict[str, list[float]] = {"labels": [], "none": []}
    for repeat in range(args.repeats + 1):
        for name, lab in (
            (("labels", labels), ("none", None)) if repeat % 2 else (("none", None), ("labels", labels))
        ):
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            began = time.perf_counter()
            rds_micro_batch(model, ids, steps, labels=lab, scale=1.0 / len(steps))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if repeat:  # the first round warms up
                times[name].append(time.perf_counter() - began)
    tokens = ids.numel()
    result = {name: tokens / statistics.median(t) for name, t in times.items()}
    extra = loss_only(model, ids, labels) * (2 * len(steps))  # CE_prev and CE at each supervised step
    real = sum(int(blocks._stop[i] - blocks._start[i]) for i in range(len(blocks)))
    supervised = int((blocks.labels(slice(0, len(blocks)))[:, 1:] != -100).sum())
    positions = len(blocks) * args.block_size
    return {
        "tokens_per_s_with_labels": result["labels"],
        "tokens_per_s_without": result["none"],
        "ratio": result["labels"] / result["none"],
        "loss_only_extra_s_per_micro_batch": extra,
        "loss_only_share_of_micro_batch": extra / statistics.median(times["none"]),
        "real_token_share": real / positions,
        "supervised_share": supervised / positions,
        "blocks": len(blocks),
    }


# The masked loss over full logits as RDS computed it before issue 24 (head and CE at supervised rows only
# since then): kept here as the path this benchmark measures.


def supervised_ce(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    labels: torch.Tensor | None,
    normaliser: torch.Tensor | float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CE summed over the supervised predictions divided by ``normaliser`` (their count, or its mean over
    the data-parallel ranks), and the per-sequence fraction of correct supervised predictions; without
    ``labels``, the plain mean over every prediction."""
    if labels is None:
        return next_token_ce(logits, input_ids)
    ce, correct = next_token_ce(logits, input_ids, "sum", labels)
    return ce / normaliser, correct


def ce_normaliser(
    input_ids: torch.Tensor,
    labels: torch.Tensor | None,
    mean_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None,
) -> tuple[torch.Tensor | float, torch.Tensor]:
    """What a micro-batch's CE sum is divided by (see the module docstring), and its rows with a target."""
    counts = supervised_targets(input_ids, labels)
    total = counts.sum().double()
    if labels is not None and mean_over_ranks is not None:
        total = mean_over_ranks(total.reshape(1)).reshape(()).to(total.device)
    return total.clamp(min=1).float(), counts > 0


def loss_only(model, ids: torch.Tensor, labels: torch.Tensor, repeats: int = 30) -> float:
    """Seconds the masked loss takes over the plain one on the same logits (median difference)."""
    from loopus_train.rds import confidence_bce

    logits = torch.randn(*ids.shape, model.config.vocab_size, device=ids.device, requires_grad=True)
    q = torch.zeros(ids.shape[0], device=ids.device)

    def once(lab) -> float:
        began = time.perf_counter()
        norm, rows = ce_normaliser(ids, lab, None)
        ce, correct = supervised_ce(logits, ids, lab, norm)
        (ce + confidence_bce(q, correct, rows)).backward()
        return time.perf_counter() - began

    diffs = [once(labels) - once(None) for _ in range(repeats)]
    return statistics.median(diffs)


def run_tokens_per_s(ckpt: Path, data: str | None, args, out: Path) -> float:
    """Part 2: median tokens/s of the logged updates after the first of a short run."""
    from loopus_train.config import TrainConfig
    from loopus_train.train import train

    cfg = TrainConfig(
        checkpoint=str(ckpt),
        out=str(out),
        data=data,
        block_size=args.block_size,
        batch_size=args.batch_size,
        steps=args.steps,
        loop_steps=args.loop_steps,
        supervised=args.supervised,
        eval_every=10**6,
        eval_blocks=1,
        eval_loops=(1,),
        eval_thresholds=(),
        save_every=10**6,
        device=args.device,
        precision=args.precision,
    )
    train(cfg, argv=["bench_sft"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if r.get("kind") == "train"][1:]
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--loop-steps", type=int, default=4)
    parser.add_argument("--supervised", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "loopus-bench")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.device == "cpu":
        torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    ckpt = converted_default(args.work)
    device = torch.device(args.device)
    part1 = mask_cost(ckpt, args, device)
    print(json.dumps({"mask_cost": part1}, indent=1), flush=True)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in (("sft", "builtin:chat"), ("plain", None), ("sft_again", "builtin:chat")):
            runs[name] = run_tokens_per_s(ckpt, data, args, Path(tmp) / name)
    runs["ratio_sft_over_plain"] = statistics.mean([runs["sft"], runs["sft_again"]]) / runs["plain"]
    print(json.dumps({"runs": runs, "settings": {k: str(v) for k, v in vars(args).items()}}, indent=1))


if __name__ == "__main__":
    main()

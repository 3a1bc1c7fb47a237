"""The real-model depth experiment on one GPU (design and commands: README.md next to this file).

``python -m benchmarks.evidence.gpu.depth --model Qwen/Qwen3-0.6B-Base --split 2:26 --out runs/qwen3``

1. probe: zero-shot accuracy per depth of the base (argmax over the ten digit tokens);
2. phase 0 (shared by every arm and seed): the base converted at ``--split`` (residual gate), fine-tuned
   plain at one loop on depths 0-1 (teaches the primitive where the model lacks it; ``--phase0-updates 0``
   skips it);
3. arms x seeds from the phase-0 checkpoint, on depths 0-3: RDS with the residual gate and with the
   official gate init, plain at equal tokens and at equal compute, each plain budget at every lr of the grid;
4. every arm measured on the validation split, the choices frozen (``choose.choose``), then the test split
   generated and measured (depths 0-6: 4-6 never trained); ``depth.json`` and ``tables.md``.

Everything trains through ``loopus_convert.convert.convert_model`` and ``loopus_train.train.train`` (what
``loopus convert`` and ``loopus finetune`` call) on pre-tokenised answer-only records. ``--toy`` runs the
same code path at a tiny size on the CPU (the CI test uses it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import string
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

log = logging.getLogger("benchmarks.evidence.gpu")
LETTERS = string.ascii_lowercase


@dataclass(frozen=True)
class GpuSettings:
    """One run of the experiment (defaults: the GPU budget of README.md)."""

    model: str
    split: str
    out: Path
    n_stmts: int = 16
    n_chains: int = 4
    phase0_depths: tuple[int, ...] = (0, 1)
    depths: tuple[int, ...] = (0, 1, 2, 3)
    test_depths: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6)
    phase0_updates: int = 1000
    updates: int = 1000
    batch: int = 64
    lr: float = 1e-4
    plain_lrs: tuple[float, ...] = (3e-5, 1e-4, 3e-4)
    seeds: tuple[int, ...] = (1, 2, 3)
    loop_steps: int = 4
    supervised: int = 2
    probe_items: int = 200
    val_items: int = 300
    test_items: int = 500
    device: str = "cuda"
    precision: str = "bf16"

    @property
    def gates(self) -> tuple[str, ...]:
        return ("residual", "official")


def toy(s: GpuSettings) -> GpuSettings:
    """The CI size: a few updates, a few items, one device-free run."""
    return replace(s, phase0_updates=2, updates=2, batch=4, seeds=(1,), plain_lrs=(1e-4,),
                   probe_items=4, val_items=4, test_items=4, device="cpu", precision="fp32")


def split_of(text: str) -> str:
    """sha256 buckets of the prompt: 0-9 test, 10-19 validation, 20-99 train."""
    b = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") % 100
    return "test" if b < 10 else ("val" if b < 20 else "train")


def chain_item(depth: int, rng: random.Random, n_stmts: int, n_chains: int) -> tuple[str, int]:
    """(prompt, answer digit): ``n_stmts`` statements ``x=y`` (a target chain of ``depth`` hops, a twin
    as deep, filler chains), interleaved keeping each chain's order, then the query ``q=``."""
    digits = rng.sample(range(10), n_chains)
    names = rng.sample(LETTERS, n_stmts)
    rest = n_stmts - 2 * (depth + 1)
    if rest < n_chains - 2:
        raise ValueError(f"depth {depth} does not fit in {n_stmts} statements")
    cuts = sorted(rng.sample(range(1, rest), n_chains - 3)) if n_chains > 3 else []
    lens = [depth + 1, depth + 1] + [b - a for a, b in zip([0, *cuts], [*cuts, rest], strict=True)]
    chains, pos = [], 0
    for c, size in enumerate(lens):
        vs = names[pos : pos + size]
        pos += size
        chains.append([f"{vs[0]}={digits[c]}"] + [f"{vs[j]}={vs[j - 1]}" for j in range(1, size)])
    order = [c for c, size in enumerate(lens) for _ in range(size)]
    rng.shuffle(order)
    taken = [0] * len(lens)
    statements = []
    for c in order:
        statements.append(chains[c][taken[c]])
        taken[c] += 1
    return ", ".join(statements) + f". {names[depth]}=", digits[0]


def items(split: str, depth: int, count: int, seed: int, s: GpuSettings) -> list[tuple[str, int]]:
    """``count`` items of one depth from one split (the others rejected)."""
    rng, out = random.Random(f"{split}:{depth}:{seed}"), []
    while len(out) < count:
        prompt, answer = chain_item(depth, rng, s.n_stmts, s.n_chains)
        if split_of(prompt) == split:
            out.append((prompt, answer))
    return out


def record(tokenizer, prompt: str, answer: int, depth: int) -> dict:
    """The trainer's record: prompt tokens then the answer digit, labelled on the answer only."""
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    digit = tokenizer(str(answer), add_special_tokens=False)["input_ids"][0]
    n = len(ids)
    return {"input_ids": [*ids, digit], "labels": [-100] * n + [digit], "hops": [-1] * n + [depth],
            "depth": depth}


def sets(tokenizer, split: str, depths, count: int, s: GpuSettings) -> dict:
    """Per depth, stacked tensors of ``count`` records of the most common length (measure's format)."""
    from benchmarks.evidence.task import stack_sets

    out = {}
    for d in depths:
        recs = [record(tokenizer, p, a, d) for p, a in items(split, d, 2 * count, 0, s)]
        lengths = [len(r["input_ids"]) for r in recs]
        mode = max(set(lengths), key=lengths.count)
        out.update(stack_sets([r for r in recs if len(r["input_ids"]) == mode][:count]))
    return out


def write_train(tokenizer, path: Path, depths, count: int, seed: int, s: GpuSettings) -> Path:
    """``count`` training-split records, depths uniform, as the trainer's JSONL."""
    from benchmarks.evidence.finetune import write_records

    rng = random.Random(seed)
    per = {d: iter(items("train", d, count, seed, s)) for d in depths}
    recs = [record(tokenizer, *next(per[d]), d) for d in (rng.choice(depths) for _ in range(count))]
    return write_records(path, recs)


def layer_counts(ckpt: Path) -> tuple[int, int, int]:
    """(encoder, loop block, decoder) layer counts of a looped checkpoint."""
    cfg = json.loads((ckpt / "config.json").read_text())
    a, b, n = cfg["split_start"], cfg["split_end"], cfg["base_config"]["num_hidden_layers"]
    return a, b - a, n - b


def plain_config(ckpt: Path, out: Path, data: Path, s: GpuSettings, steps: int, lr: float, seed: int):
    """``loopus finetune`` at one loop, pure CE, encoder to decoder trained: the plain fine-tune."""
    from loopus_train.config import TrainConfig

    block = max(len(json.loads(line)["input_ids"]) for line in data.open())
    return TrainConfig(checkpoint=str(ckpt), out=str(out), data=str(data), block_size=block,
                       batch_size=s.batch, steps=steps, lr=lr, min_lr=lr / 10, warmup=max(0, steps // 20),
                       loop_steps=1, supervised=1, beta=0.0, conf_weight=0.0,
                       train_parts=("encoder", "loop", "decoder"), precision=s.precision, seed=seed,
                       held_out=0.01, eval_every=steps, eval_blocks=2, eval_loops=(1,), save_every=steps,
                       keep=1, device=s.device, data_workers=1)


def rds_config(ckpt: Path, out: Path, data: Path, s: GpuSettings, seed: int):
    """``loopus finetune`` with RDS (``--loop-steps 4 --supervised 2``, default parts)."""
    return replace(plain_config(ckpt, out, data, s, s.updates, s.lr, seed), loop_steps=s.loop_steps,
                   supervised=s.supervised, beta=1.0, conf_weight=1.0,
                   train_parts=("loop", "gate", "decoder", "head"), eval_loops=(1, 2))


def regate(ckpt: Path, out: Path, gate: str, seed: int) -> Path:
    """The phase-0 checkpoint with a fresh gate of ``gate`` init (seeded), saved as a looped checkpoint."""
    from loopus_convert.checkpoint import load_with_tokenizer, save_looped
    from loopus_convert.modeling_loopus import make_gate

    model, tokenizer = load_with_tokenizer(ckpt, "cpu")
    torch.manual_seed(seed)
    model.config.gate_init = gate
    model.gate = make_gate(model.config)
    model.gate.reset()
    model.confidence_head.reset()
    save_looped(model, out, tokenizer, None, True)
    return out


def train_arm(cfg, arm: dict) -> dict:
    """Run ``loopus finetune``'s function; the arm's record with the checkpoint and wall time."""
    from loopus_train.train import train

    t0 = time.time()
    result = train(cfg, argv=["benchmarks.evidence.gpu"])
    metrics = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").open()]
    per = sorted(cfg.batch_size * cfg.block_size / m["tokens_per_s"] for m in metrics if m["kind"] == "train")
    return {**arm, "config": cfg.identity(), "checkpoint": str(result.checkpoint),
            "wall_s": round(time.time() - t0, 1), "s_per_update_median": per[len(per) // 2]}


def measure(record: dict, data: dict) -> dict:
    """Accuracy per depth (K = 1, 2, 4, 8 and the exit curve for RDS; K = 1 plain)."""
    from benchmarks.evidence.choose import LOOPS, TAUS
    from benchmarks.evidence.measure import evaluate
    from loopus_convert.checkpoint import load_with_tokenizer

    model, _ = load_with_tokenizer(record["checkpoint"], record["device"])
    data = {d: {k: v.to(record["device"]) for k, v in t.items()} for d, t in data.items()}
    model.eval()
    out = evaluate(model, data, LOOPS, TAUS) if record["mode"] == "rds" else evaluate(model, data, (1,))
    return json.loads(json.dumps(out))


@torch.no_grad()
def probe(model_dir: str, tokenizer, data: dict, device: str) -> dict:
    """Zero-shot accuracy per depth of the base: argmax over the ten digit tokens at the query."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    digits = torch.tensor([tokenizer(str(i), add_special_tokens=False)["input_ids"][0] for i in range(10)])
    out = {}
    for d, t in data.items():
        logits = model(input_ids=t["input_ids"].to(device)).logits[:, -2, digits.to(device)]
        out[str(d)] = float((digits[logits.argmax(-1).cpu()] == t["labels"][:, -1]).float().mean())
    return out


def phase0(s: GpuSettings, tokenizer) -> tuple[Path, dict]:
    """Convert the base at ``s.split`` (residual gate) and fine-tune it plain on the phase-0 depths."""
    from loopus_convert.convert import convert_model

    converted = s.out / "converted"
    if not converted.exists():
        convert_model(s.model, converted, split=s.split, dtype="float32")
    if s.phase0_updates == 0:
        return converted, {"updates": 0}
    done = s.out / "phase0" / "record.json"
    if done.exists():
        rec = json.loads(done.read_text())
        return Path(rec["checkpoint"]), rec
    data = write_train(tokenizer, s.out / "phase0.jsonl", s.phase0_depths, s.phase0_updates * s.batch, 0, s)
    cfg = plain_config(converted, s.out / "phase0" / "run", data, s, s.phase0_updates, s.lr, 0)
    rec = train_arm(cfg, {"name": "phase0", "mode": "plain", "device": s.device})
    done.write_text(json.dumps(rec, indent=1))
    return Path(rec["checkpoint"]), rec


def plan(s: GpuSettings, start: Path, seed: int) -> list[dict]:
    """The arms of one seed; plain at equal compute gets the RDS run's layer passes (the toy's count)."""
    from benchmarks.evidence.finetune import FinetuneSettings, rds_units

    enc, loop, dec = layer_counts(start)
    ft = FinetuneSettings(loop_steps=s.loop_steps, supervised=s.supervised)
    rds = rds_units(ft, seed, s.updates, 1, (enc, loop, dec))  # per token, encoder frozen
    plain = 3 * (enc + loop + dec)  # per token and update, encoder trained
    steps = {"compute": max(1, round(rds / plain)), "tokens": s.updates}
    base = {"seed": seed, "device": s.device, "record_len": None}
    arms = [{**base, "name": f"rds_{g}", "mode": "rds", "gate": g, "lr": s.lr, "steps": s.updates,
             "units": rds} for g in s.gates]
    arms += [{**base, "name": f"plain_{b}_lr{lr:g}", "mode": "plain", "budget": b, "lr": lr, "steps": n,
              "units": n * plain} for b, n in steps.items() for lr in s.plain_lrs]
    return arms


def run_arm(s: GpuSettings, start: Path, data: Path, arm: dict, val: dict) -> dict:
    """One arm x seed, trained and measured on validation (reused from its record.json)."""
    root = s.out / "arms" / arm["name"] / f"s{arm['seed']}"
    done = root / "record.json"
    if done.exists():
        return json.loads(done.read_text())
    if arm["mode"] == "rds":
        ckpt = regate(start, root / "start", arm["gate"], arm["seed"])
        cfg = rds_config(ckpt, root / "run", data, s, arm["seed"])
    else:
        cfg = plain_config(start, root / "run", data, s, arm["steps"], arm["lr"], arm["seed"])
    rec = train_arm(cfg, arm)
    rec["tokens"] = cfg.steps * s.batch
    rec["val"] = measure(rec, val)
    done.write_text(json.dumps(rec, indent=1))
    return rec


def run(s: GpuSettings) -> dict:
    """Every step of the module docstring; writes ``depth.json`` and ``tables.md`` into ``s.out``."""
    from transformers import AutoTokenizer

    from benchmarks.evidence.choose import choose, summarise

    s.out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(s.model)
    out = {"settings": {k: str(v) for k, v in asdict(s).items()}, "order": []}
    probe_sets = sets(tokenizer, "val", s.test_depths, s.probe_items, s)
    out["probe"] = probe(s.model, tokenizer, probe_sets, s.device)
    start, out["phase0"] = phase0(s, tokenizer)
    val = sets(tokenizer, "val", s.test_depths, s.val_items, s)
    out["order"].append("val")
    data = write_train(tokenizer, s.out / "train.jsonl", s.depths, 3 * s.updates * s.batch, 1, s)
    records = [run_arm(s, start, data, arm, val) for seed in s.seeds for arm in plan(s, start, seed)]
    choices = choose(records, s)
    (s.out / "choices.json").write_text(json.dumps(choices, indent=1))  # frozen before the test exists
    out["order"].append("freeze")
    test = sets(tokenizer, "test", s.test_depths, s.test_items, s)
    out["order"].append("test")
    for rec in records:
        rec["test"] = measure(rec, test)
    out.update(choices=choices, arms=records, summary=summarise(records, choices, s))
    (s.out / "depth.json").write_text(json.dumps(out, indent=1), encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="HF directory or hub id of the base model")
    ap.add_argument("--split", required=True, help="A:B (e.g. from `loopus analyze MODEL`)")
    ap.add_argument("--out", type=Path, required=True, help="results directory (its own, never results/)")
    ap.add_argument("--updates", type=int, default=None, help="RDS updates per arm (plain: see README)")
    ap.add_argument("--phase0-updates", type=int, default=None, help="0 skips phase 0")
    ap.add_argument("--toy", action="store_true", help="the CI size on the CPU")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    s = GpuSettings(model=args.model, split=args.split, out=args.out)
    s = toy(s) if args.toy else s
    for flag in ("updates", "phase0_updates"):
        if getattr(args, flag) is not None:
            s = replace(s, **{flag: getattr(args, flag)})
    run(s)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Part 1 of the evidence: the depth task. Pretrain, analyse, convert, fine-tune every arm, choose, test.

The protocol (:mod:`benchmarks.evidence.protocol`): every arm x seed is converted and fine-tuned with the
toolkit's own ``loopus convert`` / ``loopus finetune`` functions (:mod:`benchmarks.evidence.finetune`) on
training-split records and measured on the validation split; the choices (:mod:`benchmarks.evidence.choose`)
are made on validation and frozen; only then is the test split generated and every arm measured on it.
Arms per seed: RDS with each gate init; plain at equal compute and at equal tokens, each at every learning
rate of the grid. An arm x seed whose ``record.json`` exists is reused (an interrupted run resumes there).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import LlamaForCausalLM

from benchmarks.evidence.choose import LOOPS, TAUS, choose, summarise
from benchmarks.evidence.finetune import (
    FinetuneSettings,
    layer_counts,
    plain_units_per_update,
    rds_units,
    run_arm,
    write_records,
)
from benchmarks.evidence.measure import depth_accuracy, evaluate
from benchmarks.evidence.pretrain import PretrainSettings, pretrain
from benchmarks.evidence.protocol import Protocol
from benchmarks.evidence.task import Codec, Sampler, chance, majority, program_text

log = logging.getLogger(__name__)

TRAIN_DATA_SEED = 777


@dataclass(frozen=True)
class ChainSettings:
    """The whole depth-task experiment."""

    pretrain: PretrainSettings = field(default_factory=PretrainSettings)
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    eval_depths: tuple[int, ...] = tuple(range(8))
    eval_size: int = 256  # programs per depth, in each of validation and test
    analyze_programs: int = 400
    analyze_tokens: int | None = None
    analyze_probes: bool = True


def analyse(base_dir: Path, work: Path, s: ChainSettings, codec: Codec) -> dict:
    """``loopus analyze`` of the pretrained model on validation programs (one per line); its pick."""
    from loopus_analyze.analyze import run_analysis

    sampler = Sampler(99, s.pretrain.n, "val", codec)
    depths = list(s.pretrain.depths)
    programs = [program_text(sampler.program(depths[i % len(depths)])[0]) for i in range(s.analyze_programs)]
    # the analysis splits its text by document and maps windows of 32 tokens: 4 programs per document
    docs = ["\n".join(programs[i : i + 4]) for i in range(0, len(programs), 4)]
    probe = work / "analyze_probe.jsonl"
    probe.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    res = run_analysis(
        str(base_dir),
        out=work / "analysis",
        data=probe,
        tokens=s.analyze_tokens,
        device="cpu",
        probes=s.analyze_probes,
    )
    return {
        "split": res.split,
        "confidence": res.confidence,
        "reason": res.reason,
        "alternatives": res.alternatives[:5],
    }


def pretrained(s: ChainSettings, work: Path) -> tuple[Path, dict]:
    """The pretrained model's directory and record; reused from ``work/pretrained`` when it is there."""
    base_dir = work / "pretrained"
    done = base_dir / "pretrain.json"
    if done.exists():
        log.info("reusing the pretrained model in %s", base_dir)
        return base_dir, json.loads(done.read_text())
    pre = pretrain(s.pretrain, base_dir)
    done.write_text(json.dumps(pre, indent=1))
    return base_dir, pre


def train_data(s: ChainSettings, work: Path, codec: Codec) -> Path:
    """The training records (training split, depths of the fine-tune): enough for the longest arm (plain
    at equal compute, at most 3x the RDS updates) without repeating a program."""
    ft = s.finetune
    count = math.ceil(3 * ft.steps * ft.programs_per_update / (1 - ft.held_out)) + ft.programs_per_update
    path = work / f"train_{count}.jsonl"
    if not path.exists():
        sampler = Sampler(TRAIN_DATA_SEED, s.pretrain.n, "train", codec, ft.deep)
        records = sampler.records(count, list(ft.depths))
        write_records(path.with_suffix(".tmp"), records).rename(path)
    return path


def plan(s: ChainSettings, seed: int, record_len: int) -> list[dict]:
    """The arms of one seed (RDS per gate, plain per budget and learning rate) with their updates."""
    ft = s.finetune
    counts = layer_counts(ft.split, s.pretrain.layers)
    tokens = ft.programs_per_update * record_len
    units = rds_units(ft, seed, ft.steps, tokens, counts)
    per_update = plain_units_per_update(tokens, counts)
    plain_steps = {"compute": max(1, round(units / per_update)), "tokens": ft.steps}
    base = {"seed": seed, "record_len": record_len}
    arms = [
        {**base, "name": f"rds_{g}", "mode": "rds", "gate": g, "lr": ft.lr, "steps": ft.steps, "units": units}
        for g in ft.gates
    ]
    for budget, steps in plain_steps.items():
        for lr in ft.plain_lrs:
            name = f"plain_{budget}_lr{lr:g}"
            arm = {"name": name, "mode": "plain", "budget": budget, "lr": lr, "steps": steps}
            arms.append({**base, **arm, "units": steps * plain_units_per_update(tokens, counts)})
    return arms


def arm_record(base_dir: Path, work: Path, data: Path, s: ChainSettings, arm: dict, val: dict) -> dict:
    """One arm x seed trained and measured on validation; reused from its ``record.json`` when there."""
    root = work / "arms" / arm["name"] / f"s{arm['seed']}"
    done = root / "record.json"
    if done.exists():
        return json.loads(done.read_text())
    shutil.rmtree(root, ignore_errors=True)  # an interrupted arm starts again
    log.info("arm %s seed %d: %d updates", arm["name"], arm["seed"], arm["steps"])
    record = run_arm(base_dir, root, data, s.finetune, arm)
    record["val"] = measure(record, val)
    record = json.loads(json.dumps(record))  # string keys, as a reused record has
    done.write_text(json.dumps(record, indent=1), encoding="utf-8")
    return record


def measure(record: dict, sets: dict) -> dict:
    """Accuracy per depth x K (RDS: K = 1, 2, 4, 8 and the exit curve; plain: K = 1) of a trained arm."""
    from loopus_convert.checkpoint import load_with_tokenizer

    model, _ = load_with_tokenizer(record["checkpoint"], "cpu")
    model.eval()
    if record["mode"] == "rds":
        return evaluate(model, sets, LOOPS, TAUS)
    return evaluate(model, sets, (1,))


def baselines(base_dir: Path, sets: dict) -> dict:
    """Chance, the majority shortcut and the pretrained base on one split's sets."""
    base = LlamaForCausalLM.from_pretrained(base_dir).float().eval()
    return {"chance": chance(sets), "majority": majority(sets), "base_acc": depth_accuracy(base, sets)}


def run_chain(s: ChainSettings, work: Path, save: Callable[[dict], None] | None = None) -> dict:
    """The whole protocol (see the module docstring). ``save`` receives a partial record after each arm."""
    base_dir, pre = pretrained(s, work)
    codec, n = Codec(s.pretrain.names), s.pretrain.n
    protocol = Protocol(work / "protocol", n, list(s.eval_depths), s.eval_size, codec, s.finetune.deep)
    val = protocol.val_sets()
    out: dict = {"settings": asdict(s), "pretrain": pre, "eval_size": s.eval_size}
    out["analysis"] = analyse(base_dir, work, s, codec)
    out["val_baselines"] = json.loads(json.dumps(baselines(base_dir, val)))
    data = train_data(s, work, codec)
    out["train_data"] = {"path": str(data), "programs": sum(1 for _ in data.open()), "split": "train"}
    records: list[dict] = []
    for seed in s.finetune.seeds:
        for arm in plan(s, seed, n + 2):
            records.append(arm_record(base_dir, work, data, s, arm, val))
            if save is not None:
                save({**out, "arms": records, "partial": True})
    out["choices"] = protocol.freeze(choose(records, s.finetune))
    test = protocol.test_sets()
    out["test_baselines"] = json.loads(json.dumps(baselines(base_dir, test)))
    for record in records:
        record["test"] = json.loads(json.dumps(measure(record, test)))
    out["order"] = protocol.log
    out["arms"] = records
    out["summary"] = summarise(records, out["choices"], s.finetune)
    return out

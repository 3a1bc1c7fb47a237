"""Part 1 of the evidence: the depth task. Pretrain, analyse, convert, fine-tune (RDS and plain), measure.

Rows (every one on the same held-out programs): the pretrained base; the converted model before training;
RDS with the identity gate (the toolkit's default) at the research's split; RDS with the official gate
init; the plain fine-tune at the RDS run's compute; RDS at the split ``loopus analyze`` recommends (when it
differs). Each looped row: accuracy per depth at K = 1, 2, 4, 8 and the early-exit curve.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from transformers import LlamaForCausalLM

from benchmarks.evidence.finetune import FinetuneSettings, finetune, looped_model
from benchmarks.evidence.measure import depth_accuracy, exit_curve, exit_trace, toolkit_exit_loops
from benchmarks.evidence.pretrain import PretrainSettings, pretrain
from benchmarks.evidence.task import Codec, Sampler, chance, eval_sets, majority, program_text

log = logging.getLogger(__name__)

LOOPS = (1, 2, 4, 8)
TAUS = (0.5, 0.6, 0.8, 0.9, 0.95, 0.97, 0.99)


@dataclass
class ChainSettings:
    """The whole depth-task experiment."""

    pretrain: PretrainSettings = field(default_factory=PretrainSettings)
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    eval_depths: tuple[int, ...] = tuple(range(8))
    eval_size: int = 256
    analyze_programs: int = 400
    analyze_tokens: int | None = None
    analyze_probes: bool = True


def run_row(
    base_dir: Path, s: FinetuneSettings, codec: Codec, n: int, sets: dict, train: bool = True
) -> dict:
    """Convert, optionally fine-tune, then accuracy per K and (for RDS) the exit curve with its check."""
    model = looped_model(str(base_dir), s.split, s.gate)
    row = {"split": s.split, "gate": s.gate, "mode": s.mode if train else "none"}
    if train:
        row["train"] = finetune(model, s, codec, n)
    loops = (1,) if s.mode == "plain" else LOOPS
    row["acc"] = {k: depth_accuracy(model, sets, k) for k in loops}
    if train and s.mode == "rds":
        traces = {d: exit_trace(model, st, d, max(LOOPS)) for d, st in sets.items()}
        row["exit"] = exit_curve(traces, list(TAUS), max(LOOPS))
        deepest = max(sets)
        tau = 0.97
        row["exit_check"] = {
            "tau": tau,
            "depth": deepest,
            "toolkit_mean_loops": toolkit_exit_loops(model, sets[deepest], tau, max(LOOPS)),
            "offline_mean_loops": next(r for r in row["exit"] if r["tau"] == tau)["loops"][deepest],
        }
    return row


def analyse(base_dir: Path, work: Path, s: ChainSettings, codec: Codec) -> dict:
    """``loopus analyze`` of the pretrained model on held-out programs (one per line); its recommendation."""
    from loopus_analyze.analyze import run_analysis

    sampler = Sampler(99, s.pretrain.n, held_out=True, codec=codec)
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


def run_chain(s: ChainSettings, work: Path, save: Callable[[dict], None] | None = None) -> dict:
    """Every row of the depth task. ``save`` receives the results after each row (a partial record, so an
    interrupted run keeps what it measured); its rows are not reused by a rerun."""
    base_dir, pre = pretrained(s, work)
    codec, n = Codec(s.pretrain.names), s.pretrain.n
    sets = eval_sets(n, list(s.eval_depths), s.eval_size, codec, s.finetune.deep)
    base = LlamaForCausalLM.from_pretrained(base_dir).float().eval()
    out = {
        "pretrain": pre,
        "chance": chance(sets),
        "majority": majority(sets),
        "base_acc": depth_accuracy(base, sets),
        "eval_size": s.eval_size,
    }
    out["analysis"] = analyse(base_dir, work, s, codec)
    ft = s.finetune
    out["before"] = run_row(base_dir, ft, codec, n, sets, train=False)
    rows = {"rds_identity": ft, "plain": None, "rds_official": replace(ft, gate="official")}
    if out["analysis"]["split"] != ft.split:
        rows["rds_analysis_split"] = replace(ft, split=out["analysis"]["split"])
    for name, settings in rows.items():
        log.info("row %s", name)
        if settings is None:  # the plain fine-tune at the identity RDS run's compute
            settings = replace(ft, mode="plain", match_units=out["rds_identity"]["train"]["units"])
        out[name] = run_row(base_dir, settings, codec, n, sets)
        if save is not None:
            save({**out, "partial": name != list(rows)[-1]})
    return out

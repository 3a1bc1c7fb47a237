"""The budgets of ``python -m benchmarks.evidence.run``: the recorded run (the defaults) and --quick.

The committed results in ``results/`` are the default budget's; a run with any other budget (``--quick``,
the ``--real-*`` flags) writes into ``--work``'s ``results/`` unless ``--out`` says where (so it never
overwrites the committed files by accident).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from benchmarks.evidence.chain import ChainSettings
from benchmarks.evidence.damped import DampedSettings
from benchmarks.evidence.finetune import FinetuneSettings
from benchmarks.evidence.pretrain import PretrainSettings
from benchmarks.evidence.real import RealSettings

PARTS = ("chain", "damped", "real")
RESULTS_DIR = Path(__file__).parent / "results"  # the committed tables and plots of the full run
WORK_ROOT = Path("benchmarks/out/evidence")


@dataclass
class Settings:
    """Everything one invocation runs, and where it writes."""

    chain: ChainSettings
    damped: DampedSettings
    real: RealSettings
    out: Path
    work: Path


QUICK_CHAIN = ChainSettings(
    pretrain=PretrainSettings(steps=30, batch=16),
    finetune=FinetuneSettings(steps=3, blocks=2, warmup=1, plain_lrs=(1e-3, 3e-3), seeds=(1, 2)),
    eval_size=16,
    analyze_programs=150,
    analyze_tokens=1100,
    analyze_probes=False,
)
QUICK_DAMPED = DampedSettings(
    loops=(1, 2),
    alphas=(0.5, 1.0),
    block_size=64,
    max_blocks=2,
    batch_size=2,
    analyze_tokens=1016,
    analyze_probes=False,
)
QUICK_REAL = RealSettings(
    updates=2,
    block_size=32,
    eval_loops=(1, 2),
    thresholds=(0.9,),
    eval_blocks=2,
    eval_block_size=64,
    analyze_tokens=1016,
    analyze_probes=False,
)


BUDGET_FLAGS = (("real_updates", "updates"), ("real_seq_len", "block_size"), ("real_batch", "batch"))


def recorded_budget(args) -> bool:
    """True when ``args`` ask for the recorded (default) budget: no --quick, no budget flag that differs."""
    default = RealSettings()
    changed = [f for f, name in BUDGET_FLAGS if getattr(args, f) not in (None, getattr(default, name))]
    return not args.quick and not changed and args.seed == 0


def settings_for(args) -> Settings:
    """The settings of parsed command-line ``args`` (``--quick``, ``--seed``, ``--out``, ``--work``,
    ``--cka-split`` and the real-model budget flags)."""
    tag = "quick" if args.quick else "full"
    work = args.work or WORK_ROOT / f"{tag}-seed{args.seed}"
    out = args.out or (RESULTS_DIR if recorded_budget(args) else work / "results")
    chain = QUICK_CHAIN if args.quick else ChainSettings()
    seeds = tuple(args.seed + s for s in chain.finetune.seeds)
    chain = replace(
        chain,
        pretrain=replace(chain.pretrain, seed=args.seed),
        finetune=replace(chain.finetune, seeds=seeds),
    )
    damped = replace(
        QUICK_DAMPED if args.quick else DampedSettings(),
        model=args.real_model,
        splits=("auto", args.cka_split),
    )
    real = replace(
        QUICK_REAL if args.quick else RealSettings(),
        model=args.real_model,
        analysis_dir=work / "damped",
        splits=("auto", "paper", args.cka_split),
    )
    for flag, name in BUDGET_FLAGS:
        if getattr(args, flag) is not None:
            real = replace(real, **{name: getattr(args, flag)})
    return Settings(chain=chain, damped=damped, real=real, out=out, work=work)

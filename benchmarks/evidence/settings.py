"""The budgets of ``python -m benchmarks.evidence.run``: the full run (the research protocol) and --quick."""

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
    finetune=FinetuneSettings(steps=4, batch=8),
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


def settings_for(args) -> Settings:
    """The settings of parsed command-line ``args`` (``--quick``, ``--seed``, ``--out``, ``--work``,
    ``--cka-split`` and the real-model budget flags)."""
    tag = "quick" if args.quick else "full"
    work = args.work or WORK_ROOT / f"{tag}-seed{args.seed}"
    out = args.out or (work / "results" if args.quick else RESULTS_DIR)
    chain = QUICK_CHAIN if args.quick else ChainSettings()
    chain = replace(
        chain,
        pretrain=replace(chain.pretrain, seed=args.seed),
        finetune=replace(chain.finetune, seed=args.seed + 1),
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
    for flag, name in (("real_updates", "updates"), ("real_seq_len", "block_size"), ("real_batch", "batch")):
        if getattr(args, flag) is not None:
            real = replace(real, **{name: getattr(args, flag)})
    return Settings(chain=chain, damped=damped, real=real, out=out, work=work)

"""``python -m benchmarks.evidence.run [--quick] [--seed S] [--out DIR]``: does looping help?

Parts (``--parts``, default all): ``chain`` (the depth task: pretrain, analyse, convert, RDS / plain
fine-tunes, accuracy per depth x K, early exit), ``damped`` (looping without training on the default model),
``real`` (the default model fine-tuned with ``loopus finetune`` at a budget per row). Each part writes its
JSON into ``--out``; the tables (``tables.md``) and plots (``*.png``) are then rebuilt from every JSON there,
so parts can run as separate processes. Models and other large files go to ``--work``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from benchmarks.evidence.settings import PARTS, settings_for

log = logging.getLogger("benchmarks.evidence")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the one-minute version (tiny budgets, no claim)")
    ap.add_argument("--seed", type=int, default=0, help="pretraining seed (fine-tunes: seed + 1, 2, 3)")
    ap.add_argument("--out", type=Path, default=None, help="JSON, tables and plots (default: see README)")
    ap.add_argument("--work", type=Path, default=None, help="models, probe text (default benchmarks/out/...)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    ap.add_argument("--report-only", action="store_true", help="rebuild tables and plots from --out")
    ap.add_argument("--real-model", default=None, help="the real model (default: the embedded SmolLM2)")
    ap.add_argument("--cka-split", default="11:21", help="the old CKA-only split row (real model)")
    ap.add_argument("--real-updates", type=int, default=None, help="optimizer updates per real-model row")
    ap.add_argument("--real-seq-len", type=int, default=None, help="tokens per sequence (real model)")
    ap.add_argument("--real-batch", type=int, default=None, help="sequences per update (real model)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    return ap.parse_args(argv)


def run_part(part: str, args: argparse.Namespace, cfg, out: Path, work: Path) -> None:
    """Run one part and write ``out/<part>.json`` (with the wall time and the machine)."""
    t0 = time.time()
    if part == "chain":
        from benchmarks.evidence.chain import run_chain

        def save(partial: dict) -> None:
            (out / "chain.json").write_text(json.dumps(partial, indent=1, default=str), encoding="utf-8")

        result = run_chain(cfg.chain, work / "chain", save)
    elif part == "damped":
        from benchmarks.evidence.damped import run_damped

        result = run_damped(cfg.damped, work / "damped")
    else:
        from benchmarks.evidence.real import run_real

        result = run_real(cfg.real, work / "real")
    if part != "chain":  # the chain part records its own settings
        result["settings"] = asdict(getattr(cfg, part))
    result["wall_s"] = round(time.time() - t0, 1)
    result["machine"] = machine()
    result["command"] = " ".join(["python -m benchmarks.evidence.run", *args.argv])
    (out / f"{part}.json").write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
    log.info("%s done in %.0f s", part, result["wall_s"])


def machine() -> dict:
    """What the numbers were measured on."""
    import os
    import platform

    return {
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "load_avg": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    cfg = settings_for(args)
    out, work = cfg.out, cfg.work
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        for part in [p.strip() for p in args.parts.split(",") if p.strip()]:
            run_part(part, args, cfg, out, work)
    from benchmarks.evidence.report import write_report

    for path in write_report(out):
        log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

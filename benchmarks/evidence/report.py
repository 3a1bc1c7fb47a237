"""Tables (``tables.md``) and plots (``*.png``) of the evidence JSONs in one directory.

Each part's JSON (``chain.json``, ``damped.json``, ``real.json``) becomes a section of ``tables.md`` and one
or two plots; a missing part is left out. Numbers are printed as measured.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

PLOTS = ("chain_accuracy.png", "chain_exit.png", "damped.png", "real.png")
ARM_LABELS = {
    "rds_residual": "RDS, residual gate (default)",
    "rds_official": "RDS, official gate init",
    "plain_compute": "plain, equal compute",
    "plain_tokens": "plain, equal tokens",
}


def _f(x: float, digits: int = 2) -> str:
    return f"{x:.{digits}f}"


def _ci(c: dict, digits: int = 2) -> str:
    """``mean [lo, hi]``."""
    return f"{c['mean']:.{digits}f} [{c['lo']:.{digits}f}, {c['hi']:.{digits}f}]"


def arm_label(name: str) -> str:
    """``plain_compute_lr0.001`` -> ``plain, equal compute, lr 0.001``."""
    if name.startswith("plain_"):
        budget, lr = name[len("plain_") :].split("_lr")
        return f"{ARM_LABELS['plain_' + budget]}, lr {lr}"
    return ARM_LABELS.get(name, name)


def _depth_row(label: str, values: dict, extra: list[str]) -> str:
    return "| " + " | ".join([label, *(_f(values[d]) for d in sorted(values, key=int)), *extra]) + " |"


def chain_tables(r: dict) -> list[str]:
    """The depth task's test table (means and 95% intervals over seeds), early exit, paired differences,
    the validation choices and the analysis line."""
    su, ch = r["summary"], r["choices"]
    base = r["test_baselines"]
    depths = sorted(base["chance"], key=int)
    seeds = ch["seeds"]
    lines = [
        f"## Depth task: test accuracy per depth, mean [95% t-interval] over seeds {seeds}",
        "",
        "Chosen on validation (frozen before the test split was generated): "
        f"gate **{ch['gate']}**, best K {ch['best_k']}, early exit tau **{ch['exit']['tau']}**, plain lr "
        f"{ch['plain_lr']}. Rule: {ch['rules']}. Rows marked (not chosen) are shown for completeness.",
        "",
        "| row | K | " + " | ".join(f"d{d}" for d in depths) + " | mean | updates | tokens | units |",
        "|" + "---|" * (len(depths) + 6),
        _depth_row("chance", base["chance"], ["", "", "", ""]).replace("| chance |", "| chance | - |", 1),
        _depth_row("majority shortcut", base["majority"], [""] * 4).replace(" |", " | - |", 1),
        _depth_row("pretrained base", base["base_acc"], [""] * 4).replace(" |", " | 1 |", 1),
    ]
    for row in sorted(su["rows"], key=lambda x: (not x["chosen"], x["arm"], int(x["k"]))):
        label = arm_label(row["arm"]) + ("" if row["chosen"] else " (not chosen)")
        label = f"**{label}**" if row["chosen"] else label
        cells = [_ci(row["acc"][d]) for d in depths] + [_ci(row["acc"]["mean"])]
        cost = [f"{row['updates']:.0f}", f"{row['tokens']:.3g}", f"{row['units']:.3g}"]
        lines.append(f"| {label} | {row['k']} | " + " | ".join(cells + cost) + " |")
    lines += ["", *exit_lines(su["exit"], depths), "", *paired_lines(su, ch, depths)]
    a = r["analysis"]
    lines += [
        "",
        f"`loopus analyze` on the pretrained model (validation programs as text) recommends "
        f"**{a['split']}** ({a['confidence']} confidence): {a['reason']}",
        "",
    ]
    return lines


def exit_lines(e: dict, depths: list[str]) -> list[str]:
    """The chosen tau's accuracy and mean loops per depth on test, then every tau's means."""
    lines = [
        f"### Early exit (threshold, tau {e['tau']} chosen on validation, at most 8 passes), test",
        "",
        "| | " + " | ".join(f"d{d}" for d in depths) + " | mean |",
        "|" + "---|" * (len(depths) + 2),
        "| accuracy | " + " | ".join(_ci(e["acc"][d]) for d in depths) + f" | {_ci(e['mean_acc'])} |",
        "| mean loops | " + " | ".join(_ci(e["loops"][d]) for d in depths) + f" | {_ci(e['mean_loops'])} |",
        "",
        "Every tau on test (means over seeds; only the chosen one is the headline): "
        + ", ".join(
            f"{t['tau']}{'*' if t['chosen'] else ''}: acc {_f(t['mean_acc'])} / loops {_f(t['mean_loops'])}"
            for t in e["all_taus"]
        ),
    ]
    return lines


def paired_lines(su: dict, ch: dict, depths: list[str]) -> list[str]:
    """Differences of the chosen looped model at its best K against each baseline, paired by seed."""
    best = ch["best_k"][ch["gate"]]
    lines = [
        f"### Paired by seed: {arm_label(su['looped'])} at K = {best} minus ...",
        "",
        "| minus | " + " | ".join(f"d{d}" for d in depths) + " | mean |",
        "|" + "---|" * (len(depths) + 2),
    ]
    for label, diff in su["paired"].items():
        cells = [_ci(diff[d], 3) for d in [*depths, "mean"]]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    end = su["endpoint"]
    lines += [
        "",
        f"Endpoint (fixed before the runs): mean test accuracy over the never-trained depths "
        f"{', '.join('d' + d for d in end['depths'])}, {arm_label(su['looped'])} at K = {best} minus: "
        + "; ".join(f"{label} {_ci(end[label], 3)}" for label in su["paired"]),
    ]
    return lines


def damped_tables(r: dict) -> list[str]:
    """Held-out perplexity of the damped loop per split, a and K, beside the base."""
    lines = [
        "## Looping without training: h + a (f(h) - h) at the block",
        "",
        f"Base model perplexity: **{_f(r['base_ppl'], 3)}** on {r['tokens']} held-out tokens.",
        "",
    ]
    for split, s in r["splits"].items():
        ks = sorted(next(iter(s["ppl"].values())), key=int)
        lines += [
            f"Split {split} (from `{s['from']}`):",
            "",
            "| a | " + " | ".join(f"K={k}" for k in ks) + " |",
            "|" + "---|" * (len(ks) + 1),
        ]
        for a, per in s["ppl"].items():
            lines.append(f"| {a} | " + " | ".join(_f(per[k], 3) for k in ks) + " |")
        lines.append("")
    return lines


def real_tables(r: dict) -> list[str]:
    """Per row of the real model: tokens, wall times, perplexity per K and under early exit."""
    ks = sorted({k for row in r["rows"].values() for k in row["ppl"]}, key=int)
    lines = [
        "## The real model: fine-tuned with `loopus finetune`",
        "",
        f"Held-out: {r['eval_tokens']} tokens of the trainer's held-out documents.",
        "",
        "| row | split | chosen as | train tokens | updates | train wall s | "
        + " | ".join(f"ppl K={k}" for k in ks)
        + " | exit (tau: ppl, mean loops) |",
        "|" + "---|" * (len(ks) + 7),
    ]
    for name, row in r["rows"].items():
        t = row.get("train", {})
        ppl = [_f(row["ppl"][k], 3) if k in row["ppl"] else "" for k in ks]
        ex = "; ".join(
            f"{tau}: {_f(v['ppl'], 3)}, {_f(v['mean_loops'])}"
            for tau, v in row.get("exit", {}).items()
            if tau != "full"
        )
        lines.append(
            f"| {name} | {row['split']} | {row.get('from', '-')} | {t.get('tokens', 0)} | "
            f"{t.get('updates', 0)} | "
            f"{t.get('train_wall_s', '')} | " + " | ".join(ppl) + f" | {ex} |"
        )
    return lines + [""]


def write_report(out: Path) -> list[Path]:
    """Write ``tables.md`` and the plots of every part found in ``out``; returns the files written."""
    from benchmarks.evidence import plots

    parts = {
        p: json.loads((out / f"{p}.json").read_text())
        for p in ("chain", "damped", "real")
        if (out / f"{p}.json").exists()
    }
    lines = ["# Evidence tables (generated by `python -m benchmarks.evidence.run`)", ""]
    for name, r in parts.items():
        lines += [f"`{r.get('command', '')}`: {r.get('wall_s', '')} s on {r.get('machine', {})}", ""]
        lines += {"chain": chain_tables, "damped": damped_tables, "real": real_tables}[name](r)
    (out / "tables.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return [out / "tables.md", *plots.write_plots(parts, out)]

"""Tables (``tables.md``) and plots (``*.png``) of the evidence JSONs in one directory.

Each part's JSON (``chain.json``, ``damped.json``, ``real.json``) becomes a section of ``tables.md`` and one
or two plots; a missing part is left out. Numbers are printed as measured.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

CHAIN_ROWS = (
    ("before", "converted, before training"),
    ("rds_identity", "RDS, identity gate"),
    ("rds_official", "RDS, official gate init"),
    ("rds_analysis_split", "RDS, the analysis' split"),
    ("plain", "plain fine-tune, same compute"),
)
PLOTS = ("chain_accuracy.png", "chain_exit.png", "damped.png", "real.png")


def _f(x: float, digits: int = 2) -> str:
    return f"{x:.{digits}f}"


def _depth_row(label: str, values: dict, extra: list[str]) -> str:
    return "| " + " | ".join([label, *(_f(values[d]) for d in sorted(values, key=int)), *extra]) + " |"


def chain_tables(r: dict) -> list[str]:
    """Accuracy per depth x K, the early-exit curves and the analysis line of the depth task."""
    depths = sorted(r["chance"], key=int)
    head = "| row | K | " + " | ".join(f"d{d}" for d in depths) + " | updates | compute units | wall s |"
    lines = [
        "## Depth task: accuracy per depth (held-out programs)",
        "",
        head,
        "|" + "---|" * (len(depths) + 5),
    ]
    lines.append(_depth_row("chance", r["chance"], [""] * 3).replace("| chance |", "| chance | - |", 1))
    lines.append(_depth_row("majority shortcut", r["majority"], [""] * 3).replace(" |", " | - |", 1))
    lines.append(_depth_row("pretrained base", r["base_acc"], [""] * 3).replace(" |", " | 1 |", 1))
    for key, label in CHAIN_ROWS:
        if key not in r:
            continue
        row, train = r[key], r[key].get("train", {})
        extra = [
            str(train.get("updates", "")),
            f"{train['units']:.3g}" if train else "",
            _f(train["wall_s"], 0) if train else "",
        ]
        for k, acc in row["acc"].items():
            name = f"{label} ({row['split']})"
            lines.append(_depth_row(name, acc, extra).replace(" |", f" | {k} |", 1))
            extra = [""] * 3
    a = r["analysis"]
    lines += [
        "",
        f"`loopus analyze` on the pretrained model recommends **{a['split']}** ({a['confidence']} "
        f"confidence): {a['reason']}",
        "",
    ]
    for key in ("rds_identity", "rds_official", "rds_analysis_split"):
        if key in r and "exit" in r[key]:
            lines += exit_table(r[key], depths, CHAIN_ROWS_DICT[key])
    return lines


CHAIN_ROWS_DICT = dict(CHAIN_ROWS)


def exit_table(row: dict, depths: list[str], label: str) -> list[str]:
    """Early exit of one RDS row: per tau accuracy and mean loops per depth, passes saved against K=8."""
    fixed = row["acc"][max(row["acc"], key=int)]
    lines = [
        f"### Early exit, {label} ({row['split']}): stop at the first pass with sigmoid(q) > tau, at most 8",
        "",
        "| tau | "
        + " | ".join(f"d{d} acc / loops" for d in depths)
        + " | mean loops | passes saved vs K=8 | mean acc change vs K=8 |",
        "|" + "---|" * (len(depths) + 4),
    ]
    for e in row["exit"]:
        cells = [f"{_f(e['acc'][d])} / {_f(e['loops'][d])}" for d in depths]
        change = sum(e["acc"][d] - fixed[d] for d in depths) / len(depths)
        lines.append(
            f"| {e['tau']} | "
            + " | ".join(cells)
            + f" | {_f(e['mean_loops'])} | {e['saved']:.0%} | {change:+.3f} |"
        )
    c = row["exit_check"]
    lines += [
        "",
        f"Check: the model's own threshold exit (tau {c['tau']}, depth {c['depth']}) uses "
        f"{_f(c['toolkit_mean_loops'])} loops on average; the offline rule above gives "
        f"{_f(c['offline_mean_loops'])}.",
        "",
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

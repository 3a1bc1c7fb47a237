"""Small PNG plots of the evidence (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def chain_accuracy(r: dict, path: Path) -> None:
    """Accuracy vs depth: the RDS row at each K, the plain fine-tune and the pretrained base."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=100)
    depths = sorted(r["chance"], key=int)
    x = [int(d) for d in depths]
    for k, acc in r["rds_identity"]["acc"].items():
        ax.plot(x, [acc[d] for d in depths], marker="o", label=f"RDS K={k}")
    if "rds_official" in r:
        off = r["rds_official"]["acc"]["2"]
        ax.plot(x, [off[d] for d in depths], "-.", marker="^", color="purple", label="RDS official gate K=2")
    ax.plot(x, [r["plain"]["acc"]["1"][d] for d in depths], "k--", marker="s", label="plain, same compute")
    ax.plot(x, [r["base_acc"][d] for d in depths], ":", color="gray", label="pretrained base")
    ax.plot(x, [r["chance"][d] for d in depths], color="lightgray", label="chance")
    ax.set(xlabel="hop depth", ylabel="accuracy (held-out)", ylim=(0, 1.02), title="Depth task")
    ax.legend(fontsize=7)
    _save(plt, fig, path)


def chain_exit(r: dict, path: Path) -> None:
    """Left: mean loops per depth at each tau. Right: mean accuracy vs passes saved (against K=8)."""
    plt = _figure()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.4), dpi=100)
    row = r["rds_identity"]
    depths = sorted(r["chance"], key=int)
    for e in row["exit"]:
        a1.plot(
            [int(d) for d in depths], [e["loops"][d] for d in depths], marker=".", label=f"tau {e['tau']}"
        )
    a1.set(xlabel="hop depth", ylabel="mean loops", title="Loops spent")
    a1.legend(fontsize=6)
    for key, color in (("rds_identity", "C0"), ("rds_official", "purple")):
        if key not in r:
            continue
        exits = r[key]["exit"]
        mean_acc = [sum(e["acc"].values()) / len(e["acc"]) for e in exits]
        a2.plot([e["saved"] for e in exits], mean_acc, marker="o", color=color, label=f"{key} exit (tau)")
        for k, ls in (("2", ":"), ("8", "--")):
            acc = r[key]["acc"][k]
            a2.axhline(sum(acc.values()) / len(acc), ls=ls, lw=0.8, color=color, label=f"{key} K={k}")
    a2.legend(fontsize=6)
    a2.set(xlabel="passes saved vs K=8", ylabel="mean accuracy over depths", title="Early exit")
    _save(plt, fig, path)


def damped(r: dict, path: Path) -> None:
    """Perplexity vs K per a, one panel per split, the base as a line."""
    plt = _figure()
    splits = list(r["splits"].items())
    fig, axes = plt.subplots(1, len(splits), figsize=(4 * len(splits), 3.2), dpi=100, squeeze=False)
    for ax, (name, s) in zip(axes[0], splits, strict=True):
        for a, per in s["ppl"].items():
            ks = sorted(per, key=int)
            ax.plot([int(k) for k in ks], [per[k] for k in ks], marker="o", label=f"a={a}")
        ax.axhline(r["base_ppl"], color="k", ls="--", lw=0.8, label="base")
        ax.set(xlabel="K", ylabel="held-out perplexity", title=f"damped loop, split {name}", yscale="log")
        ax.legend(fontsize=7)
    _save(plt, fig, path)


def real(r: dict, path: Path) -> None:
    """Held-out perplexity vs K per real-model row."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=100)
    for name, row in r["rows"].items():
        ks = sorted(row["ppl"], key=int)
        style = {"marker": "o"} if len(ks) > 1 else {"marker": "s", "ls": "none"}
        ax.plot([int(k) for k in ks], [row["ppl"][k] for k in ks], label=f"{name} ({row['split']})", **style)
    ax.set(xlabel="K", ylabel="held-out perplexity", yscale="log", title="Real model (tiny budget)")
    ax.legend(fontsize=7)
    _save(plt, fig, path)


def write_plots(parts: dict, out: Path) -> list[Path]:
    """Every plot whose part is present; returns the paths."""
    todo = []
    if "chain" in parts:
        todo += [
            (chain_accuracy, parts["chain"], "chain_accuracy.png"),
            (chain_exit, parts["chain"], "chain_exit.png"),
        ]
    if "damped" in parts:
        todo.append((damped, parts["damped"], "damped.png"))
    if "real" in parts:
        todo.append((real, parts["real"], "real.png"))
    written = []
    for fn, r, name in todo:
        fn(r, out / name)
        written.append(out / name)
    return written

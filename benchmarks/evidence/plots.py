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


def _chosen_rows(r: dict) -> dict[str, dict]:
    """The test rows to plot: each gate at every K (chosen gate) or its best K, and the chosen plain lrs."""
    ch, rows = r["choices"], r["summary"]["rows"]
    out = {}
    for row in rows:
        if row["arm"] == f"rds_{ch['gate']}" and row["k"] in ("1", str(ch["best_k"][ch["gate"]]), "8"):
            out[f"RDS {ch['gate']} K={row['k']}"] = row
        elif row["arm"].startswith("rds_") and row["chosen"] is False and row["arm"] != f"rds_{ch['gate']}":
            if row["k"] == str(ch["best_k"][row["arm"][4:]]):
                out[f"RDS {row['arm'][4:]} K={row['k']} (not chosen)"] = row
        elif row["arm"].startswith("plain_") and row["chosen"]:
            out["plain, equal " + row["arm"].split("_")[1]] = row
    return out


def chain_accuracy(r: dict, path: Path) -> None:
    """Test accuracy vs depth (means and 95% intervals over seeds): the looped arms, plain, base, chance."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=100)
    base = r["test_baselines"]
    depths = sorted(base["chance"], key=int)
    x = [int(d) for d in depths]
    for i, (label, row) in enumerate(_chosen_rows(r).items()):
        mean = [row["acc"][d]["mean"] for d in depths]
        err = [[m - row["acc"][d]["lo"] for m, d in zip(mean, depths, strict=True)],
               [row["acc"][d]["hi"] - m for m, d in zip(mean, depths, strict=True)]]
        style = "--" if label.startswith("plain") else "-"
        ax.errorbar([v + 0.04 * i for v in x], mean, yerr=err, ls=style, marker="o", ms=3, capsize=2,
                    label=label)
    ax.plot(x, [base["base_acc"][d] for d in depths], ":", color="gray", label="pretrained base")
    ax.plot(x, [base["chance"][d] for d in depths], color="lightgray", label="chance")
    ax.axvspan(3.5, 5.5, color="C0", alpha=0.06, label="fine-tuned only")
    ax.axvspan(5.5, max(x) + 0.5, color="C3", alpha=0.06, label="never trained")
    ax.set(xlabel="hop depth", ylabel="test accuracy", ylim=(0, 1.02), title="Depth task (95% CI over seeds)")
    ax.legend(fontsize=6)
    _save(plt, fig, path)


def chain_exit(r: dict, path: Path) -> None:
    """Left: mean loops per depth at the chosen tau (test, 95% CI). Right: every tau, accuracy vs loops."""
    plt = _figure()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.4), dpi=100)
    e = r["summary"]["exit"]
    depths = sorted(e["loops"], key=int)
    mean = [e["loops"][d]["mean"] for d in depths]
    err = [[m - e["loops"][d]["lo"] for m, d in zip(mean, depths, strict=True)],
           [e["loops"][d]["hi"] - m for m, d in zip(mean, depths, strict=True)]]
    a1.errorbar([int(d) for d in depths], mean, yerr=err, marker="o", capsize=2)
    a1.set(xlabel="hop depth", ylabel="mean loops", title=f"Loops spent (tau {e['tau']}, chosen on val)")
    taus = e["all_taus"]
    a2.plot([t["mean_loops"] for t in taus], [t["mean_acc"] for t in taus], marker="o", label="exit, per tau")
    for t in taus:
        a2.annotate(str(t["tau"]), (t["mean_loops"], t["mean_acc"]), fontsize=6)
    looped = [row for row in r["summary"]["rows"] if row["arm"] == r["summary"]["looped"]]
    a2.plot([int(row["k"]) for row in looped], [row["acc"]["mean"]["mean"] for row in looped], "s--",
            label="fixed K")
    a2.set(xlabel="mean loops", ylabel="mean test accuracy over depths", title="Early exit vs fixed K")
    a2.legend(fontsize=6)
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

"""The depth task's choices, made on validation (fixed rules), and the test summary over seeds.

Rules (``RULES``, written into ``choices.json``): a score is the mean over seeds of the mean accuracy over
every evaluated depth (0-7), on the validation split.

- best K of each RDS gate init: the K of 1, 2, 4, 8 with the highest score;
- gate init: the one whose best K scores highest;
- early exit (the toolkit's ``threshold`` strategy, at most 8 passes) of the chosen gate: of the taus whose
  score is at least the chosen gate's best-K score minus ``EXIT_TOLERANCE``, the one with the fewest mean
  loops (over depths and seeds); if none, the tau with the highest score;
- the plain baseline's learning rate, per budget (equal compute, equal tokens): the highest score.

Every cell of the test summary is a mean over seeds with a 95% t-interval; differences between arms are
paired by seed. The endpoint fixed before the runs: the mean test accuracy over the never-trained depths
(beyond every fine-tuned depth) of the chosen looped model at its best K, minus each plain baseline at its
chosen lr (and minus its own K = 1), paired by seed.
"""

from __future__ import annotations

from benchmarks.evidence.stats import mean_ci, paired

LOOPS = (1, 2, 4, 8)
TAUS = (0.5, 0.6, 0.8, 0.9, 0.95, 0.97, 0.99)
EXIT_TOLERANCE = 0.01
RULES = (
    "score = mean over seeds of the mean validation accuracy over depths; best K per gate = highest score; "
    f"gate = highest best-K score; tau = fewest mean loops among taus scoring >= best-K score - "
    f"{EXIT_TOLERANCE} (else the highest score); plain lr per budget = highest score"
)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def by_arm(records: list[dict]) -> dict[str, dict[int, dict]]:
    """name -> seed -> record."""
    out: dict[str, dict[int, dict]] = {}
    for r in records:
        out.setdefault(r["name"], {})[r["seed"]] = r
    return out


def score(runs: dict[int, dict], split: str, k: int) -> float:
    """Mean over seeds of the mean accuracy over depths at K = ``k``."""
    return _mean(_mean(r[split]["acc"][str(k)].values()) for r in runs.values())


def exit_scores(runs: dict[int, dict], split: str) -> dict[float, tuple[float, float]]:
    """tau -> (score, mean loops) of the exit curves, averaged over seeds."""
    out = {}
    for i, tau in enumerate(TAUS):
        rows = [r[split]["exit"][i] for r in runs.values()]
        out[tau] = (_mean(_mean(e["acc"].values()) for e in rows), _mean(e["mean_loops"] for e in rows))
    return out


def choose(records: list[dict], s) -> dict:
    """The frozen choices from the validation numbers of ``records`` (see the module docstring)."""
    arms = by_arm(records)
    best_k = {g: max(LOOPS, key=lambda k, g=g: score(arms[f"rds_{g}"], "val", k)) for g in s.gates}
    gate = max(s.gates, key=lambda g: score(arms[f"rds_{g}"], "val", best_k[g]))
    target = score(arms[f"rds_{gate}"], "val", best_k[gate]) - EXIT_TOLERANCE
    curve = exit_scores(arms[f"rds_{gate}"], "val")
    ok = [tau for tau, (acc, _) in curve.items() if acc >= target]
    tau = min(ok, key=lambda t: curve[t][1]) if ok else max(curve, key=lambda t: curve[t][0])
    plain_lr = {
        budget: max(s.plain_lrs, key=lambda lr, b=budget: score(arms[f"plain_{b}_lr{lr:g}"], "val", 1))
        for budget in ("compute", "tokens")
    }
    scores = {
        name: {str(k): score(runs, "val", k) for k in map(int, next(iter(runs.values()))["val"]["acc"])}
        for name, runs in arms.items()
    }
    return {
        "rules": RULES,
        "best_k": best_k,
        "gate": gate,
        "exit": {"strategy": "threshold", "tau": tau, "val_curve": {str(t): v for t, v in curve.items()}},
        "plain_lr": plain_lr,
        "val_scores": scores,
        "seeds": sorted({r["seed"] for r in records}),
    }


def cells(runs: dict[int, dict], k: str) -> dict:
    """Per depth and over depths ("mean"): the test accuracy at K = ``k`` as :func:`mean_ci` over seeds."""
    depths = list(next(iter(runs.values()))["test"]["acc"][k])
    out = {d: mean_ci([r["test"]["acc"][k][d] for r in runs.values()]) for d in depths}
    out["mean"] = mean_ci([_mean(r["test"]["acc"][k].values()) for r in runs.values()])
    return out


def _per_seed(runs: dict[int, dict], k: str, d: str | None) -> dict[int, float]:
    if d is None:
        return {s: _mean(r["test"]["acc"][k].values()) for s, r in runs.items()}
    return {s: r["test"]["acc"][k][d] for s, r in runs.items()}


def summarise(records: list[dict], choices: dict, s) -> dict:
    """The test tables: rows (arm, K, chosen or not) of :func:`cells`, the chosen early exit, and paired
    differences of the chosen looped model against each plain baseline and against its own K = 1."""
    arms = by_arm(records)
    rows = []
    for name, runs in arms.items():
        first = next(iter(runs.values()))
        for k in first["test"]["acc"]:
            chosen = _is_chosen(first, int(k), choices)
            rows.append({"arm": name, "k": k, "chosen": chosen, "acc": cells(runs, k), **_cost(runs)})
    gate, best = choices["gate"], str(choices["best_k"][choices["gate"]])
    looped = arms[f"rds_{gate}"]
    depths = list(next(iter(looped.values()))["test"]["acc"][best]) + [None]
    against = {f"plain_{b}": arms[f"plain_{b}_lr{choices['plain_lr'][b]:g}"] for b in ("compute", "tokens")}
    against["own K=1"] = {seed: r for seed, r in looped.items()}
    diffs = {
        label: {d or "mean": paired(_per_seed(looped, best, d), _per_seed(other, "1", d)) for d in depths}
        for label, other in against.items()
    }
    never = [d for d in depths if d is not None and int(d) > max(s.depths)]
    endpoint = {
        label: paired(_mean_over(looped, best, never), _mean_over(other, "1", never))
        for label, other in against.items()
    }
    return {
        "rows": rows,
        "exit": exit_summary(looped, choices),
        "paired": diffs,
        "looped": f"rds_{gate}",
        "endpoint": {"depths": never, **endpoint},
    }


def _mean_over(runs: dict[int, dict], k: str, depths: list[str]) -> dict[int, float]:
    """Per seed, the mean test accuracy over ``depths`` at K = ``k``."""
    return {seed: _mean(r["test"]["acc"][k][d] for d in depths) for seed, r in runs.items()}


def _is_chosen(record: dict, k: int, choices: dict) -> bool:
    if record["mode"] == "rds":
        return record["gate"] == choices["gate"] and k == choices["best_k"][record["gate"]]
    return record["lr"] == choices["plain_lr"][record["budget"]]


def _cost(runs: dict[int, dict]) -> dict:
    return {
        "updates": _mean(r["steps"] for r in runs.values()),
        "units": _mean(r["units"] for r in runs.values()),
        "tokens": _mean(r["tokens"] for r in runs.values()),
        "wall_s": _mean(r["wall_s"] for r in runs.values()),
    }


def exit_summary(looped: dict[int, dict], choices: dict) -> dict:
    """The chosen tau on test: accuracy and mean loops per depth, each over seeds; every tau's means."""
    tau = choices["exit"]["tau"]
    i = TAUS.index(tau)
    rows = [r["test"]["exit"][i] for r in looped.values()]
    depths = list(rows[0]["acc"])
    out = {
        "tau": tau,
        "acc": {d: mean_ci([e["acc"][d] for e in rows]) for d in depths},
        "loops": {d: mean_ci([e["loops"][d] for e in rows]) for d in depths},
        "mean_acc": mean_ci([_mean(e["acc"].values()) for e in rows]),
        "mean_loops": mean_ci([e["mean_loops"] for e in rows]),
    }
    out["all_taus"] = [
        {
            "tau": t,
            "mean_acc": _mean(_mean(r["test"]["exit"][j]["acc"].values()) for r in looped.values()),
            "mean_loops": _mean(r["test"]["exit"][j]["mean_loops"] for r in looped.values()),
            "chosen": t == tau,
        }
        for j, t in enumerate(TAUS)
    ]
    return out

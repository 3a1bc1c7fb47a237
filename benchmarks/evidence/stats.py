"""Means over seeds with 95% t-intervals, and differences between arms paired by seed."""

from __future__ import annotations

import math


def t_quantile(df: int, level: float = 0.95) -> float:
    """The two-sided Student-t quantile for ``df`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, df))


def mean_ci(values: list[float], level: float = 0.95) -> dict:
    """{mean, lo, hi, n}: the mean of ``values`` and its t-interval (lo = hi = mean for one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "lo": mean, "hi": mean, "n": n}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(n - 1, level) * sd / math.sqrt(n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n}


def paired(a: dict[int, float], b: dict[int, float]) -> dict:
    """``a - b`` over the seeds both have (seed -> value), as :func:`mean_ci`, with the seeds."""
    seeds = sorted(set(a) & set(b))
    return {**mean_ci([a[s] - b[s] for s in seeds]), "seeds": seeds}

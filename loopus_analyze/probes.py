"""Linear probes per state for label-free targets, with Hewitt-Liang control tasks.

Targets for a token at position t of a window (all read from the input ids, no annotation needed):

- ``current``: its own token id, ``previous``: the id at t-1, ``next``: the id at t+1 (tokens without a
  next real token are left out of this task). Ids outside the ``top_k`` most frequent ids of the probe
  sample share one class "other".
- ``position``: the bucket of t among ``position_buckets`` equal-width buckets of 1..T-1.

Control task (Hewitt & Liang 2019): every token TYPE (current id) gets a random label drawn from the
task's empirical label distribution; the probe must memorise it per type, which it cannot do for types
that it never saw in training. ``selectivity = accuracy - control accuracy``.

Probe: standardised features (train mean and std per state), scikit-learn multinomial logistic regression
with a fixed ``C`` at every state, train/test split by DOCUMENT (no n-gram leakage between the two).

Each target (a task or its control) is fitted along depth, state 0 to L, every fit starting from the
previous state's solution (``warm_start``): neighbouring residual states differ little, so L-BFGS stops
sooner (all fits together take 1.87x less time on the embedded model). The objective of each fit is its own
state's alone (convex, one optimum); the accuracies agree with cold starts within 0.007, four test tokens
(benchmarks/README.md, the probes). The 8 targets' chains run on threads.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import torch

log = logging.getLogger(__name__)

TASKS = ("current", "previous", "next", "position")


class ProbeSample:
    """A bounded sample of token states and their targets, filled batch by batch.

    ``add`` takes the states of the selected tokens (S, m, D) with their labels; the sample keeps at most
    ``capacity`` tokens (float16 features: 2·S·capacity·D bytes).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.features: list[torch.Tensor] = []
        self.labels: dict[str, list[np.ndarray]] = {k: [] for k in (*TASKS, "doc")}
        self.size = 0

    def add(self, h: torch.Tensor, labels: dict[str, np.ndarray]) -> None:
        """Add states (S, m, D) and per-token labels (``current``, ``previous``, ``next`` (-1 = none),
        ``position`` (int), ``doc``), truncated to the remaining capacity."""
        room = self.capacity - self.size
        if room <= 0:
            return
        m = min(room, h.shape[1])
        self.features.append(h[:, :m].to(torch.float16))
        for key in self.labels:
            self.labels[key].append(np.asarray(labels[key][:m]))
        self.size += m

    def arrays(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(S, N, D) float32 features and the label arrays (N,)."""
        feats = torch.cat(self.features, dim=1).float().numpy()
        return feats, {k: np.concatenate(v) for k, v in self.labels.items()}


def _frequent_classes(ids: np.ndarray, top_k: int) -> np.ndarray:
    """Map ids to class indices 0..k-1 for the top_k most frequent ids, k for "other"."""
    values, counts = np.unique(ids, return_counts=True)
    keep = values[np.argsort(-counts, kind="stable")[:top_k]]
    table = {int(v): i for i, v in enumerate(keep)}
    return np.array([table.get(int(v), len(keep)) for v in ids], dtype=np.int64)


def _control_labels(types: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Hewitt-Liang control: one random label per token type, drawn from the empirical label distribution."""
    uniq = np.unique(types)
    drawn = rng.choice(labels, size=len(uniq), replace=True)
    table = dict(zip(uniq.tolist(), drawn.tolist(), strict=True))
    return np.array([table[int(t)] for t in types], dtype=np.int64)


def document_split(docs: np.ndarray, test_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean test mask: a random ``test_fraction`` of the distinct documents (at least one, not all)."""
    uniq = np.unique(docs)
    if len(uniq) < 2:
        log.warning("probes: the sample holds one document; splitting its tokens in halves instead")
        mask = np.zeros(len(docs), dtype=bool)
        mask[len(docs) // 2:] = True
        return mask
    count = min(len(uniq) - 1, max(1, round(test_fraction * len(uniq))))
    test_docs = rng.choice(uniq, size=count, replace=False)
    return np.isin(docs, test_docs)


def probe_chain(features: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray, *, c: float,
                max_iter: int) -> np.ndarray:
    """(S,) test accuracy of a multinomial logistic regression on each state of ``features`` (S, N, D),
    standardised with the train rows' statistics, fitted state by state from the previous state's solution.

    ``y`` (N,) labels; ``train`` / ``test`` (N,) boolean rows. Convergence warnings are the caller's to
    silence (:func:`run_probes` does, in its own thread).
    """
    from sklearn.linear_model import LogisticRegression

    y_train, y_test = y[train], y[test]
    if len(np.unique(y_train)) < 2:  # one class only: the probe predicts it
        return np.full(features.shape[0], float(np.mean(y_test == y_train[0])) if len(y_test) else 0.0)
    probe = LogisticRegression(C=c, max_iter=max_iter, warm_start=True)
    scores = np.zeros(features.shape[0])
    for s, x in enumerate(features):
        x_train = x[train]
        mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-6
        probe.fit((x_train - mean) / std, y_train)
        scores[s] = probe.score((x[test] - mean) / std, y_test)
    return scores


def run_probes(features: np.ndarray, labels: dict[str, np.ndarray], *, seed: int = 0, top_k: int = 32,
               position_buckets: int = 4, seq_len: int | None = None, c: float = 0.1, max_iter: int = 100,
               test_fraction: float = 0.25) -> dict[str, dict[str, np.ndarray]]:
    """Probe accuracy, control accuracy and selectivity per state for every task.

    ``features`` (S, N, D); ``labels`` holds ``current``, ``previous``, ``next`` (-1: no next token),
    ``position`` and ``doc`` arrays of length N. Returns ``{task: {"accuracy", "control", "selectivity"}}``
    with (S,) arrays. The split by document and the control labels are drawn once from ``seed`` and shared
    by all states, so the curves over depth are comparable.
    """
    rng = np.random.default_rng(seed)
    test = document_split(labels["doc"], test_fraction, rng)
    max_pos = seq_len - 1 if seq_len else max(int(labels["position"].max()), 1)
    bucket = np.minimum((labels["position"] - 1) * position_buckets // max(max_pos, 1), position_buckets - 1)
    targets = {
        "current": (_frequent_classes(labels["current"], top_k), np.ones(len(test), dtype=bool)),
        "previous": (_frequent_classes(labels["previous"], top_k), np.ones(len(test), dtype=bool)),
        "next": (_frequent_classes(labels["next"], top_k), labels["next"] >= 0),
        "position": (bucket.astype(np.int64), np.ones(len(test), dtype=bool)),
    }
    chains = []  # (task, "accuracy" | "control", labels, train rows, test rows)
    for task, (y, valid) in targets.items():
        control = _control_labels(labels["current"], y, rng)
        chains += [(task, kind, target, valid & ~test, valid & test)
                   for kind, target in (("accuracy", y), ("control", control))]
    scores = _fit_all(features, [chain[2:] for chain in chains], c=c, max_iter=max_iter)
    out = {task: {} for task in targets}
    for (task, kind, *_), accuracy in zip(chains, scores, strict=True):
        out[task][kind] = accuracy
    for values in out.values():
        values["selectivity"] = values["accuracy"] - values["control"]
    return out


def _fit_all(features: np.ndarray, chains: list[tuple], *, c: float, max_iter: int) -> list[np.ndarray]:
    """:func:`probe_chain` of every ``(labels, train rows, test rows)``, in order, on as many threads as torch
    uses (each fit holds one BLAS thread: these fits are small, and multi-threaded BLAS under a busy CPU is
    10-30x slower). The chains are independent, so the results do not depend on the thread count."""
    from joblib import Parallel, delayed
    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    jobs = max(1, min(torch.get_num_threads(), len(chains)))
    # The filter is set here, in the calling thread: the warnings filters are global to the process, and
    # a fit thread's own catch_warnings, restored while another fit runs, would let that one's warning out.
    with threadpool_limits(limits=1, user_api="blas"), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fit = delayed(probe_chain)
        return Parallel(n_jobs=jobs, prefer="threads")(
            fit(features, y, train, test, c=c, max_iter=max_iter) for y, train, test in chains)

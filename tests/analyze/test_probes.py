"""Linear probes with Hewitt-Liang controls on constructed features with known answers."""

from __future__ import annotations

import numpy as np

from loopus_analyze.probes import _control_labels, document_split, run_probes


def _synthetic(seed: int = 0, tokens: int = 1200, vocab: int = 600, dim: int = 32):
    rng = np.random.default_rng(seed)
    embed = rng.normal(size=(vocab, dim))
    # half the tokens from 12 frequent types, half from many rare ones (mostly unseen in training)
    ids = np.where(rng.random(tokens + 2) < 0.5, rng.integers(0, 12, tokens + 2),
                   rng.integers(12, vocab, tokens + 2))
    current, previous, nxt = ids[1:-1], ids[:-2], ids[2:]
    position = rng.integers(1, 32, size=tokens)
    docs = np.repeat(np.arange(tokens // 20), 20)
    # state 0 encodes the current token, state 1 the previous one, state 2 is noise
    feats = np.stack([embed[current], embed[previous], rng.normal(size=(tokens, dim))]).astype(np.float32)
    labels = {"current": current, "previous": previous, "next": nxt, "position": position, "doc": docs}
    return feats, labels


def test_probes_find_what_each_state_encodes():
    feats, labels = _synthetic()
    out = run_probes(feats, labels, seed=0, top_k=16, seq_len=32, max_iter=200)
    assert set(out) == {"current", "previous", "next", "position"}
    cur, prev = out["current"], out["previous"]
    assert cur["accuracy"][0] > 0.9 and prev["accuracy"][1] > 0.9
    assert cur["accuracy"][2] < 0.6 and cur["accuracy"][0] > cur["accuracy"][1] + 0.3
    assert cur["control"][0] < cur["accuracy"][0] - 0.05  # unseen types cannot be memorised
    assert np.allclose(cur["selectivity"], cur["accuracy"] - cur["control"])
    assert out["position"]["accuracy"][0] < 0.5  # four buckets, no positional signal


def test_control_is_a_function_of_the_type():
    rng = np.random.default_rng(1)
    types = rng.integers(0, 20, size=500)
    labels = rng.integers(0, 5, size=500)
    control = _control_labels(types, labels, rng)
    for t in np.unique(types):
        assert len(np.unique(control[types == t])) == 1


def test_document_split_never_shares_a_document():
    rng = np.random.default_rng(2)
    docs = np.repeat(np.arange(12), 7)
    test = document_split(docs, 0.25, rng)
    assert set(docs[test]).isdisjoint(set(docs[~test]))
    assert 0 < test.sum() < len(docs)


def test_probes_do_not_depend_on_the_thread_count():
    """The fits run on as many threads as torch uses; each is independent, so 1 or 2 threads agree."""
    import torch

    feats, labels = _synthetic(seed=2, tokens=600)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(run_probes(feats, labels, seed=0, top_k=16, seq_len=32, max_iter=50))
    finally:
        torch.set_num_threads(before)
    for task, values in results[0].items():
        for kind, array in values.items():
            assert np.array_equal(array, results[1][task][kind]), (task, kind)
    assert results[0]["current"]["accuracy"][0] > 0.5  # the fits really ran


def test_fits_on_threads_do_not_let_convergence_warnings_out():
    """Fits that stop at ``max_iter`` say nothing, on two threads too, and leave the filters as they were
    (a fit thread's own filter, restored while another fit ran, once let the CLI print sklearn's warning)."""
    import warnings

    import torch

    feats, labels = _synthetic(seed=3, tokens=600)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            filters = list(warnings.filters)
            run_probes(np.concatenate([feats] * 4), labels, seed=0, top_k=16, seq_len=32, max_iter=1)
            assert warnings.filters == filters
    finally:
        torch.set_num_threads(before)
    assert not [w for w in caught if "converge" in str(w.message)]

"""The repeat-cost map: what running a loop block twice, or skipping it, does to the next-token predictions
of held-out text, for every valid split at once, from the base model's cached states.

Cross-state decoding
--------------------
With L decoder layers and the base states h_0..h_L of a batch (:mod:`loopus_analyze.hooks`), let
``run(s, x)`` be layers s..L-1 applied to x, then the final norm and the head. Then

- the base model is ``run(0, h_0)``;
- block ``A:B`` run twice (layers [0..B) + [A..B) + [B..L)): its first pass ends at the base state h_B, so
  the variant is ``run(A, h_B)``, which costs L - A layers plus the head;
- block ``A:B`` skipped (layers [0..A) + [B..L)) is ``run(B, h_A)``: L - B layers plus the head.

Both are entries of one grid ``G[j, s] = run(s, h_j)``: j > s runs layers s..j-1 twice, j < s skips layers
j..s-1. All inputs h_j of one starting layer s go through the same layers, so they are stacked along the
batch and run together (chunks of about ``max_tokens`` tokens). Deeper repetition continues from the
block's own output: pass k + 1 runs layers A..L-1 on the output r_k of layer B-1 in pass k (r_1 = h_B), so
every pass costs L - A layers plus the head and also yields the next pass's input. Pass 2 is the grid's
entry ``G[B, A]``; for a block in both, the deeper passes compute it and the grid takes it from there.

Per prediction (the token at t + 1 predicted at position t; position 0, the BOS / attention sink, and
padding masked out) a variant with next-token distribution q scores NLL = -log q(target),
KL(p_base || q) and top-1 agreement with the base model. Every prediction is used; the last position of a
batch is not run at all (it is only a target: nothing attends to it). The head (about 8
layers' worth of work per prediction on the embedded model) runs on the predictions of many variants at
once, ``HEAD_ROWS`` rows per matmul: one variant's few dozen rows would stream the whole (vocab, D) weight
from memory for little arithmetic. Sums are float64 per document, so that
:mod:`loopus_analyze.intervals` bootstraps over documents. Only one batch's states are alive at a time:
memory does not grow with the number of batches.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from loopus_analyze.corpus import TokenBatch
from loopus_analyze.hooks import StateHooks, run_layers
from loopus_analyze.lens import head_logits, head_stats
from loopus_analyze.similarity import valid_pairs
from loopus_core.models import ModelParts, model_parts
from loopus_core.progress import Progress, ensure

log = logging.getLogger(__name__)

MAX_TOKENS_PER_FORWARD = 4096  # stacked inputs per forward of the map (memory per forward, not per budget)
STACK_LOGITS = 2**25  # windows stacked into one batch while its positions x vocabulary stay within this
HEAD_ROWS = 512  # predictions per head matmul (lens.head_stats holds their logits a tile at a time)
DEEP_PASSES = 4  # deeper repetition: the block run up to this many times
METRICS = ("nll", "kl", "agree")


def repeat_indices(num_layers: int, start: int, end: int, passes: int = 2) -> list[int]:
    """Layer order running the block ``start:end`` ``passes`` times: ``[0..A) + [A..B) x passes + [B..L)``."""
    return list(range(0, start)) + list(range(start, end)) * passes + list(range(end, num_layers))


def skip_indices(num_layers: int, start: int, end: int) -> list[int]:
    """Layer order without the block ``start:end``: ``[0..start) + [end..L)``."""
    return list(range(0, start)) + list(range(end, num_layers))


def map_entries(num_layers: int, blocks: Iterable[tuple[int, int]] | None = None) -> list[tuple[int, int]]:
    """Grid entries ``(j, s)`` for running twice and skipping each block (default: every valid split).

    Block ``A:B`` run twice is ``(B, A)``, skipped ``(A, B)``.
    """
    pairs = valid_pairs(num_layers).tolist() if blocks is None else [list(b) for b in blocks]
    entries = {(b, a) for a, b in pairs} | {(a, b) for a, b in pairs}
    return sorted(entries, key=lambda e: (e[1], e[0]))


@dataclass(frozen=True)
class Sample:
    """Which of a window's predictions past the warm-up are scored: every ``stride``-th (from the first),
    or with ``rest`` the others, so that a window read once sampled and once for the rest has had every
    prediction scored exactly once."""

    stride: int = 1
    rest: bool = False

    def keep(self, positions: torch.Tensor, first: int) -> torch.Tensor:
        picked = (positions - first) % self.stride == 0
        return ~picked if self.rest else picked

    def others(self) -> Sample:
        """The predictions this sample leaves out."""
        return Sample(self.stride, not self.rest)


EVERY = Sample()  # every prediction


def prediction_mask(attention_mask: torch.Tensor, warmup: int = 0, sample: Sample = EVERY) -> torch.Tensor:
    """(B, T-1) bool: the prediction at position t (of token t+1) counts iff t >= max(1, warmup), token
    t+1 is real and ``sample`` keeps t (position 0 is the BOS / attention sink; the first ``warmup``
    positions have too little context to stand for the contexts a looped model runs on)."""
    valid = attention_mask[:, 1:].bool().clone()  # target t+1 is real (right padding: so is t)
    first = max(1, warmup)
    valid[:, :first] = False
    if sample != EVERY:
        valid &= sample.keep(torch.arange(valid.shape[1], device=valid.device), first)
    return valid


@dataclass
class MapSums:
    """float64 sums per document over the predictions of one held-out text (see the module docstring).

    ``nll``, ``kl``, ``agree`` are (documents, L+1, L+1), indexed ``[d, j, s]`` for ``G[j, s]``; entries
    that were not measured are 0 and ``measured[j, s]`` is False. Entries may be measured on different
    batches (the race gives its survivors more): ``entry_count`` and ``entry_base`` hold, per entry, the
    predictions it was scored on and the base model's NLL sum over them; ``count`` and ``base_nll`` are
    those of every batch the map saw.
    """

    num_layers: int
    documents: np.ndarray  # (D,) document ids, as in the batches
    count: np.ndarray  # (D,) predictions
    base_nll: np.ndarray  # (D,)
    nll: np.ndarray
    kl: np.ndarray
    agree: np.ndarray
    measured: np.ndarray  # (L+1, L+1) bool
    entry_count: np.ndarray  # (D, L+1, L+1) predictions per entry
    entry_base: np.ndarray  # (D, L+1, L+1) base NLL sum over an entry's predictions

    @property
    def tokens(self) -> int:
        return int(self.count.sum())

    def entry_tokens(self) -> np.ndarray:
        """(L+1, L+1) predictions each entry was scored on."""
        return self.entry_count.sum(axis=0)

    def grid(self, metric: str) -> np.ndarray:
        """(L+1, L+1) means over each entry's predictions: ``delta_nll`` (variant - base NLL), ``nll``,
        ``kl``, ``agree``; NaN where not measured."""
        total = np.maximum(self.entry_count.sum(axis=0), 1.0)
        if metric == "delta_nll":
            values = (self.nll.sum(axis=0) - self.entry_base.sum(axis=0)) / total
        else:
            values = getattr(self, metric).sum(axis=0) / total
        return np.where(self.measured, values, np.nan)

    def add(self, other: MapSums) -> None:
        """Add the sums of ``other`` (same model, same document axis) into these."""
        if not np.array_equal(self.documents, other.documents):
            raise ValueError("maps over different documents cannot be added")
        for name in ("count", "base_nll", "nll", "kl", "agree", "entry_count", "entry_base"):
            getattr(self, name).__iadd__(getattr(other, name))
        self.measured |= other.measured

    def repeat(self, metric: str) -> np.ndarray:
        """(L+1, L+1) ``[A, B]``: the block ``A:B`` run twice (NaN unless A < B and measured)."""
        return _blocks_only(self.grid(metric).T)

    def skip(self, metric: str) -> np.ndarray:
        """(L+1, L+1) ``[A, B]``: the block ``A:B`` skipped (NaN unless A < B and measured)."""
        return _blocks_only(self.grid(metric))


def _blocks_only(grid: np.ndarray) -> np.ndarray:
    """``grid`` [A, B] with every entry that is not a block (A >= B) set to NaN."""
    upper = np.triu(np.ones(grid.shape, dtype=bool), k=1)
    return np.where(upper, grid, np.nan)


@dataclass
class PassSums:
    """float64 sums per document for blocks run 1..K times (k = 1 is the base model).

    ``nll``, ``kl``, ``agree``, ``change`` are (documents, blocks, K); ``change`` sums the relative change
    of the loop state ``|r_k - r_{k-1}| / |r_{k-1}|`` at the predicting positions (r_0 = h_A, r_1 = h_B),
    which shrinks when the block settles and grows when it drifts.
    """

    blocks: list[tuple[int, int]]
    documents: np.ndarray
    count: np.ndarray
    base_nll: np.ndarray
    nll: np.ndarray
    kl: np.ndarray
    agree: np.ndarray
    change: np.ndarray

    @property
    def passes(self) -> int:
        return self.nll.shape[-1]


@dataclass
class _Base:
    """One batch after the base forward: its states and the base model's predictions. Every position but
    the last is run: the last token is only a target (nothing attends to it, nothing is predicted from it)."""

    ids: torch.Tensor  # (B, T-1) the inputs: the batch's tokens without the last
    mask: torch.Tensor  # (B, T-1)
    valid: torch.Tensor  # (B, T-1) bool: the predictions that count
    doc: torch.Tensor  # (N,) document index of each prediction
    targets: torch.Tensor  # (N,)
    states: list[torch.Tensor]  # L+1 x (B, T-1, D)
    logp: torch.Tensor  # (N, V) base log-probabilities
    top: torch.Tensor  # (N,)
    prob: torch.Tensor  # (N, V) base probabilities
    neg_entropy: torch.Tensor  # (N,) sum_v p log p
    doc_count: np.ndarray  # (D,) predictions per document
    doc_base: np.ndarray  # (D,) base NLL sum per document


def _base_pass(parts: ModelParts, batch, device, doc_index: dict[int, int], warmup: int = 0,
               sample: Sample = EVERY) -> _Base | None:
    tokens = batch.input_ids.to(device)
    valid = prediction_mask(batch.attention_mask.to(device), warmup, sample)
    if not bool(valid.any()):
        return None
    ids, mask = tokens[:, :-1], batch.attention_mask.to(device)[:, :-1]
    hooks = StateHooks(parts.layers)
    try:
        normed = parts.backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    finally:
        hooks.remove()
    rows = valid.nonzero()[:, 0].cpu()
    doc = torch.tensor([doc_index[int(batch.doc_ids[r])] for r in rows], dtype=torch.long)
    logp = torch.log_softmax(head_logits(parts, normed[valid]), dim=-1)
    prob = logp.exp()
    targets = tokens[:, 1:][valid]
    docs = len(doc_index)
    counts = _per_doc(doc, torch.ones_like(targets, dtype=torch.float64), docs)
    base_nll = _per_doc(doc, -logp.gather(1, targets[:, None])[:, 0], docs)
    return _Base(ids, mask, valid, doc, targets, list(hooks.states), logp, logp.argmax(-1), prob,
                 torch.linalg.vecdot(prob, logp), counts, base_nll)


def _scores(parts: ModelParts, base: _Base, normed: torch.Tensor) -> dict[str, torch.Tensor]:
    """NLL, KL(p_base || q) and top-1 agreement (n, N) of n variants' final-normed outputs (n B, T, D),
    stacked along the batch as the base batch's B rows each."""
    rows, length = base.ids.shape
    picked = normed.view(-1, rows, length, normed.shape[-1])[:, base.valid]  # (n, N, D)
    variants, count = picked.shape[:2]
    scores = {metric: torch.empty(variants, count, device=picked.device) for metric in METRICS}
    step = max(1, HEAD_ROWS // max(count, 1))
    for first in range(0, variants, step):
        chunk = slice(first, first + step)
        head = head_stats(parts, picked[chunk], base.prob, base.targets)  # each (m, N)
        scores["nll"][chunk] = -head.log_q_target
        scores["kl"][chunk] = base.neg_entropy - head.p_log_q
        scores["agree"][chunk] = (head.top == base.top).float()
    return scores


def _per_doc(doc: torch.Tensor, values: torch.Tensor, docs: int) -> np.ndarray:
    return torch.bincount(doc, weights=values.double().cpu(), minlength=docs).numpy()


def documents_of(batches: Sequence) -> np.ndarray:
    if not batches:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.concatenate([np.asarray(b.doc_ids) for b in batches]))


def _groups(entries: Sequence[tuple[int, int]], per_forward: int) -> list[tuple[int, list[int]]]:
    """Chunks ``(s, [j, ...])`` of the entries: one forward each, at most ``per_forward`` inputs."""
    by_start: dict[int, list[int]] = {}
    for j, s in entries:
        by_start.setdefault(s, []).append(j)
    return [(s, js[i:i + per_forward]) for s, js in sorted(by_start.items())
            for i in range(0, len(js), per_forward)]


def _map_batch(parts: ModelParts, base: _Base, groups, sums: MapSums) -> None:
    """All grid entries of one batch: one forward per chunk of stacked inputs, then the head on them all."""
    num_layers = parts.num_layers
    docs = len(sums.documents)
    for s, js in groups:
        x = torch.cat([base.states[j] for j in js])  # (n B, T, D)
        normed, _ = run_layers(parts, base.ids.repeat(len(js), 1), base.mask.repeat(len(js), 1), x,
                               range(s, num_layers))
        scores = _scores(parts, base, normed)
        for i, j in enumerate(js):
            for metric in METRICS:
                getattr(sums, metric)[:, j, s] += _per_doc(base.doc, scores[metric][i], docs)
            _count_entry(sums, base, j, s)


def _count_entry(sums: MapSums, base: _Base, j: int, s: int) -> None:
    """Entry ``(j, s)`` was scored on this batch: its predictions and their base NLL, per document."""
    sums.entry_count[:, j, s] += base.doc_count
    sums.entry_base[:, j, s] += base.doc_base
    sums.measured[j, s] = True


def _relative_change(new: torch.Tensor, old: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """|new - old| / |old| (N,) at the predicting positions."""
    new, old = new[valid].float(), old[valid].float()
    return (new - old).norm(dim=-1) / old.norm(dim=-1).clamp_min(1e-30)


def _passes_batch(parts: ModelParts, base: _Base, sums: PassSums, grid: MapSums, shared: set) -> None:
    """Passes 1..K of every block of ``sums`` for one batch (pass k+1 runs layers A..L-1 on r_k). Pass 2 of
    a block is the grid's entry for running it twice: for the blocks in ``shared`` it is added to ``grid``
    too (and the grid does not compute it again)."""
    docs = len(sums.documents)
    ones = torch.ones_like(base.targets, dtype=torch.float32)
    base_nll = -base.logp.gather(1, base.targets[:, None]).squeeze(1)
    for b, (start, end) in enumerate(sums.blocks):
        first = {"nll": base_nll, "kl": torch.zeros_like(ones), "agree": ones}
        for metric in METRICS:
            getattr(sums, metric)[:, b, 0] += _per_doc(base.doc, first[metric], docs)
        previous, state = base.states[start], base.states[end]
        sums.change[:, b, 0] += _per_doc(base.doc, _relative_change(state, previous, base.valid), docs)
        for k in range(1, sums.passes):
            normed, output = run_layers(parts, base.ids, base.mask, state, range(start, parts.num_layers),
                                        keep=end - 1)
            scores = _scores(parts, base, normed)
            for metric in METRICS:
                values = _per_doc(base.doc, scores[metric][0], docs)
                getattr(sums, metric)[:, b, k] += values
                if k == 1 and (start, end) in shared:
                    getattr(grid, metric)[:, end, start] += values
            if k == 1 and (start, end) in shared:
                _count_entry(grid, base, end, start)
            sums.change[:, b, k] += _per_doc(base.doc, _relative_change(output, state, base.valid), docs)
            state = output


def stack_windows(batches: Sequence, vocabulary: int, limit: int = STACK_LOGITS) -> list:
    """Consecutive batches stacked into batches of several rows (right-padded), as many rows as keep
    positions x ``vocabulary`` within ``limit`` (the base pass holds log-probabilities of that size): an
    entry then runs on all their windows in one forward of larger matrices. The sums are the same."""
    out, group = [], []
    for batch in batches:
        rows = sum(b.input_ids.shape[0] for b in group) + batch.input_ids.shape[0]
        width = max(b.input_ids.shape[1] for b in [*group, batch])
        if group and rows * width * vocabulary > limit:
            out.append(_stack(group))
            group = []
        group.append(batch)
    if group:
        out.append(_stack(group))
    return out


def _stack(group: Sequence):
    if len(group) == 1:
        return group[0]
    width = max(b.input_ids.shape[1] for b in group)
    pad = [(0, width - b.input_ids.shape[1]) for b in group]
    ids = torch.cat([torch.nn.functional.pad(b.input_ids, p) for b, p in zip(group, pad, strict=True)])
    mask = torch.cat([torch.nn.functional.pad(b.attention_mask, p) for b, p in zip(group, pad, strict=True)])
    return TokenBatch(ids, mask, torch.cat([torch.as_tensor(b.doc_ids) for b in group]))


def empty_map(num_layers: int, documents: np.ndarray) -> MapSums:
    size = (len(documents), num_layers + 1, num_layers + 1)
    return MapSums(num_layers, documents, np.zeros(len(documents)), np.zeros(len(documents)), np.zeros(size),
                   np.zeros(size), np.zeros(size), np.zeros(size[1:], dtype=bool), np.zeros(size),
                   np.zeros(size))


def _empty_passes(blocks: Sequence[tuple[int, int]], passes: int, documents: np.ndarray) -> PassSums:
    size = (len(documents), len(blocks), passes)
    return PassSums([tuple(b) for b in blocks], documents, np.zeros(len(documents)), np.zeros(len(documents)),
                    np.zeros(size), np.zeros(size), np.zeros(size), np.zeros(size))


@torch.no_grad()
def measure_map(
    model: torch.nn.Module,
    batches: Sequence,
    *,
    entries: Sequence[tuple[int, int]] | None = None,
    deep_blocks: Sequence[tuple[int, int]] = (),
    passes: int = DEEP_PASSES,
    max_tokens: int = MAX_TOKENS_PER_FORWARD,
    progress: Progress | None = None,
    label: str = "repeat-cost map",
    documents: np.ndarray | None = None,
    warmup: int = 0,
    sample: Sample = EVERY,
) -> tuple[MapSums, PassSums]:
    """One streamed pass over held-out ``batches``: grid entries (default: run twice and skip for every
    valid split, :func:`map_entries`) and passes 1..``passes`` of each of ``deep_blocks`` (a deeper block's
    second pass is also its grid entry for running twice, computed once).

    ``batches`` are :class:`~loopus_analyze.corpus.TokenBatch`-like (``input_ids``, ``attention_mask``,
    ``doc_ids``), never the text the similarity was measured on. ``documents`` fixes the sums' document
    axis (default: the documents of ``batches``), so that maps of several calls can be added; predictions
    are scored from position ``max(1, warmup)`` on, those ``sample`` keeps (:func:`prediction_mask`).
    """
    parts = model_parts(model)
    device = next(model.parameters()).device
    entries = map_entries(parts.num_layers) if entries is None else list(entries)
    documents = documents_of(batches) if documents is None else np.asarray(documents)
    doc_index = {int(d): i for i, d in enumerate(documents)}
    sums = empty_map(parts.num_layers, documents)
    deep = _empty_passes(deep_blocks, passes, documents)
    listed = set(entries)
    shared = {tuple(b) for b in deep_blocks if (b[1], b[0]) in listed} if passes > 1 else set()
    grid_entries = [(j, s) for j, s in entries if (s, j) not in shared]  # those come from the deeper passes
    batches = stack_windows(batches, parts.lm_head.weight.shape[0])
    steps = 0
    for batch in batches:
        per_forward = max(1, max_tokens // batch.input_ids.numel())
        steps += len(_groups(grid_entries, per_forward)) + len(deep_blocks) * (passes - 1)
    log.info("%s: %d grid entries, %d deeper blocks on %d batches", label, len(entries), len(deep_blocks),
             len(batches))
    with ensure(progress).task(label, steps) as advance, torch.inference_mode():
        for batch in batches:
            groups = _groups(grid_entries, max(1, max_tokens // batch.input_ids.numel()))
            base = _base_pass(parts, batch, device, doc_index, warmup, sample)
            if base is None:
                advance(len(groups) + len(deep_blocks) * (passes - 1))
                continue
            for target in (sums, deep):
                target.count += base.doc_count
                target.base_nll += base.doc_base
            for group in groups:
                _map_batch(parts, base, [group], sums)
                advance(1)
            _passes_batch(parts, base, deep, sums, shared)
            advance(len(deep_blocks) * (passes - 1))
            del base
    return sums, deep

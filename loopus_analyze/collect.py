"""One streamed pass of the model over the probe batches, every per-layer measurement accumulated on the way.

States: L+1 per token, state 0 the input of layer 0, state i the output of layer i-1 before any final norm
(:mod:`loopus_analyze.hooks`). A layer split ``A:B`` (loop = layers A..B-1) covers states A..B.

Tokens: every measurement except the BOS diagnostics excludes each row's first position (BOS / attention
sink, with massive activations that fake similarity) and padding. Only one batch of states is alive at a
time; the accumulators are float64 and their size does not depend on the token budget (CKA keeps one
(L+1, L+1) matrix per batch for the bootstrap, the probe sample is bounded by ``max_probe_tokens``).

Views: CKA and drift are measured on the raw states and also on the states as the next layer reads them
and without the massive-activation channels (:mod:`loopus_analyze.massive`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from loopus_analyze import dynamics
from loopus_analyze.cka import GramStats, HSICAccumulator, gram_matrices_centred_by
from loopus_analyze.corpus import TokenBatch
from loopus_analyze.hooks import StateHooks
from loopus_analyze.lens import lens_sums
from loopus_analyze.massive import VIEWS, MassiveTracker, normed_view, without_channels
from loopus_analyze.probes import ProbeSample, run_probes
from loopus_core.models import model_parts
from loopus_core.progress import Progress, ensure

log = logging.getLogger(__name__)

DEFAULT_LENS_TOKENS_PER_BATCH = 16  # the lens costs S x vocab x D per token: read it on a sample
DEFAULT_CKA_TOKENS = 256  # tokens per CKA minibatch: Gram cost S n^2 D per minibatch, so O(n) per batch
VIEW_DRIFT_TOKENS = 256  # per batch: the drift of the normed / no_massive views is a mean over tokens
DEFAULT_PROBE_TOKENS = 2048  # the probe sample: 8 logistic regressions per state cost about 1 min on 2 cores


@dataclass
class Measurements:
    """Everything measured in ONE streamed pass over the probe tokens (see the module docstring)."""

    num_layers: int
    tokens_used: int
    num_batches: int  # CKA minibatches (about cka_tokens tokens each), the unit of hsic_batches
    cka_debiased: np.ndarray  # (L+1, L+1)
    cka_biased: np.ndarray  # (L+1, L+1)
    hsic_batches: np.ndarray  # (num_batches, L+1, L+1) debiased per-batch HSIC terms
    hsic_biased_batches: np.ndarray  # (num_batches, L+1, L+1)
    cka_with_bos: np.ndarray | None  # (L+1, L+1) debiased, first position included (diagnostic)
    drift: np.ndarray  # (L,) mean angular distance states s -> s+1, raw
    drift_centred: np.ndarray  # (L,) same after subtracting the per-state batch mean
    distance: np.ndarray  # (L+1, L+1) mean angular distance d(s, t)
    rel_update: np.ndarray  # (L,) mean |h_{s+1} - h_s| / |h_s|
    massive: dict[str, np.ndarray]  # max_abs, ratio_to_median, bos_max_abs: (L+1,) each
    lens_kl: np.ndarray  # (L+1,) mean KL(final || lens_s), nats
    lens_top1: np.ndarray  # (L+1,)
    lens_entropy: np.ndarray  # (L+1,) nats
    probes: dict[str, dict[str, np.ndarray]]  # task -> accuracy / control / selectivity (L+1,)
    nan_count: int
    seq_len: int
    seed: int
    hidden_size: int = 0
    lens_tokens: int = 0  # tokens the lens statistics were averaged over
    probe_tokens: int = 0  # tokens in the probe sample
    views: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # normed / no_massive: cka, drift
    massive_activations: dict = field(default_factory=dict)  # channels, tokens (massive.MassiveTracker)

    def to_json(self) -> dict:
        """A JSON-serialisable dict (arrays as nested lists, non-finite values as null)."""
        out = {}
        for f in fields(self):
            out[f.name] = _to_jsonable(getattr(self, f.name))
        return out

    @classmethod
    def from_json(cls, d: dict) -> Measurements:
        """Inverse of :meth:`to_json` (null -> NaN in arrays)."""

        def arr(value):
            return None if value is None else np.array(value, dtype=np.float64)

        kwargs = dict(d)
        arrays = (
            "cka_debiased",
            "cka_biased",
            "hsic_batches",
            "hsic_biased_batches",
            "cka_with_bos",
            "drift",
            "drift_centred",
            "distance",
            "rel_update",
            "lens_kl",
            "lens_top1",
            "lens_entropy",
        )
        for name in arrays:
            kwargs[name] = arr(d.get(name))
        kwargs["massive"] = {k: arr(v) for k, v in d.get("massive", {}).items()}
        kwargs["probes"] = {t: {k: arr(v) for k, v in r.items()} for t, r in d.get("probes", {}).items()}
        kwargs["views"] = {v: {k: arr(x) for k, x in r.items()} for v, r in (d.get("views") or {}).items()}
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in kwargs.items() if k in known})


def _to_jsonable(value):
    if isinstance(value, np.ndarray):
        return _to_jsonable(value.tolist())
    if isinstance(value, dict):
        return {k: _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


@dataclass
class _Sums:
    """The float64 running sums of one pass."""

    count: int = 0
    distance: np.ndarray | None = None
    drift: np.ndarray | None = None
    drift_centred: np.ndarray | None = None
    rel_update: np.ndarray | None = None
    max_abs: np.ndarray | None = None
    ratio: list[np.ndarray] = field(default_factory=list)
    bos_max_abs: np.ndarray | None = None
    lens_count: int = 0
    lens: dict[str, np.ndarray] = field(default_factory=dict)

    def add(self, name: str, value: np.ndarray) -> None:
        current = getattr(self, name)
        setattr(self, name, value.copy() if current is None else current + value)


def measure(
    model,
    tokenizer,
    batches: Iterable[TokenBatch],
    *,
    probes: bool = True,
    lens: bool = True,
    progress: Progress | None = None,
    max_probe_tokens: int = DEFAULT_PROBE_TOKENS,
    seed: int = 0,
    lens_tokens_per_batch: int = DEFAULT_LENS_TOKENS_PER_BATCH,
    cka_tokens: int = DEFAULT_CKA_TOKENS,
    with_bos: bool = True,
) -> Measurements:
    """Run the model once over ``batches`` and measure every layer boundary (see :class:`Measurements`).

    Per batch: states of the selected tokens (first position and padding excluded) are stacked as
    (L+1, n, D) float32; debiased and biased HSIC terms of all state pairs (:mod:`loopus_analyze.cka`),
    angular distances, relative updates and activation maxima (:mod:`loopus_analyze.dynamics`), the logit
    lens on ``lens_tokens_per_batch`` random tokens (:mod:`loopus_analyze.lens`), and a random share of
    ``max_probe_tokens`` tokens into the probe sample (:mod:`loopus_analyze.probes`, fitted after the pass).
    ``tokenizer`` is accepted for symmetry with the corpus API (labels come from the input ids).
    """
    batches = list(batches)
    parts = model_parts(model)
    device = next(model.parameters()).device
    acc = _Pass(
        parts.num_layers + 1,
        sum(int(_measurable(b.attention_mask).sum()) for b in batches),  # the probe sample's share
        probes=probes,
        max_probe_tokens=max_probe_tokens,
        seed=seed,
        cka_tokens=cka_tokens,
        with_bos=with_bos,
        lens_tokens=lens_tokens_per_batch if lens else 0,
    )
    hooks = StateHooks(parts.layers)
    try:
        with ensure(progress).task("measuring layers", total=len(batches)) as advance, torch.inference_mode():
            for batch in batches:
                ids = batch.input_ids.to(device)
                mask = batch.attention_mask.to(device)
                acc.seq_len = max(acc.seq_len, ids.shape[1])
                select = _measurable(mask)
                n = int(select.sum())
                if n < 4:
                    log.warning("skipping a batch with %d measurable tokens (CKA needs at least 4)", n)
                    advance(1)
                    continue
                parts.backbone(input_ids=ids, attention_mask=mask, use_cache=False)
                h = torch.stack([s[select].float() for s in hooks.states])  # (S, n, D)
                bos = torch.stack([s[:, 0].float() for s in hooks.states])  # (S, B, D)
                hooks.states = [None] * acc.states_count
                acc.add(parts, h, bos, batch, select.cpu(), device)
                del h, bos
                advance(1)
    finally:
        hooks.remove()
    return acc.result(parts.num_layers, tokenizer)



def _measurable(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the tokens a batch measures, its real tokens but the first position."""
    select = mask.bool().clone()
    select[:, 0] = False
    return select


class _Pass:
    """The accumulators of one measuring pass, batch after batch (float64, size independent of the budget)."""

    def __init__(
        self,
        states_count: int,
        measurable_tokens: int,
        *,
        probes: bool,
        max_probe_tokens: int,
        seed: int,
        cka_tokens: int,
        with_bos: bool,
        lens_tokens: int,
    ) -> None:
        self.states_count = states_count
        self.generator = torch.Generator().manual_seed(seed)
        self.seed = seed
        # each batch gives the sample its share of tokens, so that a short last batch leaves no room empty
        self.probe_share = max_probe_tokens / max(measurable_tokens, 1) if probes else 0.0
        self.sample = ProbeSample(max_probe_tokens) if probes else None
        self.hsic = HSICAccumulator()
        self.hsic_bos = HSICAccumulator(biased=False) if with_bos else None
        self.cka_tokens = cka_tokens
        self.lens_tokens = lens_tokens
        self.sums = _Sums()
        self.massive = MassiveTracker(states_count)
        self.view_hsic = {v: HSICAccumulator(biased=False) for v in VIEWS[1:]}
        self.view_drift: dict[str, np.ndarray] = {}
        self.view_drift_count = 0
        self.nan_count = 0
        self.seq_len = 0
        self.hidden = 0

    def add(
        self,
        parts,
        h: torch.Tensor,
        bos: torch.Tensor,
        batch: TokenBatch,
        select: torch.Tensor,
        device: torch.device,
    ) -> None:
        """Add one batch: ``h`` (S, n, D) states of the measured tokens, ``bos`` (S, B, D) first positions."""
        self.hidden = h.shape[-1]
        nonfinite = int((~torch.isfinite(h)).sum())
        if nonfinite:
            self.nan_count += nonfinite
            h = torch.nan_to_num(h, nan=0.0, posinf=0.0, neginf=0.0)
            bos = torch.nan_to_num(bos, nan=0.0, posinf=0.0, neginf=0.0)
        n = h.shape[1]
        channels = self.massive.add(h, batch.input_ids[select])
        self._add_cka(h, bos, n, channels)
        self._add_dynamics(h, bos, n)
        self._add_views(parts, h, n, channels)
        if self.lens_tokens > 0:
            pick = torch.randperm(n, generator=self.generator)[: self.lens_tokens].to(device)
            for key, value in lens_sums(parts, h[:, pick]).items():
                self.sums.lens[key] = self.sums.lens.get(key, 0) + value
            self.sums.lens_count += len(pick)
        if self.sample is not None and self.probe_share > 0:
            pick = torch.randperm(n, generator=self.generator)[: math.ceil(self.probe_share * n)]
            self.sample.add(h[:, pick.to(device)].cpu(), _token_labels(batch, select, pick))

    def _add_cka(self, h: torch.Tensor, bos: torch.Tensor, n: int, channels: list[int]) -> None:
        """HSIC terms of every state pair, on minibatches of about ``cka_tokens`` tokens.

        One Gram per state over [measured tokens, first positions], centred with the measured tokens' mean:
        its top-left block is the first-position-excluded Gram; the statistics of the whole (the BOS
        diagnostic) add the border blocks' contributions. The batch's tokens are cut into CKA minibatches
        (whole rows, which are windows of different documents): the debiased estimator is unbiased at any
        minibatch size, and Gram cost grows with n * cka_tokens instead of n². The same product gives the
        Grams without the massive ``channels`` (the ``no_massive`` view).
        """
        for chunk in torch.tensor_split(h, max(1, n // self.cka_tokens), dim=1):
            size = chunk.shape[1]
            x = torch.cat([chunk, bos], dim=1) if self.hsic_bos is not None else chunk
            grams, without = gram_matrices_centred_by(x, size, channels)
            stats = GramStats.of(grams[:, :size, :size])
            self.hsic.update(stats=stats)
            if self.hsic_bos is not None:
                self.hsic_bos.update(stats=GramStats.extend(stats, grams))
            self.view_hsic["no_massive"].update(
                stats=stats if without is grams else GramStats.of(without[:, :size, :size]))
            del grams, without

    def _add_views(self, parts, h: torch.Tensor, n: int, channels: list[int]) -> None:
        """Debiased CKA of the states as the next layer reads them, and drift of both views on the first
        ``VIEW_DRIFT_TOKENS`` tokens of the batch (a random mix of documents; the CKA of the view without the
        massive channels comes with the raw Grams, :meth:`_add_cka`)."""
        normed = normed_view(parts, h)
        if normed is None:
            self.view_hsic.pop("normed", None)
        else:
            for chunk in torch.tensor_split(normed, max(1, n // self.cka_tokens), dim=1):
                self.view_hsic["normed"].update(chunk)
        sample = slice(0, VIEW_DRIFT_TOKENS)
        views = {"normed": None if normed is None else normed[:, sample],
                 "no_massive": without_channels(h[:, sample], channels)}
        for name, x in views.items():
            if x is not None:
                drift = dynamics.consecutive_angular_sums(x)
                self.view_drift[name] = drift + self.view_drift.get(name, 0.0)
        self.view_drift_count += views["no_massive"].shape[1]

    def _add_dynamics(self, h: torch.Tensor, bos: torch.Tensor, n: int) -> None:
        sums = self.sums
        sums.count += n
        sums.add("distance", dynamics.angular_distance_sums(h))
        sums.add("drift", dynamics.consecutive_angular_sums(h))
        sums.add("drift_centred", dynamics.centred_drift_sums(h))
        sums.add("rel_update", dynamics.relative_update_sums(h))
        max_abs, ratio = dynamics.massive_activation_stats(h)
        sums.max_abs = max_abs if sums.max_abs is None else np.maximum(sums.max_abs, max_abs)
        sums.ratio.append(ratio)
        bos_max = bos.abs().reshape(self.states_count, -1).max(dim=-1).values.double().cpu().numpy()
        sums.bos_max_abs = bos_max if sums.bos_max_abs is None else np.maximum(sums.bos_max_abs, bos_max)

    def result(self, num_layers: int, tokenizer=None) -> Measurements:
        """The :class:`Measurements` of the pass (probes are fitted here)."""
        if not self.hsic.debiased_terms:
            raise ValueError("no batch had at least 4 measurable tokens")
        sums, count = self.sums, self.sums.count
        nan_lens = np.full(self.states_count, np.nan)
        names = ("kl", "top1", "entropy")
        lens = {k: (sums.lens[k] / sums.lens_count if sums.lens_count else nan_lens) for k in names}
        probe_results: dict[str, dict[str, np.ndarray]] = {}
        if self.sample is not None and self.sample.size:
            log.info("fitting probes on %d tokens x %d states", self.sample.size, self.states_count)
            features, labels = self.sample.arrays()
            probe_results = run_probes(features, labels, seed=self.seed, seq_len=self.seq_len)
        return Measurements(
            num_layers=num_layers,
            tokens_used=count,
            num_batches=len(self.hsic.debiased_terms),  # CKA minibatches (the bootstrap unit)
            cka_debiased=self.hsic.cka(),
            cka_biased=self.hsic.cka_biased(),
            hsic_batches=np.stack(self.hsic.debiased_terms),
            hsic_biased_batches=np.stack(self.hsic.biased_terms),
            cka_with_bos=self.hsic_bos.cka() if self.hsic_bos is not None else None,
            drift=sums.drift / count,
            drift_centred=sums.drift_centred / count,
            distance=sums.distance / count,
            rel_update=sums.rel_update / count,
            massive={
                "max_abs": sums.max_abs,
                "ratio_to_median": np.mean(sums.ratio, axis=0),
                "bos_max_abs": sums.bos_max_abs,
            },
            lens_kl=lens["kl"],
            lens_top1=lens["top1"],
            lens_entropy=lens["entropy"],
            probes=probe_results,
            nan_count=self.nan_count,
            seq_len=self.seq_len,
            seed=self.seed,
            hidden_size=self.hidden,
            lens_tokens=sums.lens_count,
            probe_tokens=self.sample.size if self.sample is not None else 0,
            views={name: {"cka": acc.cka(), "drift": self.view_drift[name] / self.view_drift_count}
                   for name, acc in self.view_hsic.items() if acc.debiased_terms},
            massive_activations=self.massive.summary(tokenizer),
        )


def _token_labels(batch: TokenBatch, select: torch.Tensor, pick: torch.Tensor) -> dict[str, np.ndarray]:
    """Probe labels of the picked measured tokens: current / previous / next id, position, document."""
    rows, cols = select.nonzero(as_tuple=True)
    rows, cols = rows[pick], cols[pick]
    ids = batch.input_ids
    mask = batch.attention_mask
    has_next = cols + 1 < ids.shape[1]
    nxt_cols = torch.where(has_next, cols + 1, cols)
    nxt = torch.where(has_next & (mask[rows, nxt_cols] == 1), ids[rows, nxt_cols], torch.full_like(cols, -1))
    return {
        "current": ids[rows, cols].numpy(),
        "previous": ids[rows, cols - 1].numpy(),
        "next": nxt.numpy(),
        "position": cols.numpy(),
        "doc": batch.doc_ids[rows].numpy(),
    }

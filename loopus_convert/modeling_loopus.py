"""The looped (LoopUS) causal LM: encoder -> loop block run K times under a selective gate -> decoder.

Reads top to bottom in the order the data flows:

1. the base model: where its decoder-layer list is (found by inspection, :func:`decoder_layer_path`), and
   ``_StandIn``, the module that stands in for a layer while the base runs its own forward around them;
2. ``SelectiveGate`` (shared by all passes) and ``ConfidenceHead`` (LayerNorm + Linear);
3. ``LoopusCache``: the loop block's K/V under a KV strategy (``full``: one slot per (loop pass, layer);
   ``last`` / ``first``: one per layer); tokens that stop looping keep a complete history;
4. ``LoopusContext``: what the base's own forward prepares once per call (embeddings, each layer's
   arguments: masks per layer type, rotary tables, positions, the cache);
5. the exit rule: ``stop_rule``, one pure function of the settings, the pass and its ``PassSignals``;
6. ``LoopusForCausalLM``: ``prepare -> encode -> run_loop (loop_step, record, stop rule, propagate) ->
   decode``, ``generate``.

The base model's own modules are reused and keep their attribute names, so the weights file reads like the
base model's (``model.layers.3.self_attn.q_proj.weight``) plus ``gate.*`` and ``confidence_head.*``.
Self-contained (torch and transformers only): this file is copied next to every looped checkpoint.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_outputs import ModelOutput

from .configuration_loopus import ExitSettings, LoopusConfig, check_gate_init

# ------------------------------------------------------------------------------------------ the base model


def decoder_layer_path(model: nn.Module, num_layers: int) -> str:
    """Dotted path of a causal LM's decoder-layer list: the shallowest ``nn.ModuleList`` of ``num_layers``
    modules (the base's ``num_hidden_layers``), found by inspecting the model, not by a table per type.
    ``ValueError`` when there is none."""
    found = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and name and len(module) == num_layers > 0
    ]
    if not found:
        raise ValueError(f"{type(model).__name__} has no list of {num_layers} decoder layers")
    return min(found, key=lambda name: (name.count("."), found.index(name)))


def _accepted(function, **candidates) -> dict:
    """The keyword arguments ``function`` takes, of ``candidates`` (None values dropped)."""
    params = inspect.signature(function).parameters
    return {k: v for k, v in candidates.items() if k in params and v is not None}


class _StandIn(nn.Module):
    """Stands in for decoder layer ``index`` while the base runs its own forward around the layers: it hands
    the call to ``route(index, hidden_states, args, kwargs)`` and returns what that returns. Attribute reads
    it does not answer go to the real layer (backbones read e.g. ``attention_type``); the real layer is not
    a submodule."""

    def __init__(self, layer: nn.Module, index: int, route) -> None:
        super().__init__()
        self.__dict__["_layer"] = layer
        self.__dict__["_route"] = route
        self.index = index

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_layer"], name)

    def forward(self, hidden_states, *args, **kwargs):
        return self._route(self.index, hidden_states, args, kwargs)


def _build_base(base_config, attn_implementation: str | None) -> nn.Module:
    """The base causal LM from its config, with the looped model's attention implementation where the base
    supports it (else the base's own default, e.g. eager for a family without SDPA)."""
    base_config._attn_implementation = attn_implementation
    try:
        return AutoModelForCausalLM.from_config(base_config)
    except ValueError as exc:
        if "attention implementation" not in str(exc) and "attn_implementation" not in str(exc):
            raise
    base_config._attn_implementation = None
    return AutoModelForCausalLM.from_config(base_config)


class _Captured(Exception):
    """Raised by the last layer's stand-in once every layer's call is recorded: the base's forward stops
    there (what it does after its layers is not needed, and may expect the real layers' output structure)."""


@dataclass
class _LayerCall:
    """The arguments the base backbone passes to one decoder layer (after the hidden states)."""

    args: tuple
    kwargs: dict


# ------------------------------------------------------------------------------------------ gate and head


class SelectiveGate(nn.Module):
    """Input-dependent per-token, per-channel mix of the loop block's output ``u`` with its input ``h_old``.

    ``x = u - h_old``; ``pre = W_dt (W_in x) + b_dt`` (``W_in``: (r, D) no bias, ``W_dt``: (D, r) with
    bias); ``h_new = Abar * u + (1 - Abar) * h_old``, per token and channel. Two forms of the same four
    parameters, chosen by ``gate_init`` (a checkpoint records it and always runs in its own form):

    * ``residual``: ``Abar = 1 - tanh(exp(A_log) * pre)`` in (0, 2), i.e. ``h_new = u + lambda (h_old - u)``
      with ``lambda = tanh(exp(A_log) * pre)``. Initialised at ``W_dt = 0``, ``b_dt = 0``, ``A_log = 0``:
      ``lambda == 0`` exactly (one loop is the base model) and ``d Abar / d pre = -1`` there, so the gate's
      gradients are of ordinary size from the first update. For ``pre >= 0`` it decays like the official
      ``exp(-z)`` (same value and slope at 0: ``1 - tanh z = 2 / (1 + exp(2 z))``); where the loss asks for
      a longer step than the block's (``pre < 0``) it saturates at 2 instead of growing as ``exp(-z)``.
    * ``identity`` and ``official``: the official ``Abar = exp(-softplus(pre) * exp(A_log))`` in (0, 1]
      (official checkpoints import into it exactly). ``identity`` puts ``softplus(b_dt) = 1e-8`` and
      ``W_dt = 0``: Abar rounds to 1 (lossless), but the softplus slope there is ~1e-8, so the gate's
      gradients are ~1e-8 of the loop layers' and it does not move in practice (frozen). ``official`` is
      the paper's S4D init (not lossless: mean Abar ~0.35 on SmolLM2 at split 10:20).
    """

    IDENTITY_DELTA = 1e-8  # delta * exp(A_log) at identity init: Abar = exp(-1e-8) rounds to 1.0 in fp32
    NO_DECAY = ("A_log",)  # parameters the optimizer must not decay (the decay rate, as in Mamba)

    def __init__(self, hidden_size: int, rank: int, gate_init: str) -> None:
        super().__init__()
        check_gate_init(gate_init)
        self.gate_init = gate_init
        self.A_log = nn.Parameter(torch.zeros(hidden_size))
        self.dt_input_proj = nn.Linear(hidden_size, rank, bias=False)
        self.delta_proj = nn.Linear(rank, hidden_size, bias=True)

    def mix_weight(self, x: torch.Tensor) -> torch.Tensor:
        """``Abar`` (B, T, D), the weight on ``u``, for the block's update ``x = u - h_old`` (B, T, D)."""
        pre = self.delta_proj(self.dt_input_proj(x))  # (B, T, D)
        if self.gate_init == "residual":
            return 1 - torch.tanh(pre * torch.exp(self.A_log))  # (0, 2); exactly 1 at init
        return torch.exp(-F.softplus(pre) * torch.exp(self.A_log))  # (0, 1]

    def forward(self, u: torch.Tensor, h_old: torch.Tensor) -> torch.Tensor:
        a_bar = self.mix_weight(u - h_old)
        return a_bar * u + (1 - a_bar) * h_old

    @torch.no_grad()
    def is_pass_through(self) -> bool:
        """True when the gate returns the loop block's output unchanged for every input: ``W_dt = 0`` makes
        ``Abar`` input-independent, and it is exactly 1.0 in every channel (the ``residual`` and ``identity``
        inits)."""
        weight = self.delta_proj.weight
        if bool(weight.detach().any()):
            return False
        zero = torch.zeros(1, 1, weight.shape[0], dtype=weight.dtype, device=weight.device)
        return bool((self.mix_weight(zero) == 1.0).all())

    def reset(self) -> None:
        """Initial values of ``gate_init``. ``residual``: ``W_dt``, ``b_dt``, ``A_log`` zero (Abar == 1
        exactly). ``identity``: ``A_log = 0``, ``W_dt = 0``, ``b_dt = softplus^-1(1e-8)`` (Abar == 1 to
        fp32 rounding). ``official``: S4D-real ``A_log = log(1..D)``, dt log-uniform in [1e-3, 1e-1] as the
        softplus bias, Mamba's uniform init of ``W_dt``. ``W_in``: normal with std ``D^-1/2`` in all three."""
        hidden, rank = self.delta_proj.out_features, self.delta_proj.in_features
        init.normal_(self.dt_input_proj.weight, mean=0.0, std=hidden**-0.5)
        if self.gate_init == "official":
            init.copy_(self.A_log, torch.log(torch.arange(1, hidden + 1, dtype=torch.float32)))
            init.uniform_(self.delta_proj.weight, -(rank**-0.5), rank**-0.5)
            dt = torch.exp(torch.rand(hidden) * (math.log(1e-1) - math.log(1e-3)) + math.log(1e-3))
            init.copy_(self.delta_proj.bias, dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
            return
        init.zeros_(self.A_log)
        init.zeros_(self.delta_proj.weight)
        if self.gate_init == "residual":
            init.zeros_(self.delta_proj.bias)
        else:
            init.constant_(self.delta_proj.bias, math.log(math.expm1(self.IDENTITY_DELTA)))


def make_gate(config: LoopusConfig) -> SelectiveGate:
    """The selective gate of a looped config (its form from ``gate_init``); ``reset()`` gives its initial
    values. The one place a gate is built: the model, the converter and the wrapper of an in-memory base."""
    return SelectiveGate(config.hidden_size, config.gate_rank, config.gate_init)


class ConfidenceHead(nn.Module):
    """``q = Linear(LayerNorm(feature))``: the logit that the current loop state is good enough to stop."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, eps=1e-5)
        self.proj = nn.Linear(hidden_size, 1)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(feature)).squeeze(-1)  # (B, D) -> (B,)

    def reset(self) -> None:
        init.ones_(self.norm.weight)
        init.zeros_(self.norm.bias)
        init.zeros_(self.proj.weight)
        init.zeros_(self.proj.bias)  # sigmoid(q) = 0.5 everywhere: no exit at the default tau 0.9


# ------------------------------------------------------------------------------------------ KV cache


class LoopusCache(Cache):
    """KV cache of the looped model: one slot per layer, and the loop block's slots set by a KV strategy.

    The loop-block layers produce different K/V at each pass; the strategy (``kv_strategy``) says what a
    pass of a later call attends to. With ``P`` passes and the split ``A:B`` of ``L`` layers:

    - ``full``: pass ``k`` of loop layer ``j`` has its own slot ``(k, j)``. Exact: a cached generation gives
      the logits of an uncached forward over the whole sequence. Memory: ``L + (P - 1)(B - A)`` layer slots.
    - ``last``: one slot per loop layer, overwritten by each pass (Huginn ``compress-s``, looped_nanochat
      ``kv_budget=1``). Memory: the base model's ``L`` slots. The tokens of one call attend to each other at
      the current pass (as in ``full``) and to the tokens of earlier calls at the last pass those ran. That
      makes the result depend on how the sequence is cut into calls, so ``last`` has no one-call uncached
      equivalent. Its definition, and the tests' reference: ``full``, with each token's final-pass K/V
      written into all of its pass slots at the end of its call. One call alone computes the same as ``full``.
    - ``first``: one slot per loop layer holding the first pass's K/V, which every later pass attends to for
      every token, the current ones included (MoR's recursive KV sharing, PLT). Memory: the base model's ``L``
      slots. Pass 1 never depends on later passes, so the result does not depend on the cut: cached generation
      gives the logits of an uncached forward of ``first`` (which runs on a temporary cache of its own).

    Early exit: every slot always covers every token. Under ``full`` a token that stops after pass ``e`` has
    its pass-``e`` K/V copied into the slots of the deeper passes (:meth:`propagate`). Under ``last`` the slot
    already holds the K/V of the token's last pass, and under ``first`` every token ran pass 1. During a pass
    only the still-active rows run (``rows``), and their updates write only the tokens still looping
    (``token_active``).

    Step protocol (driven by :meth:`LoopusForCausalLM.forward`): ``begin_step(n)`` -> for each pass
    ``at_pass(k, rows, token_active)``, the layers' updates and ``propagate(k, stopped)`` -> ``end_step()``.
    While ``probing`` is set (the next-token distribution of one pass, for the zero-shot exit criteria), the
    decoder layers read the cache and do not write it.
    """

    def __init__(self, loop_layers: range, kv_strategy: str | None = None) -> None:
        super().__init__(layers=[])
        self.loop_layers = loop_layers
        self.kv_strategy = kv_strategy  # None: the first call's strategy
        self.slots: dict[tuple[int, int], list[torch.Tensor]] = {}  # (pass or 0, layer) -> [K, V] (B,H,S,Dh)
        self.seq_length = 0  # committed tokens
        self.new_tokens = 0  # tokens of the step in progress
        self.num_passes = 0  # loop passes every slot set holds (full)
        self.pass_index = 0  # current loop pass (1-based); 0 outside the loop block
        self.rows: torch.Tensor | None = None  # active batch rows of the current pass, None = all
        self.token_active: torch.Tensor | None = None  # (b_active, n) tokens still looping, None = all
        self.probing = False  # decoder layers read, do not write
        self.loop_record: list[torch.Tensor] = []  # loops used per row, one (B,) entry per step
        self.packed = False  # its history holds records packed in a row (no later step may extend it)

    # -- what transformers asks of a cache
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seq_length

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.seq_length

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.seq_length + query_length, 0  # full history for every layer (sliding masks cut it)

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return bool(self.slots)

    @property
    def batch_size(self) -> int:
        return next(iter(self.slots.values()))[0].shape[0] if self.slots else -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for kv in self.slots.values():
            kv[0], kv[1] = kv[0].index_select(0, beam_idx), kv[1].index_select(0, beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)

    def reset(self) -> None:
        self.slots.clear()
        self.seq_length = self.new_tokens = self.num_passes = 0
        self.packed = False

    def memory_bytes(self) -> int:
        """Bytes of every K and V tensor the cache holds."""
        return sum(t.numel() * t.element_size() for kv in self.slots.values() for t in kv)

    def base_model_bytes(self) -> int:
        """Bytes of one K/V slot per layer: what the base model's cache holds for the same tokens."""
        one_per_layer = {layer: kv for (_, layer), kv in self.slots.items()}
        return sum(t.numel() * t.element_size() for kv in one_per_layer.values() for t in kv)

    # -- the step protocol
    def use_strategy(self, kv_strategy: str) -> None:
        """Adopt the call's KV strategy; a cache keeps the strategy it started with."""
        if self.kv_strategy is None:
            self.kv_strategy = kv_strategy
        elif self.kv_strategy != kv_strategy:
            raise ValueError(
                f"this cache holds kv_strategy {self.kv_strategy!r} history; a step cannot use "
                f"{kv_strategy!r} "
                "(start a new cache, or keep kv_strategy fixed during a generation)"
            )

    def reserve_passes(self, passes: int) -> None:
        """Make room for ``passes`` loop passes; under ``full`` a later step cannot go deeper than the first
        one did (``last`` and ``first`` hold one slot per layer whatever the depth)."""
        if self.kv_strategy != "full" or passes <= self.num_passes:
            return
        if self.seq_length > 0:
            raise ValueError(
                f"this cache holds {self.num_passes} loop passes of history; a step cannot run {passes} "
                "(start a new cache, or keep num_loops / max_loops fixed during a generation)"
            )
        self.num_passes = passes

    def begin_step(self, new_tokens: int) -> None:
        self.new_tokens = new_tokens
        self.at_pass(0)

    def at_pass(
        self, pass_index: int, rows: torch.Tensor | None = None, token_active: torch.Tensor | None = None
    ) -> None:
        """The layers about to run: loop pass ``pass_index`` (0 = encoder or decoder) of the batch rows
        ``rows`` (None = all), writing the tokens ``token_active`` (b, n) only (None = all)."""
        self.pass_index, self.rows, self.token_active = pass_index, rows, token_active

    def end_step(self) -> None:
        self.seq_length += self.new_tokens
        self.new_tokens = 0
        self.at_pass(0)

    def _slot_key(self, layer_idx: int) -> tuple[int, int]:
        if layer_idx not in self.loop_layers:
            return (0, layer_idx)
        return (self.pass_index if self.kv_strategy == "full" else 1, layer_idx)

    def _of_rows(self, kv: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return (kv[0], kv[1]) if self.rows is None else (kv[0][self.rows], kv[1][self.rows])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Store the layer's K/V of the step's tokens and return the K/V its attention reads."""
        in_loop = layer_idx in self.loop_layers
        if self.probing and not in_loop:  # a trial decode: the history plus this call's K/V, nothing stored
            kv = self.slots.get((0, layer_idx))
            if kv is None:
                return key_states, value_states
            past = [t[:, :, : self.seq_length] for t in self._of_rows(kv)]
            return torch.cat([past[0], key_states], dim=2), torch.cat([past[1], value_states], dim=2)
        if in_loop and self.kv_strategy == "first" and self.pass_index > 1:
            return self._of_rows(self.slots[(1, layer_idx)])  # every token's pass-1 K/V, this call's too
        return self._write(key_states, value_states, self._slot_key(layer_idx))

    def _write(self, key_states: torch.Tensor, value_states: torch.Tensor, slot: tuple[int, int]):
        kv = self.slots.get(slot)
        if (
            self.rows is None
            and self.token_active is None
            and (kv is None or kv[0].shape[2] == self.seq_length)
        ):
            # fast path: every row and token active, slot not yet grown this step -> append
            if kv is None:
                self.slots[slot] = [key_states, value_states]
            else:
                kv[0] = torch.cat([kv[0], key_states], dim=2)
                kv[1] = torch.cat([kv[1], value_states], dim=2)
            return self.slots[slot][0], self.slots[slot][1]
        batch = key_states.shape[0] if self.rows is None else self._batch()
        kv = self._extended(slot, key_states, batch)
        start = self.seq_length
        for i, new in enumerate((key_states, value_states)):
            if self.rows is None:
                old = kv[i][:, :, start:]
            else:
                old = kv[i][self.rows, :, start:]
            if self.token_active is not None:
                new = torch.where(self.token_active[:, None, :, None], new, old)
            if self.rows is None:
                kv[i][:, :, start:] = new
            else:
                kv[i][self.rows, :, start:] = new
        return self._of_rows(kv)

    def _extended(self, key: tuple[int, int], like: torch.Tensor, batch: int) -> list[torch.Tensor]:
        """The slot ``key``, grown by the step's new tokens (zeros) if it does not cover them yet."""
        kv = self.slots.get(key)
        target = self.seq_length + self.new_tokens
        if kv is None:
            shape = (batch, like.shape[1], target, like.shape[3])
            kv = [like.new_zeros(shape), like.new_zeros(shape)]
            self.slots[key] = kv
        elif kv[0].shape[2] < target:
            pad = (batch, like.shape[1], target - kv[0].shape[2], like.shape[3])
            kv[0] = torch.cat([kv[0], like.new_zeros(pad)], dim=2)
            kv[1] = torch.cat([kv[1], like.new_zeros(pad)], dim=2)
        return kv

    def _batch(self) -> int:
        if self.slots:
            return next(iter(self.slots.values()))[0].shape[0]
        raise RuntimeError("LoopusCache: a row subset before any full-batch update")

    def propagate(self, exit_pass: int, frozen: torch.Tensor) -> None:
        """Under ``full``: copy pass ``exit_pass``'s K/V of the tokens that just stopped (``frozen``: (B, n)
        bool) into the slots of every deeper pass, for every loop layer; ``last`` and ``first`` need none."""
        if self.kv_strategy != "full" or exit_pass >= self.num_passes or not bool(frozen.any()):
            return
        start = self.seq_length
        mask = frozen[:, None, :, None]  # (B, 1, n, 1)
        for layer_idx in self.loop_layers:
            src = self.slots[(exit_pass, layer_idx)]
            for deeper in range(exit_pass + 1, self.num_passes + 1):
                dst = self._extended((deeper, layer_idx), src[0], src[0].shape[0])
                for i in range(2):
                    dst[i][:, :, start:] = torch.where(mask, src[i][:, :, start:], dst[i][:, :, start:])


# ------------------------------------------------------------------------------------------ context


@dataclass
class LoopusContext:
    """What every layer of one call needs, as the base backbone's own forward prepared it
    (:meth:`LoopusForCausalLM.prepare`): the embeddings it feeds layer 0 (scaled, with learned positions,
    through its dropout, as the family does) and the arguments it passes each layer (masks per layer type,
    rotary tables, ALiBi, positions, the cache)."""

    inputs_embeds: torch.Tensor  # (B, T, D) what the base feeds its first layer
    attention_mask: torch.Tensor | None  # (B, S) 2D padding mask over past + new tokens, or None
    calls: list[_LayerCall]  # per decoder layer: the arguments the base passes it
    inputs: dict  # the call's inputs (input_ids / inputs_embeds, attention_mask, position_ids), for select
    cache: LoopusCache | None = None
    passes_done: int = 0  # loop passes applied so far in this call
    batch: int = field(default=0)


def _rows_of(value, rows: torch.Tensor, batch: int):
    """``value[rows]`` for a per-row tensor of a batch of ``batch`` rows; other values (None, a batch of one
    that broadcasts) as they are."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch and batch > 1:
        return value.index_select(0, rows)
    return value


@dataclass
class LoopusCausalLMOutput(ModelOutput):
    """``logits`` (B, T, V); ``loops_used`` (B,) loop passes each sequence ran; ``confidence`` (B, passes)
    confidence-head logits after each pass (NaN for passes a sequence did not run); ``cache`` the KV cache."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: LoopusCache | None = None
    loops_used: torch.LongTensor | None = None
    confidence: torch.FloatTensor | None = None

    @property
    def past_key_values(self) -> LoopusCache | None:
        return self.cache


# ------------------------------------------------------------------------------------------ exit rule


@dataclass(frozen=True)
class PassSignals:
    """What the exit rule reads after a pass, one value per row that ran it (b,); ``None`` where the exit
    strategy does not need it.

    ``confidence``: the confidence-head logit ``q_k``; ``survival``: ``prod_{j <= k} (1 - sigmoid(q_j))``;
    ``rel_change``: ``||f_k - f_{k-1}|| / ||f_{k-1}||`` of the confidence feature ``f``; ``kl``:
    ``KL(p_{k-1} || p_k)`` of the next-token distributions (NaN at pass 1: nothing to compare with);
    ``stable_passes``: passes in a row whose top next token equals the previous pass's (0 at pass 1).
    """

    confidence: torch.Tensor
    survival: torch.Tensor | None = None
    rel_change: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    stable_passes: torch.Tensor | None = None


def stop_rule(settings: ExitSettings, pass_index: int, signals: PassSignals) -> torch.Tensor:
    """Which rows (b,) stop after pass ``pass_index`` (1-based) under the exit strategy of ``settings``.

    Nobody before ``min_loops``; then ``threshold``: ``sigmoid(q) > tau``; ``cdf``: ``1 - survival > tau``;
    ``convergence``: ``rel_change < convergence_tol``; ``kl``: ``kl < kl_threshold`` (NaN never stops);
    ``argmax``: ``stable_passes >= argmax_patience``; ``none``: never. The end of the loop budget is the
    caller's.
    """
    strategy = settings.exit_strategy
    if strategy == "none" or pass_index < settings.min_loops:
        return torch.zeros_like(signals.confidence, dtype=torch.bool)
    if strategy == "threshold":
        return torch.sigmoid(signals.confidence.float()) > settings.exit_threshold
    if strategy == "cdf":
        return (1 - signals.survival) > settings.exit_threshold
    if strategy == "convergence":
        return signals.rel_change < settings.convergence_tol
    if strategy == "kl":
        return signals.kl < settings.kl_threshold
    return signals.stable_passes >= settings.argmax_patience


@dataclass
class _LoopState:
    """Per-row bookkeeping of one run of the loop over B rows of T tokens, up to P passes."""

    frozen: torch.Tensor  # (B, T) tokens that stopped looping
    loops_used: torch.Tensor  # (B,) passes each row ran
    confidence: torch.Tensor  # (B, P) confidence logits, NaN where a row did not run
    survival: torch.Tensor  # (B,) cdf: prod_j (1 - sigmoid(q_j))
    log_probs: torch.Tensor | None = None  # (B, V) the previous pass's next-token log-probabilities
    stable: torch.Tensor | None = None  # (B,) passes the top next token has stayed the same

    @classmethod
    def start(cls, h: torch.Tensor, passes: int) -> _LoopState:
        batch, length, device = h.shape[0], h.shape[1], h.device
        return cls(
            frozen=torch.zeros(batch, length, dtype=torch.bool, device=device),
            loops_used=torch.zeros(batch, dtype=torch.long, device=device),
            confidence=torch.full((batch, passes), float("nan"), device=device, dtype=torch.float32),
            survival=torch.ones(batch, dtype=torch.float32, device=device),
        )


# ------------------------------------------------------------------------------------------ the model


class LoopusPreTrainedModel(PreTrainedModel):
    config_class = LoopusConfig
    base_model_prefix = ""
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    _no_split_modules: list[str] = []

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, SelectiveGate):
            module.reset()
        elif isinstance(module, ConfidenceHead):
            module.reset()
        else:
            super()._init_weights(module)


class LoopusForCausalLM(LoopusPreTrainedModel, GenerationMixin):
    """A base causal LM's layers run as encoder ``[0, A)`` -> loop block ``[A, B)`` x K -> decoder ``[B, L)``.

    The base model runs its own forward around the layers: :meth:`prepare` runs the base backbone with
    stand-ins in place of its decoder layers, which record what the backbone passes each layer (masks per
    layer type, rotary tables, ALiBi, positions) and the embeddings it feeds layer 0; the loop engine then
    calls the real layers with those arguments; :meth:`head` runs the base's own forward once more with the
    stand-ins returning the decoder's output, so the final norm, lm_head and any logit transform
    (soft-capping, scaling) are the base's own code. Nothing family-specific is re-implemented here.

    ``forward(input_ids, num_loops=K)`` gives logits, ``loops_used`` and confidence logits; ``generate``
    (the transformers API) takes ``num_loops`` and the exit settings too, and leaves the loops each row used
    at every step in :attr:`loop_record`.
    """

    def __init__(self, config: LoopusConfig) -> None:
        super().__init__(config)
        base_config = config.base_config
        if base_config is None:
            raise ValueError(
                "LoopusConfig.base_config is missing: build the config from a base model's config"
            )
        self.adopt(_build_base(base_config, config._attn_implementation))
        self.gate = make_gate(config)
        self.confidence_head = ConfidenceHead(config.hidden_size)
        self.loop_record: list[torch.Tensor] = []
        self.post_init()

    def adopt(self, base: nn.Module) -> None:
        """Take the base causal LM's own modules as this model's, under their own names (the weights file
        reads like the base's), sharing them; the base object runs its own forward around the layers."""
        for name, child in base.named_children():
            self._modules[name] = child
        self.__dict__["_base"] = base
        self.layers_path = decoder_layer_path(base, self.config.num_base_layers)
        tied = getattr(base, "_tied_weights_keys", None)
        if self.config.tie_word_embeddings and isinstance(tied, dict):
            self._tied_weights_keys = dict(tied)
        self.__dict__["_tuple_length"] = None  # 0: the base's layers return a tensor; n: an n-tuple

    # -- parts
    @property
    def base_config(self):
        return self.config.base_config

    @property
    def base_model_of_loop(self) -> nn.Module:
        """The base causal LM whose modules this model runs (sharing them; not a submodule)."""
        return self._base

    @property
    def backbone_prefix(self) -> str:
        """``model.``, ``transformer.``, ...: the prefix a base checkpoint saved from the backbone class alone
        lacks (``""`` where the base has none)."""
        prefix = getattr(self._base, "base_model_prefix", "")
        return f"{prefix}." if prefix and prefix in self._modules else ""

    @property
    def backbone(self) -> nn.Module:
        """The module that owns the decoder-layer list and runs the forward around it."""
        owner = self.layers_path.rpartition(".")[0]
        return self.get_submodule(owner) if owner else self

    @property
    def layers(self) -> nn.ModuleList:
        return self.get_submodule(self.layers_path)

    @property
    def loop_range(self) -> range:
        return range(self.config.split_start, self.config.split_end)

    @property
    def decoder_range(self) -> range:
        return range(self.config.split_end, self.config.num_base_layers)

    def get_input_embeddings(self) -> nn.Module:
        return self._base.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self._base.set_input_embeddings(value)
        self._modules.update(self._base.named_children())

    def get_output_embeddings(self) -> nn.Module:
        return self._base.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self._base.set_output_embeddings(value)
        self._modules.update(self._base.named_children())

    def _outer_modules(self) -> tuple[list[nn.Module], list[nn.Module]]:
        """The base's modules with parameters outside the decoder layers, as (encoder side, decoder side):
        embeddings and what the backbone registers before its layer list (e.g. an embedding norm) read the
        input; the rest (final norm, lm_head, output projections) the output."""
        owner = self.backbone
        layer_list = self.layers
        embeddings = {id(self.get_input_embeddings())}
        names = list(owner._modules)
        cut = names.index(self.layers_path.rpartition(".")[2])
        before = {
            id(m) for n in names[:cut] if owner._modules[n] is not None for m in owner._modules[n].modules()
        }
        inside = {id(m) for m in layer_list.modules()}
        encoder, decoder = [], []
        for module in self._base.modules():
            if id(module) in inside or not any(True for _ in module.parameters(recurse=False)):
                continue
            early = isinstance(module, nn.Embedding) or id(module) in embeddings or id(module) in before
            (encoder if early else decoder).append(module)
        return encoder, decoder

    def encoder_modules(self) -> list[nn.Module]:
        """Embeddings (and what else reads the input before the layers) and the encoder layers ``[0, A)``."""
        return self._outer_modules()[0] + [self.layers[i] for i in range(self.config.split_start)]

    def loop_modules(self) -> list[nn.Module]:
        """The loop-block layers ``[A, B)`` and the selective gate."""
        return [self.layers[i] for i in self.loop_range] + [self.gate]

    def decoder_modules(self) -> list[nn.Module]:
        """The decoder layers ``[B, L)``, the final norm, the lm_head and what else reads the output."""
        return [self.layers[i] for i in self.decoder_range] + self._outer_modules()[1]

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs) -> None:
        """Checkpoint every decoder layer (encoder, loop block and decoder alike): their activations are
        recomputed in the backward pass."""
        self._activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    # -- the base's own forward around the layers
    @contextlib.contextmanager
    def _standing_in(self, route) -> Iterator[None]:
        """While inside, the base's layer list holds :class:`_StandIn` modules that hand every layer call
        to ``route``."""
        owner, attr = self.backbone, self.layers_path.rpartition(".")[2]
        real = owner._modules[attr]
        owner._modules[attr] = nn.ModuleList([_StandIn(layer, i, route) for i, layer in enumerate(real)])
        try:
            yield
        finally:
            owner._modules[attr] = real

    def _layer_output(self, h: torch.Tensor):
        """``h`` in the structure the base's layers return (a tensor, or a tuple with ``h`` first; a tensor
        while no layer has run yet)."""
        n = self._tuple_length
        return (h,) + (None,) * (n - 1) if n else h

    @torch.no_grad()
    def _learn_layer_output(self) -> None:
        """Run the first layer once on one token, to learn what structure the base's layers return."""
        ids = torch.zeros(1, 1, dtype=torch.long, device=self.get_input_embeddings().weight.device)
        embeds, calls = self._capture({"input_ids": ids}, None)  # not prepare: a nested FSDP method reshards
        self._run_layers(embeds, LoopusContext(embeds, None, calls, {"input_ids": ids}), range(1))

    def _base_kwargs(self, function, inputs: dict, cache: LoopusCache | None) -> dict:
        """The keyword arguments of a base forward (``function``) for ``inputs``, with our cache, no router
        logits (MoE auxiliary outputs are not used) and nothing else."""
        params = inspect.signature(function).parameters
        kwargs = _accepted(function, **inputs, use_cache=cache is not None, return_dict=True)
        if cache is not None:
            kwargs["cache" if "cache" in params else "past_key_values"] = cache
        if getattr(self.base_config, "output_router_logits", None) is not None:
            kwargs["output_router_logits"] = False
        return kwargs

    def _capture(self, inputs: dict, cache: LoopusCache | None) -> tuple[torch.Tensor, list[_LayerCall]]:
        """Run the base backbone with stand-ins: the embeddings it feeds layer 0 and every layer's call."""
        calls: list[_LayerCall] = []
        first: list[torch.Tensor] = []

        last = self.config.num_base_layers - 1

        def record(index: int, hidden, args: tuple, kwargs: dict):
            if index == 0:
                first.append(hidden)
            calls.append(_LayerCall(args, kwargs))
            if index == last:
                raise _Captured
            return self._layer_output(first[0])  # the same shape at every layer, whatever the base indexes

        runner = self._base.base_model  # the module that takes input ids (it may hold the layer owner)
        try:
            with self._standing_in(record):
                runner(**self._base_kwargs(runner.forward, inputs, cache))
        except _Captured:
            pass
        return first[0], calls

    def _layer_calls(self, inputs: dict, cache: LoopusCache | None) -> tuple[torch.Tensor, list[_LayerCall]]:
        """:meth:`_capture`, and records packed in a row exact with a cache too: transformers builds the
        block-diagonal masks of position ids that restart only without a padding mask and without a cache, so
        a packed call that fills an empty cache takes each layer's masks from a capture without the cache
        (the same masks: nothing precedes its tokens). A later call on a cache holding a packed row is
        refused: its tokens would attend to every record of that row."""
        if cache is not None and cache.packed and cache.get_seq_length() > 0:
            raise ValueError(
                "this cache holds records packed in a row (position ids that restart), which no later call "
                "can extend exactly; start a new cache for each record, or pass them unpacked"
            )
        embeds, calls = self._capture(inputs, cache)
        positions = inputs.get("position_ids")
        if cache is None or positions is None or inputs.get("attention_mask") is not None:
            return embeds, calls
        if not bool((positions.diff(dim=-1) != 1).any()):
            return embeds, calls
        _, alone = self._capture(inputs, None)
        for call, own in zip(calls, alone, strict=True):
            call.kwargs.update({key: value for key, value in own.kwargs.items() if "mask" in key})
        cache.packed = True
        return embeds, calls

    def prepare(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: LoopusCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> LoopusContext:
        """The base backbone's own preparation of a call: embeddings (as the family scales and positions
        them) and each layer's arguments (masks per layer type, rotary tables, positions, the cache).
        Position ids that restart inside a row (packed records) give block-diagonal masks, as in the base."""
        inputs = dict(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
        )
        embeds, calls = self._layer_calls(inputs, cache)
        return LoopusContext(embeds, attention_mask, calls, inputs, cache, batch=embeds.shape[0])

    def _select(self, ctx: LoopusContext, rows: torch.Tensor) -> LoopusContext:
        """The context of a subset of batch rows (the rows still looping), prepared again by the base."""
        inputs = {k: _rows_of(v, rows, ctx.batch) for k, v in ctx.inputs.items()}
        _, calls = self._layer_calls(inputs, ctx.cache)
        return replace(
            ctx,
            inputs_embeds=ctx.inputs_embeds.index_select(0, rows),
            attention_mask=inputs["attention_mask"],
            calls=calls,
            inputs=inputs,
            batch=int(rows.numel()),
        )

    def _run_layers(self, h: torch.Tensor, ctx: LoopusContext, indices: range) -> torch.Tensor:
        """The real layers ``indices`` on ``h`` (B, T, D), each with the arguments the base gave it."""
        for i in indices:
            call = ctx.calls[i]
            out = self.layers[i](h, *call.args, **call.kwargs)  # (B, T, D) or a tuple starting with it
            self.__dict__["_tuple_length"] = len(out) if isinstance(out, (tuple, list)) else 0
            if isinstance(out, (tuple, list)):
                out = out[0]
            h = out
        return h

    def encode(self, ctx: LoopusContext) -> torch.Tensor:
        """The state ``h0`` (B, T, D) after the encoder layers ``[0, A)``."""
        if ctx.cache is not None:
            ctx.cache.at_pass(0)
        return self._run_layers(ctx.inputs_embeds, ctx, range(self.config.split_start))

    def loop_step(self, h: torch.Tensor, ctx: LoopusContext) -> torch.Tensor:
        """One loop pass: the loop-block layers ``[A, B)`` on ``h`` (B, T, D), then the selective gate."""
        ctx.passes_done += 1
        if ctx.cache is not None:
            ctx.cache.reserve_passes(ctx.passes_done)
            ctx.cache.pass_index = ctx.passes_done
        u = self._run_layers(h, ctx, self.loop_range)
        return self.gate(u, h)

    def decode(self, h: torch.Tensor, ctx: LoopusContext, logits_to_keep: int = 0) -> torch.Tensor:
        """Decoder layers ``[B, L)``, final norm and lm_head: (B, T, D) -> logits (B, T, V)."""
        h = self.decoder_states(h, ctx)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return self.head(h)

    def decoder_states(self, h: torch.Tensor, ctx: LoopusContext) -> torch.Tensor:
        """The decoder layers ``[B, L)`` on the loop state ``h``: (B, T, D) -> (B, T, D), before the final
        norm. With :meth:`head` on a subset of positions, the logits of those positions only."""
        if ctx.cache is not None:
            ctx.cache.at_pass(0)
        return self._run_layers(h, ctx, self.decoder_range)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """The base's own output path (final norm, lm_head, any logit soft-cap or scaling) per position:
        (..., D) -> (..., V). The base's forward runs with the stand-in of the last layer returning ``h``
        (as rows of one position each: no attention mask is built)."""
        flat = h.reshape(-1, 1, h.shape[-1])  # (N, 1, D)
        last = self.config.num_base_layers - 1
        if self._tuple_length is None:
            self._learn_layer_output()

        def replay(index: int, hidden, args: tuple, kwargs: dict):
            return self._layer_output(flat if index == last else hidden)

        ids = torch.zeros(flat.shape[:2], dtype=torch.long, device=flat.device)  # placeholders: not read
        with self._standing_in(replay):
            out = self._base(**self._base_kwargs(self._base.forward, {"input_ids": ids}, None))
        return out.logits.reshape(*h.shape[:-1], out.logits.shape[-1])

    @torch.no_grad()
    def next_token_log_probs(self, h: torch.Tensor, ctx: LoopusContext) -> torch.Tensor:
        """``log p(next token)`` (B, V) at each row's last valid token if the loop stopped at the state ``h``.

        The zero-shot exit criteria's measure, computed only when they run. Cost per pass: the decoder layers
        over the call's tokens (their attention needs every token's K/V), then the final norm, the lm_head and
        a log-softmax at one position per row. In decoding (one token per call) that is ``L - B`` layers and
        one lm_head row per pass. The cache is read, not written.
        """
        cache = ctx.cache
        if cache is not None:
            cache.probing = True
        try:
            h = self._run_layers(h, ctx, self.decoder_range)
        finally:
            if cache is not None:
                cache.probing = False
        return F.log_softmax(self.head(self.confidence_feature(h, ctx)).float(), dim=-1)

    def confidence_feature(self, h: torch.Tensor, ctx: LoopusContext) -> torch.Tensor:
        """The state at each row's last valid token of this call's chunk: (B, T, D) -> (B, D). The one
        feature the confidence head reads, in training and in inference."""
        length = h.shape[1]
        last = torch.full((h.shape[0],), length - 1, dtype=torch.long, device=h.device)
        if ctx.attention_mask is not None and ctx.attention_mask.dim() == 2:
            valid = ctx.attention_mask[:, -length:].to(torch.bool)  # (B, T)
            idx = torch.arange(length, device=h.device).expand_as(valid)
            last = torch.where(valid, idx, torch.full_like(idx, -1)).max(dim=1).values
            last = torch.where(last < 0, torch.full_like(last, length - 1), last)
        return h[torch.arange(h.shape[0], device=h.device), last]

    def confidence_logit(self, h: torch.Tensor, ctx: LoopusContext) -> torch.Tensor:
        """Confidence-head logit (B,) of the state ``h`` (B, T, D)."""
        return self.confidence_head(self.confidence_feature(h, ctx))

    # -- the loop with early exit
    def run_loop(
        self,
        h: torch.Tensor,
        ctx: LoopusContext,
        settings: ExitSettings,
        exit_depths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Up to ``settings.passes`` loop passes. Each pass: run it on the rows still looping, record the
        confidence (and what the exit strategy measures), decide who stops (:func:`stop_rule`), propagate the
        K/V of the tokens that stopped. Rows that stop leave the batch; their state is kept.

        ``exit_depths`` (B, T), if given, fixes the passes of every token instead (a token with depth ``d``
        runs passes 1..d; at deeper passes its K/V is its pass-``d`` K/V): the uncached recomputation of an
        early-exit generation. Returns the final state (B, T, D), the loops used (B,) and the confidence
        logits (B, passes) (NaN where a sequence did not run).
        """
        cache = ctx.cache
        depths = exit_depths.to(h.device).clamp(min=1) if exit_depths is not None else None
        passes = settings.passes if depths is None else max(settings.passes, int(depths.max()))
        if cache is not None:
            cache.reserve_passes(passes)
        state = _LoopState.start(h, passes)
        for k in range(1, passes + 1):
            active = ~state.frozen  # (B, T)
            rows = active.any(dim=1).nonzero().squeeze(1)
            if rows.numel() == 0:
                break
            h_old, h_new, sub = self._active_pass(h, ctx, active, rows, k)
            h = h_new if sub is ctx else h.index_copy(0, rows, h_new)
            state.loops_used[rows] = k
            signals = self._record(state, settings, k, rows, h_old, h_new, sub, measure=depths is None)
            if depths is not None:
                stop = active & (depths <= k)
            else:
                stop_rows = torch.zeros_like(state.loops_used, dtype=torch.bool)
                stop_rows[rows] = stop_rule(settings, k, signals)
                stop = active & stop_rows[:, None]
            if k == passes:
                stop = active
            state.frozen = state.frozen | stop
            if cache is not None:
                cache.propagate(k, stop)
        if cache is not None:
            cache.at_pass(0)
        return h, state.loops_used, state.confidence

    def _active_pass(
        self, h: torch.Tensor, ctx: LoopusContext, active: torch.Tensor, rows: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor, LoopusContext]:
        """Pass ``k`` on the rows ``rows`` still looping: their state before and after (b, T, D) and their
        context. Tokens that stopped (``~active``) keep their state, and in the cache their K/V."""
        everyone = rows.numel() == h.shape[0]
        sub = ctx if everyone else self._select(ctx, rows)
        sub.passes_done = k - 1
        tokens = active if everyone else active.index_select(0, rows)
        tokens = None if bool(tokens.all()) else tokens
        h_old = h if everyone else h.index_select(0, rows)
        if ctx.cache is not None:
            ctx.cache.at_pass(k, None if everyone else rows, tokens)
        h_new = self.loop_step(h_old, sub)  # (b, T, D)
        if tokens is not None:
            h_new = torch.where(tokens[..., None], h_new, h_old)
        return h_old, h_new, sub

    def _record(
        self,
        state: _LoopState,
        settings: ExitSettings,
        k: int,
        rows: torch.Tensor,
        h_old: torch.Tensor,
        h_new: torch.Tensor,
        sub: LoopusContext,
        measure: bool,
    ) -> PassSignals:
        """Record pass ``k``'s confidence logits of the rows that ran it and, if ``measure``, what the exit
        strategy reads; the signals of those rows."""
        q = self.confidence_logit(h_new, sub)  # (b,)
        state.confidence[rows, k - 1] = q.float()
        strategy = settings.exit_strategy if measure else "none"
        if strategy == "cdf":
            state.survival[rows] = state.survival[rows] * (1 - torch.sigmoid(q.float()))
            return PassSignals(confidence=q, survival=state.survival[rows])
        if strategy == "convergence":  # on the confidence feature: the token the next prediction is made at
            new_f = self.confidence_feature(h_new, sub).float()
            old_f = self.confidence_feature(h_old, sub).float()
            rel = (new_f - old_f).norm(dim=-1) / old_f.norm(dim=-1).clamp_min(1e-12)
            return PassSignals(confidence=q, rel_change=rel)
        if strategy in ("kl", "argmax"):
            kl, stable = self._distribution_change(state, k, rows, self.next_token_log_probs(h_new, sub))
            return PassSignals(confidence=q, kl=kl, stable_passes=stable)
        return PassSignals(confidence=q)

    @staticmethod
    def _distribution_change(
        state: _LoopState, k: int, rows: torch.Tensor, log_probs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``KL(p_{k-1} || p_k)`` (b,) and the passes the top token has stayed the same (b,), from the
        rows' next-token log-probabilities ``log_probs`` (b, V) after pass ``k``; keeps them for pass k+1."""
        if k == 1:  # every row runs pass 1: nothing to compare with yet
            state.log_probs = log_probs.clone()
            state.stable = torch.zeros(log_probs.shape[0], dtype=torch.long, device=log_probs.device)
            return torch.full_like(log_probs[:, 0], float("nan")), state.stable.clone()
        previous = state.log_probs[rows]
        kl = F.kl_div(log_probs, previous, reduction="none", log_target=True).sum(dim=-1)
        same = previous.argmax(dim=-1) == log_probs.argmax(dim=-1)
        stable = torch.where(same, state.stable[rows] + 1, torch.zeros_like(state.stable[rows]))
        state.log_probs[rows] = log_probs
        state.stable[rows] = stable
        return kl, stable

    # -- forward and generation
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: LoopusCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        num_loops: int | None = None,
        exit_strategy: str | None = None,
        exit_threshold: float | None = None,
        min_loops: int | None = None,
        max_loops: int | None = None,
        convergence_tol: float | None = None,
        kl_threshold: float | None = None,
        argmax_patience: int | None = None,
        kv_strategy: str | None = None,
        exit_depths: torch.LongTensor | None = None,
        logits_to_keep: int = 0,
        past_key_values: LoopusCache | None = None,
        **kwargs,
    ) -> LoopusCausalLMOutput:
        """Logits (B, T, V) after ``num_loops`` passes (default ``config.num_loops``), or fewer per sequence
        under an exit strategy (then at most ``max_loops``, default ``num_loops``); see :meth:`run_loop`.
        Every loop, exit and KV setting left ``None`` is the config's (:class:`ExitSettings`)."""
        settings = ExitSettings.resolve(
            self.config,
            num_loops=num_loops,
            exit_strategy=exit_strategy,
            exit_threshold=exit_threshold,
            min_loops=min_loops,
            max_loops=max_loops,
            convergence_tol=convergence_tol,
            kl_threshold=kl_threshold,
            argmax_patience=argmax_patience,
            kv_strategy=kv_strategy,
        )
        cache = cache if cache is not None else past_key_values
        cache, temporary_cache = self._cache_for_call(settings, cache, use_cache, exit_depths)
        ctx = self.prepare(input_ids, attention_mask, position_ids, cache, inputs_embeds)
        if cache is not None:
            cache.begin_step(ctx.inputs_embeds.shape[1])
            if cache.get_seq_length() == 0:
                cache.loop_record = []
                self.loop_record = cache.loop_record
        h = self.encode(ctx)
        h, loops_used, confidence = self.run_loop(h, ctx, settings, exit_depths)
        logits = self.decode(h, ctx, logits_to_keep)
        if cache is not None:
            cache.end_step()
            cache.loop_record.append(loops_used.detach().cpu())
        loss = None
        if labels is not None:
            vocab = self.config.vocab_size
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=vocab, **kwargs)
        return LoopusCausalLMOutput(
            loss=loss,
            logits=logits,
            cache=None if temporary_cache else cache,
            loops_used=loops_used,
            confidence=confidence,
        )

    def _cache_for_call(
        self,
        settings: ExitSettings,
        cache: LoopusCache | None,
        use_cache: bool | None,
        exit_depths: torch.Tensor | None,
    ) -> tuple[LoopusCache | None, bool]:
        """The call's cache and whether it is temporary (not returned). Without a cache a call runs one chunk,
        where ``full`` and ``last`` need none; ``first`` (the first pass's K/V for all passes) and fixed
        ``exit_depths`` (propagated K/V) need one even then."""
        if use_cache is None:
            use_cache = cache is not None
        temporary = False
        if cache is None and (use_cache or exit_depths is not None or settings.kv_strategy == "first"):
            cache = LoopusCache(self.loop_range)
            temporary = not use_cache
        if cache is not None:
            cache.use_strategy(settings.kv_strategy)
        return cache, temporary

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs) -> None:
        """``generate`` gets a :class:`LoopusCache` (its KV strategy: the first call's) unless given one."""
        if model_kwargs.get("cache") is not None or model_kwargs.get("past_key_values") is not None:
            return
        if generation_config.use_cache is False:
            return
        model_kwargs["cache"] = LoopusCache(self.loop_range)


__all__ = [
    "ExitSettings",
    "LoopusCache",
    "LoopusConfig",
    "LoopusForCausalLM",
    "LoopusPreTrainedModel",
    "PassSignals",
    "SelectiveGate",
    "ConfidenceHead",
    "make_gate",
    "stop_rule",
]

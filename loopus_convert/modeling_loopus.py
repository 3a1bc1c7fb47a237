"""The looped (LoopUS) causal LM: encoder -> loop block run K times under a selective gate -> decoder.

Reads top to bottom in the order the data flows:

1. family table: where each supported base family keeps its embeddings, layers, norm and lm_head;
2. ``SelectiveGate`` (shared by all passes) and ``ConfidenceHead`` (LayerNorm + Linear);
3. ``LoopusCache``: one KV slot per (loop pass, layer); tokens that stop looping propagate their K/V;
4. ``LoopusContext``: what ``prepare`` computes once per call (embeddings, masks, position embeddings);
5. ``LoopusForCausalLM``: ``prepare -> encode -> loop_step x K -> decode``, early exit, ``generate``.

The base model's own modules are reused and keep their attribute names, so the weights file reads like the
base model's (``model.layers.3.self_attn.q_proj.weight``) plus ``gate.*`` and ``confidence_head.*``.
Self-contained (torch and transformers only): this file is copied next to every looped checkpoint.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import ModelOutput

from .configuration_loopus import LoopusConfig, check_exit_settings

# ------------------------------------------------------------------------------------------ family table


@dataclass(frozen=True)
class _Family:
    """Attribute paths of one family, from its ``*ForCausalLM`` object."""

    backbone: str
    embed: str
    layers: str
    norm: str
    lm_head: str = "lm_head"
    position_embed: str | None = None  # learned absolute positions (GPT-2)
    rotary: str | None = "rotary_emb"
    dropout: str | None = None  # embedding dropout module (identity in eval)
    cache_kwarg: str = "cache"  # the keyword a decoder layer takes its KV cache under


_LLAMA_LIKE = _Family(backbone="model", embed="embed_tokens", layers="layers", norm="norm")
FAMILIES: dict[str, _Family] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    "gpt_neox": _Family(
        backbone="gpt_neox",
        embed="embed_in",
        layers="layers",
        norm="final_layer_norm",
        dropout="emb_dropout",
        cache_kwarg="layer_past",
    ),
    "gpt2": _Family(
        backbone="transformer",
        embed="wte",
        layers="h",
        norm="ln_f",
        position_embed="wpe",
        rotary=None,
        dropout="drop",
    ),
}


def family_of(base_config) -> _Family:
    """The family entry of a base config; ``ValueError`` listing the supported ones otherwise."""
    model_type = getattr(base_config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"model family '{model_type}' is not supported; supported: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def layer_types(base_config) -> list[str]:
    """Attention type of every decoder layer: ``full_attention`` or ``sliding_attention``."""
    types = getattr(base_config, "layer_types", None)
    if types is not None:
        return list(types)
    sliding = getattr(base_config, "sliding_window", None) is not None and base_config.model_type in (
        "mistral",
        "phi3",
    )
    return ["sliding_attention" if sliding else "full_attention"] * base_config.num_hidden_layers


# ------------------------------------------------------------------------------------------ gate and head


class SelectiveGate(nn.Module):
    """Input-dependent per-token, per-channel mix of the loop block's output ``u`` with its input ``h_old``.

    ``x = u - h_old``; ``delta = softplus(W_dt (W_in x) + b_dt)``; ``Abar = exp(-delta * exp(A_log))``;
    ``h_new = Abar * u + (1 - Abar) * h_old``. ``W_in``: (r, D) no bias, ``W_dt``: (D, r) with bias.
    """

    IDENTITY_DELTA = 1e-8  # delta * exp(A_log) at identity init: Abar = exp(-1e-8) rounds to 1.0 in fp32

    def __init__(self, hidden_size: int, rank: int) -> None:
        super().__init__()
        self.A_log = nn.Parameter(torch.zeros(hidden_size))
        self.dt_input_proj = nn.Linear(hidden_size, rank, bias=False)
        self.delta_proj = nn.Linear(rank, hidden_size, bias=True)

    def forward(self, u: torch.Tensor, h_old: torch.Tensor) -> torch.Tensor:
        delta = F.softplus(self.delta_proj(self.dt_input_proj(u - h_old)))  # (B, T, D)
        a_bar = torch.exp(-delta * torch.exp(self.A_log))  # (B, T, D) in (0, 1]
        return a_bar * u + (1 - a_bar) * h_old

    def reset(self, mode: str) -> None:
        """``identity``: Abar == 1 to fp32 rounding (one loop = the base model) with gradients still flowing
        (d out / d b_dt ~ 1e-8, not 0). ``official``: S4D-real ``A_log = log(1..D)``, dt log-uniform in
        [1e-3, 1e-1] as the softplus bias, Mamba's uniform init of ``W_dt``."""
        hidden, rank = self.delta_proj.out_features, self.delta_proj.in_features
        init.normal_(self.dt_input_proj.weight, mean=0.0, std=hidden**-0.5)
        if mode == "identity":
            init.zeros_(self.A_log)
            init.zeros_(self.delta_proj.weight)
            init.constant_(self.delta_proj.bias, math.log(math.expm1(self.IDENTITY_DELTA)))
        elif mode == "official":
            init.copy_(self.A_log, torch.log(torch.arange(1, hidden + 1, dtype=torch.float32)))
            init.uniform_(self.delta_proj.weight, -(rank**-0.5), rank**-0.5)
            dt = torch.exp(torch.rand(hidden) * (math.log(1e-1) - math.log(1e-3)) + math.log(1e-3))
            init.copy_(self.delta_proj.bias, dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        else:
            raise ValueError(f"gate_init {mode!r} is not one of identity, official")


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
    """KV cache with one slot per (loop pass, layer) for loop-block layers, one per layer elsewhere.

    The same layers produce different K/V at each pass, so pass ``k`` of loop layer ``j`` has its own slot.
    Every slot always covers every token: a token that stops looping after pass ``e`` has its pass-``e`` K/V
    copied into the slots of the deeper passes (:meth:`propagate`), so later tokens that loop deeper still
    see a complete history. During a pass only the still-active rows run; their updates write only the
    tokens still looping (``token_active``), the others keep their propagated K/V.

    Step protocol (driven by :class:`LoopusForCausalLM`): ``begin_step(n)`` -> layer updates with
    ``pass_index`` / ``rows`` / ``token_active`` set per pass -> ``propagate`` -> ``end_step()``.
    """

    def __init__(self, loop_layers: range) -> None:
        super().__init__(layers=[])
        self.loop_layers = loop_layers
        self.slots: dict[tuple[int, int], list[torch.Tensor]] = {}  # (pass or 0, layer) -> [K, V] (B,H,S,Dh)
        self.seq_length = 0  # committed tokens
        self.new_tokens = 0  # tokens of the step in progress
        self.num_passes = 0  # loop passes every slot set holds
        self.pass_index = 0  # current loop pass (1-based); 0 outside the loop block
        self.rows: torch.Tensor | None = None  # active batch rows of the current pass, None = all
        self.token_active: torch.Tensor | None = None  # (b_active, n) tokens still looping, None = all
        self.loop_record: list[torch.Tensor] = []  # loops used per row, one (B,) entry per step

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

    # -- the step protocol
    def reserve_passes(self, passes: int) -> None:
        """Make room for ``passes`` loop passes; a later step cannot go deeper than the first one did."""
        if passes > self.num_passes:
            if self.seq_length > 0:
                raise ValueError(
                    f"this cache holds {self.num_passes} loop passes of history; a step cannot run {passes} "
                    "(start a new cache, or keep num_loops / max_loops fixed during a generation)"
                )
            self.num_passes = passes

    def begin_step(self, new_tokens: int) -> None:
        self.new_tokens = new_tokens
        self.pass_index, self.rows, self.token_active = 0, None, None

    def end_step(self) -> None:
        self.seq_length += self.new_tokens
        self.new_tokens = 0
        self.pass_index, self.rows, self.token_active = 0, None, None

    def _slot_key(self, layer_idx: int) -> tuple[int, int]:
        return (self.pass_index if layer_idx in self.loop_layers else 0, layer_idx)

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

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        slot = self._slot_key(layer_idx)
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
        if self.rows is None:
            return kv[0], kv[1]
        return kv[0][self.rows], kv[1][self.rows]

    def _batch(self) -> int:
        if self.slots:
            return next(iter(self.slots.values()))[0].shape[0]
        raise RuntimeError("LoopusCache: a row subset before any full-batch update")

    def propagate(self, exit_pass: int, frozen: torch.Tensor) -> None:
        """Copy pass ``exit_pass``'s K/V of the tokens that just stopped (``frozen``: (B, n) bool) into the
        slots of every deeper pass, for every loop layer."""
        if exit_pass >= self.num_passes or not bool(frozen.any()):
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


def _select_rows(value, rows: torch.Tensor, batch: int):
    """Index the batch dimension of tensors (also inside tuples / dicts); size-1 batches broadcast."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return (
            value.index_select(0, rows)
            if value.dim() > 0 and value.shape[0] == batch and batch > 1
            else value
        )
    if isinstance(value, tuple):
        return tuple(_select_rows(v, rows, batch) for v in value)
    if isinstance(value, list):
        return [_select_rows(v, rows, batch) for v in value]
    if isinstance(value, dict):
        return {k: _select_rows(v, rows, batch) for k, v in value.items()}
    return value


@dataclass
class LoopusContext:
    """What every layer of one call needs, computed once by :meth:`LoopusForCausalLM.prepare`."""

    inputs_embeds: torch.Tensor  # (B, T, D) embeddings (+ learned positions for GPT-2)
    attention_mask: torch.Tensor | None  # (B, S) 2D padding mask over past + new tokens, or None
    position_ids: torch.Tensor  # (B or 1, T)
    masks: dict[str, object]  # layer type -> attention mask for that type (tensor, or None for sdpa causal)
    position_embeddings: dict[str, object]  # layer type -> (cos, sin), or empty (GPT-2)
    cache: LoopusCache | None = None
    passes_done: int = 0  # loop passes applied so far in this call
    batch: int = field(default=0)

    def select(self, rows: torch.Tensor) -> LoopusContext:
        """The context of a subset of batch rows (for the rows still looping)."""
        b = self.batch
        return replace(
            self,
            inputs_embeds=self.inputs_embeds.index_select(0, rows),
            attention_mask=_select_rows(self.attention_mask, rows, b),
            position_ids=_select_rows(self.position_ids, rows, b),
            masks=_select_rows(self.masks, rows, b),
            position_embeddings=_select_rows(self.position_embeddings, rows, b),
            batch=int(rows.numel()),
        )


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
            module.reset(self.config.gate_init)
        elif isinstance(module, ConfidenceHead):
            module.reset()
        else:
            super()._init_weights(module)


class LoopusForCausalLM(LoopusPreTrainedModel, GenerationMixin):
    """A base causal LM's layers run as encoder ``[0, A)`` -> loop block ``[A, B)`` x K -> decoder ``[B, L)``.

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
        self.family = family_of(base_config)
        base_config._attn_implementation = config._attn_implementation
        base = AutoModelForCausalLM.from_config(base_config)
        # The base's own modules under their own names: the checkpoint reads like the base's.
        self.add_module(self.family.backbone, getattr(base, self.family.backbone))
        self.lm_head = getattr(base, self.family.lm_head)
        self.gate = SelectiveGate(config.hidden_size, config.gate_rank)
        self.confidence_head = ConfidenceHead(config.hidden_size)
        if config.tie_word_embeddings:
            self._tied_weights_keys = {"lm_head.weight": f"{self.family.backbone}.{self.family.embed}.weight"}
        self._layer_types = layer_types(base_config)
        rotary = self._part(self.family.rotary)
        self._rotary_per_type = (
            rotary is not None and "layer_type" in inspect.signature(rotary.forward).parameters
        )
        self.loop_record: list[torch.Tensor] = []
        self.post_init()

    # -- parts
    @property
    def base_config(self):
        return self.config.base_config

    @property
    def backbone(self) -> nn.Module:
        return getattr(self, self.family.backbone)

    def _part(self, name: str | None) -> nn.Module | None:
        return getattr(self.backbone, name) if name else None

    @property
    def layers(self) -> nn.ModuleList:
        return self._part(self.family.layers)

    @property
    def loop_range(self) -> range:
        return range(self.config.split_start, self.config.split_end)

    def get_input_embeddings(self) -> nn.Module:
        return self._part(self.family.embed)

    def set_input_embeddings(self, value: nn.Module) -> None:
        setattr(self.backbone, self.family.embed, value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def encoder_modules(self) -> list[nn.Module]:
        """Embeddings (and learned positions) and the encoder layers ``[0, A)``."""
        mods = [self._part(self.family.embed)]
        if self.family.position_embed:
            mods.append(self._part(self.family.position_embed))
        return mods + [self.layers[i] for i in range(self.config.split_start)]

    def loop_modules(self) -> list[nn.Module]:
        """The loop-block layers ``[A, B)`` and the selective gate."""
        return [self.layers[i] for i in self.loop_range] + [self.gate]

    def decoder_modules(self) -> list[nn.Module]:
        """The decoder layers ``[B, L)``, the final norm and the lm_head."""
        mods = [self.layers[i] for i in range(self.config.split_end, self.config.num_base_layers)]
        return mods + [self._part(self.family.norm), self.lm_head]

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs) -> None:
        """Checkpoint every decoder layer (encoder, loop block and decoder alike): their activations are
        recomputed in the backward pass."""
        self._activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    # -- the four stages
    def prepare(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: LoopusCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> LoopusContext:
        """Embeddings, causal mask(s) per layer type and position embeddings, as the base builds them."""
        base = self.base_config
        if inputs_embeds is None:
            inputs_embeds = self._part(self.family.embed)(input_ids)  # (B, T, D); Gemma scales inside
        batch, length = inputs_embeds.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=inputs_embeds.device).unsqueeze(0)
        if self.family.position_embed:
            inputs_embeds = inputs_embeds + self._part(self.family.position_embed)(position_ids)
        if self.family.dropout:
            inputs_embeds = self._part(self.family.dropout)(inputs_embeds)
        mask_kwargs = dict(
            config=base,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        masks: dict[str, object] = {}
        for kind in set(self._layer_types):
            make = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
            masks[kind] = make(**mask_kwargs)
        position_embeddings: dict[str, object] = {}
        rotary = self._part(self.family.rotary)
        if rotary is not None:
            for kind in set(self._layer_types):
                if self._rotary_per_type:
                    position_embeddings[kind] = rotary(inputs_embeds, position_ids, kind)
                else:
                    position_embeddings[kind] = position_embeddings.get("_") or rotary(
                        inputs_embeds, position_ids
                    )
                    position_embeddings["_"] = position_embeddings[kind]
            position_embeddings.pop("_", None)
        if cache is not None:
            cache.begin_step(length)
        return LoopusContext(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            masks=masks,
            position_embeddings=position_embeddings,
            cache=cache,
            batch=batch,
        )

    def _run_layers(self, h: torch.Tensor, ctx: LoopusContext, indices: range) -> torch.Tensor:
        for i in indices:
            kind = self._layer_types[i]
            kwargs = {
                "attention_mask": ctx.masks[kind],
                "position_ids": ctx.position_ids,
                self.family.cache_kwarg: ctx.cache,
                "use_cache": ctx.cache is not None,
            }
            if kind in ctx.position_embeddings:
                kwargs["position_embeddings"] = ctx.position_embeddings[kind]
            h = self.layers[i](h, **kwargs)  # (B, T, D)
            if isinstance(h, tuple):
                h = h[0]
        return h

    def encode(self, ctx: LoopusContext) -> torch.Tensor:
        """The state ``h0`` (B, T, D) after the encoder layers ``[0, A)``."""
        if ctx.cache is not None:
            ctx.cache.pass_index = 0
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
        cache = ctx.cache
        if cache is not None:
            cache.pass_index, cache.rows, cache.token_active = 0, None, None
        h = self._run_layers(h, ctx, range(self.config.split_end, self.config.num_base_layers))
        h = self._part(self.family.norm)(h)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        softcap = getattr(self.base_config, "final_logit_softcapping", None)
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        if cache is not None:
            cache.end_step()
        return logits

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
    def run_loop(  # noqa: C901  (split into small steps on the kv branch, issue 12)
        self,
        h: torch.Tensor,
        ctx: LoopusContext,
        passes: int,
        strategy: str = "none",
        threshold: float = 0.9,
        min_loops: int = 1,
        tol: float = 1e-3,
        exit_depths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Up to ``passes`` loop passes; sequences that exit leave the batch (their state is kept).

        ``exit_depths`` (B, T), if given, fixes the passes of every token instead (a token with depth ``d``
        runs passes 1..d; at deeper passes its K/V is its pass-``d`` K/V): the uncached recomputation of an
        early-exit generation. Returns the final state (B, T, D), the loops used (B,) and the confidence
        logits (B, passes) (NaN where a sequence did not run).
        """
        batch, length = h.shape[:2]
        cache = ctx.cache
        if cache is not None:
            cache.reserve_passes(passes)
        frozen = torch.zeros(batch, length, dtype=torch.bool, device=h.device)  # tokens that stopped looping
        loops_used = torch.zeros(batch, dtype=torch.long, device=h.device)
        confidence = torch.full((batch, passes), float("nan"), device=h.device, dtype=torch.float32)
        survive = torch.ones(batch, dtype=torch.float32, device=h.device)  # cdf: prod_j (1 - sigmoid(q_j))
        depths = exit_depths.to(h.device).clamp(min=1) if exit_depths is not None else None
        for k in range(1, passes + 1):
            active = ~frozen  # (B, T)
            row_active = active.any(dim=1)
            if not bool(row_active.any()):
                break
            everyone = bool(row_active.all())
            rows = row_active.nonzero().squeeze(1)
            sub = ctx if everyone else ctx.select(rows)
            sub.passes_done = k - 1
            tokens = active if everyone else active.index_select(0, rows)
            tokens = None if bool(tokens.all()) else tokens
            h_old = h if everyone else h.index_select(0, rows)
            if cache is not None:
                cache.rows, cache.token_active = (None if everyone else rows), tokens
            h_new = self.loop_step(h_old, sub)  # (b, T, D)
            if tokens is not None:
                h_new = torch.where(tokens[..., None], h_new, h_old)
            h = h_new if everyone else h.index_copy(0, rows, h_new)
            loops_used[rows] = k
            q = self.confidence_logit(h_new, sub)  # (b,)
            confidence[rows, k - 1] = q.float()
            if depths is not None:
                stop_tokens = active & (depths <= k)
            else:
                if strategy == "none" or k < min_loops:
                    stop = torch.zeros_like(q, dtype=torch.bool)
                elif strategy == "threshold":
                    stop = torch.sigmoid(q.float()) > threshold
                elif strategy == "cdf":
                    survive[rows] = survive[rows] * (1 - torch.sigmoid(q.float()))
                    stop = (1 - survive[rows]) > threshold
                else:  # convergence, on the confidence feature (the token the next prediction is made at)
                    new_f = self.confidence_feature(h_new, sub).float()
                    old_f = self.confidence_feature(h_old, sub).float()
                    rel = (new_f - old_f).norm(dim=-1) / old_f.norm(dim=-1).clamp_min(1e-12)
                    stop = rel < tol
                stop_rows = torch.zeros(batch, dtype=torch.bool, device=h.device)
                stop_rows[rows] = stop
                stop_tokens = active & stop_rows[:, None]
            if k == passes:
                stop_tokens = active
            frozen = frozen | stop_tokens
            if cache is not None:
                cache.propagate(k, stop_tokens)
        if cache is not None:
            cache.pass_index, cache.rows, cache.token_active = 0, None, None
        return h, loops_used, confidence

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
        exit_depths: torch.LongTensor | None = None,
        logits_to_keep: int = 0,
        past_key_values: LoopusCache | None = None,
        **kwargs,
    ) -> LoopusCausalLMOutput:
        """Logits (B, T, V) after ``num_loops`` passes (default ``config.num_loops``), or fewer per sequence
        under an exit strategy (then at most ``max_loops``, default ``num_loops``); see :meth:`run_loop`.
        An ``exit_threshold`` passed without a strategy while the config says ``none`` means ``threshold``."""
        cfg = self.config
        cache = cache if cache is not None else past_key_values
        # lm-eval's Python API parses "none" in --model_args as None
        strategy = exit_strategy if exit_strategy is not None else (cfg.exit_strategy or "none")
        if exit_strategy is None and exit_threshold is not None and strategy == "none":
            strategy = "threshold"  # a threshold given alone (e.g. lm-eval --gen_kwargs) means this strategy
        num_loops = num_loops if num_loops is not None else cfg.num_loops
        threshold = exit_threshold if exit_threshold is not None else cfg.exit_threshold
        min_loops = min_loops if min_loops is not None else cfg.min_loops
        max_loops = max_loops if max_loops is not None else cfg.max_loops
        tol = convergence_tol if convergence_tol is not None else cfg.convergence_tol
        if num_loops < 1:
            raise ValueError(f"num_loops must be >= 1, got {num_loops}")
        check_exit_settings(strategy, threshold, min_loops, max_loops, tol)
        passes = num_loops if strategy == "none" else (max_loops if max_loops is not None else num_loops)
        if exit_depths is not None:
            passes = max(passes, int(exit_depths.max()))
        if use_cache is None:
            use_cache = cache is not None
        temporary_cache = False
        if cache is None and (use_cache or exit_depths is not None):
            cache = LoopusCache(self.loop_range)
            temporary_cache = not use_cache
        ctx = self.prepare(input_ids, attention_mask, position_ids, cache, inputs_embeds)
        if cache is not None and cache.get_seq_length() == 0:
            cache.loop_record = []
            self.loop_record = cache.loop_record
        h = self.encode(ctx)
        h, loops_used, confidence = self.run_loop(
            h, ctx, passes, strategy, threshold, min_loops, tol, exit_depths
        )
        logits = self.decode(h, ctx, logits_to_keep)
        if cache is not None:
            cache.loop_record.append(loops_used.detach().cpu())
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=cfg.vocab_size, **kwargs)
        return LoopusCausalLMOutput(
            loss=loss,
            logits=logits,
            cache=None if temporary_cache else cache,
            loops_used=loops_used,
            confidence=confidence,
        )

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs) -> None:
        """``generate`` gets a :class:`LoopusCache` (one slot per loop pass and layer) unless given one."""
        if model_kwargs.get("cache") is not None or model_kwargs.get("past_key_values") is not None:
            return
        if generation_config.use_cache is False:
            return
        model_kwargs["cache"] = LoopusCache(self.loop_range)


__all__ = [
    "LoopusCache",
    "LoopusConfig",
    "LoopusForCausalLM",
    "LoopusPreTrainedModel",
    "SelectiveGate",
    "ConfidenceHead",
]

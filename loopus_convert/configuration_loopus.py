"""Configuration of a looped (LoopUS) causal LM: the base config plus the split, loop and exit settings.

Self-contained (torch and transformers only): this file is copied next to every looped checkpoint so that
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works without loopus installed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

GATE_INIT_HELP = {  # the gate's forms and initial values, described once (the CLI help reads this)
    "residual": "lossless at 1 loop, learns from the first update",
    "identity": "lossless, but the gate stays frozen in training",
    "official": "the paper's init, not lossless",
}
GATE_INITS = tuple(GATE_INIT_HELP)
DEFAULT_GATE_INIT = "residual"  # what `loopus convert` uses; a config without gate_init means "identity"
EXIT_STRATEGIES = ("none", "threshold", "cdf", "convergence", "kl", "argmax")
KV_STRATEGIES = ("full", "last", "first")


class LoopusConfig(PreTrainedConfig):
    """A decoder split into encoder ``layers[0:A]``, loop block ``layers[A:B]``, decoder ``layers[B:L]``.

    Args:
        base_config: the base model's config (object or dict); its modules are reused as they are.
        split_start, split_end: ``A`` and ``B`` of the split ``A:B`` (a Python slice of the decoder layers).
        num_loops: default number of loop passes ``K`` (forward / generate take ``num_loops`` to override it).
        gate_rank: rank ``r`` of the selective gate's low-rank input path; ``None`` means ``ceil(D / 16)``.
        gate_init: the selective gate's form and initial values: ``"residual"`` (one loop = the base model,
            and the gate learns from the first update), ``"identity"`` (one loop = the base model, but the
            gate is frozen in practice: its gradients are ~1e-8) or ``"official"`` (the paper's S4D init, not
            lossless). ``identity`` and ``official`` use the official gate ``exp(-softplus(.) * exp(A_log))``;
            see ``SelectiveGate``. The field's default is ``"identity"``, what checkpoints written before
            ``residual`` existed mean.
        exit_strategy: ``"none"`` (always ``num_loops``); with the confidence head: ``"threshold"``
            (stop when ``sigmoid(q) > tau``), ``"cdf"`` (stop when ``1 - prod_j (1 - sigmoid(q_j)) > tau``);
            zero-shot (no trained head): ``"convergence"`` (stop when ``||h_k - h_{k-1}|| / ||h_{k-1}|| <
            convergence_tol``), ``"kl"`` (stop when ``KL(p_{k-1} || p_k) < kl_threshold``, ``p_k`` the
            next-token distribution after pass ``k``) or ``"argmax"`` (stop when the top next token has not
            changed for ``argmax_patience`` passes).
        exit_threshold: ``tau`` of the threshold and cdf strategies, in (0, 1).
        min_loops: no sequence exits before this many passes.
        max_loops: the most passes an early-exit run may take; ``None`` means ``num_loops``.
        convergence_tol: relative tolerance of the convergence strategy, > 0.
        kl_threshold: KL (nats) below which the kl strategy stops, > 0 (Huginn's default 5e-4).
        argmax_patience: passes the top token must stay the same for the argmax strategy, >= 1.
        kv_strategy: the loop block's KV cache in generation: ``"full"`` (one slot per loop pass and layer,
            exact), ``"last"`` (one slot per layer, overwritten by each pass: the base model's memory) or
            ``"first"`` (one slot per layer holding the first pass's K/V, which every later pass attends to).
    """

    model_type = "loopus"
    sub_configs_defaults = {
        "base_config": SubConfigSpec(config_class=AutoConfig, model_type="llama", optional=True),
    }

    base_config: PreTrainedConfig | dict[str, Any] | None = None
    split_start: int = 0
    split_end: int = 1
    num_loops: int = 1
    gate_rank: int | None = None
    gate_init: str = "identity"
    exit_strategy: str = "none"
    exit_threshold: float | int = 0.9
    min_loops: int = 1
    max_loops: int | None = None
    convergence_tol: float | int = 1e-3
    kl_threshold: float | int = 5e-4
    argmax_patience: int = 2
    kv_strategy: str = "full"
    # mirrored from the base config (generation and weight tying read them here)
    vocab_size: int | None = None
    hidden_size: int | None = None
    max_position_embeddings: int | None = None
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        base = self.base_config
        if base is None:  # the bare LoopusConfig() that transformers builds to find default values
            return
        self.vocab_size = base.vocab_size
        self.hidden_size = base.hidden_size
        self.max_position_embeddings = base_context_length(base)
        self.tie_word_embeddings = bool(getattr(base, "tie_word_embeddings", False))
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if getattr(self, name) is None:
                setattr(self, name, getattr(base, name, None))
        if self.gate_rank is None:
            self.gate_rank = math.ceil(self.hidden_size / 16)
        self.check()

    @property
    def num_base_layers(self) -> int:
        """``L``, the base model's number of decoder layers."""
        return self.base_config.num_hidden_layers

    def check(self) -> None:
        """Raise ``ValueError`` naming the field, the bad value and the allowed range."""
        num_layers = self.num_base_layers
        if not 0 <= self.split_start < self.split_end <= num_layers:
            raise ValueError(
                f"split {self.split_start}:{self.split_end} is out of range for a model with {num_layers} "
                f"layers: "
                f"need 0 <= A < B <= {num_layers}"
            )
        check_gate_init(self.gate_init)
        ExitSettings.resolve(self)  # the loop, exit and KV settings (validated there)


@dataclass(frozen=True)
class ExitSettings:
    """The loop, early-exit and KV-cache settings of one call, resolved once and validated.

    Each field is the config attribute of the same name unless the call overrides it (a keyword that is not
    ``None``). Read from the config at call time, never cached: lm-eval and users set config attributes
    after ``from_pretrained``. Construction raises ``ValueError`` naming the field, the bad value and the
    allowed range.
    """

    num_loops: int
    exit_strategy: str
    exit_threshold: float
    min_loops: int
    max_loops: int | None
    convergence_tol: float
    kl_threshold: float
    argmax_patience: int
    kv_strategy: str

    @classmethod
    def resolve(cls, config: LoopusConfig, **overrides: Any) -> ExitSettings:
        """The config's settings with the non-``None`` keyword overrides applied."""
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"unknown loop settings: {', '.join(sorted(unknown))}")
        values = {
            f.name: overrides[f.name] if overrides.get(f.name) is not None else getattr(config, f.name)
            for f in fields(cls)
        }
        if values["exit_strategy"] is None:  # lm-eval's Python API parses "none" in --model_args as None
            values["exit_strategy"] = "none"
        if overrides.get("exit_strategy") is None and overrides.get("exit_threshold") is not None and (
            values["exit_strategy"] == "none"
        ):  # a threshold given alone (e.g. lm-eval --gen_kwargs exit_threshold=...) means this strategy
            values["exit_strategy"] = "threshold"
        return cls(**values)

    def __post_init__(self) -> None:
        _check_int("num_loops", self.num_loops, 1)
        _check_choice("exit_strategy", self.exit_strategy, EXIT_STRATEGIES)
        _check_number("exit_threshold", self.exit_threshold, 0.0, 1.0, "in (0, 1)")
        _check_int("min_loops", self.min_loops, 1)
        if self.max_loops is not None:
            _check_int("max_loops", self.max_loops, self.min_loops, f">= min_loops ({self.min_loops})")
        _check_number("convergence_tol", self.convergence_tol, 0.0, math.inf, "> 0")
        _check_number("kl_threshold", self.kl_threshold, 0.0, math.inf, "> 0")
        _check_int("argmax_patience", self.argmax_patience, 1)
        _check_choice("kv_strategy", self.kv_strategy, KV_STRATEGIES)

    @property
    def passes(self) -> int:
        """The most loop passes of a run: ``num_loops``, or ``max_loops`` (default ``num_loops``) under an
        exit strategy."""
        if self.exit_strategy == "none":
            return self.num_loops
        return self.max_loops if self.max_loops is not None else self.num_loops


def _check_int(name: str, value: Any, low: int, allowed: str | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer {allowed or f'>= {low}'}, got {value!r}")


def _check_number(name: str, value: Any, low: float, high: float, allowed: str) -> None:
    """A real number in the open interval (low, high)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value < high:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} {value!r} is not one of {', '.join(allowed)}")


def check_gate_init(gate_init: str) -> None:
    """``ValueError`` unless ``gate_init`` is one of :data:`GATE_INITS`."""
    if gate_init not in GATE_INITS:
        raise ValueError(f"gate_init {gate_init!r} is not one of {', '.join(GATE_INITS)}")


def base_context_length(base: PreTrainedConfig) -> int | None:
    """The base model's context limit (``max_position_embeddings``, ``n_positions`` for GPT-2)."""
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(base, name, None)
        if value is not None:
            return int(value)
    return None

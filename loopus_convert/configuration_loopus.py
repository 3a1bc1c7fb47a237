"""Configuration of a looped (LoopUS) causal LM: the base config plus the split, loop and exit settings.

Self-contained (torch and transformers only): this file is copied next to every looped checkpoint so that
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works without loopus installed.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

GATE_INITS = ("residual", "identity", "official")
DEFAULT_GATE_INIT = "residual"  # what `loopus convert` uses; a config without gate_init means "identity"
EXIT_STRATEGIES = ("none", "threshold", "cdf", "convergence")


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
        exit_strategy: ``"none"`` (always ``num_loops``), ``"threshold"`` (stop when ``sigmoid(q) > tau``),
            ``"cdf"`` (stop when ``1 - prod_j (1 - sigmoid(q_j)) > tau``) or ``"convergence"`` (stop when
            ``||h_k - h_{k-1}|| / ||h_{k-1}|| < convergence_tol``).
        exit_threshold: ``tau`` of the threshold and cdf strategies, in (0, 1).
        min_loops: no sequence exits before this many passes.
        max_loops: the most passes an early-exit run may take; ``None`` means ``num_loops``.
        convergence_tol: relative tolerance of the convergence strategy.
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

    @property
    def max_passes(self) -> int:
        """The most loop passes a run with this config's exit settings takes."""
        if self.exit_strategy == "none":
            return self.num_loops
        return self.max_loops if self.max_loops is not None else self.num_loops

    def check(self) -> None:
        """Raise ``ValueError`` naming the field, the bad value and the allowed range."""
        num_layers = self.num_base_layers
        if not 0 <= self.split_start < self.split_end <= num_layers:
            raise ValueError(
                f"split {self.split_start}:{self.split_end} is out of range for a model with {num_layers} "
                f"layers: "
                f"need 0 <= A < B <= {num_layers}"
            )
        if self.num_loops < 1:
            raise ValueError(f"num_loops must be >= 1, got {self.num_loops}")
        check_gate_init(self.gate_init)
        check_exit_settings(
            self.exit_strategy, self.exit_threshold, self.min_loops, self.max_loops, self.convergence_tol
        )


def check_gate_init(gate_init: str) -> None:
    """``ValueError`` unless ``gate_init`` is one of :data:`GATE_INITS`."""
    if gate_init not in GATE_INITS:
        raise ValueError(f"gate_init {gate_init!r} is not one of {', '.join(GATE_INITS)}")


def check_exit_settings(
    strategy: str, threshold: float, min_loops: int, max_loops: int | None, tol: float
) -> None:
    """Validate early-exit settings; ``ValueError`` with the field name and the allowed range."""
    if strategy not in EXIT_STRATEGIES:
        raise ValueError(f"exit strategy {strategy!r} is not one of {', '.join(EXIT_STRATEGIES)}")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"exit threshold must be in (0, 1), got {threshold}")
    if min_loops < 1:
        raise ValueError(f"min_loops must be >= 1, got {min_loops}")
    if max_loops is not None and max_loops < min_loops:
        raise ValueError(f"max_loops ({max_loops}) must be >= min_loops ({min_loops})")
    if tol <= 0:
        raise ValueError(f"convergence tolerance must be > 0, got {tol}")


def base_context_length(base: PreTrainedConfig) -> int | None:
    """The base model's context limit (``max_position_embeddings``, ``n_positions`` for GPT-2)."""
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(base, name, None)
        if value is not None:
            return int(value)
    return None

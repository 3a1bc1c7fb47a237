"""Building a looped model: its config from a base config and a split, an empty model to read weights
into, and an in-memory base model wrapped without copying its modules."""

from __future__ import annotations

import torch

from loopus_convert.configuration_loopus import DEFAULT_GATE_INIT, GATE_INITS, LoopusConfig
from loopus_convert.modeling_loopus import LoopusForCausalLM, make_gate
from loopus_core.checks import MAX_LOOPS, check_int
from loopus_core.errors import LoopusError
from loopus_core.models import check_loopable
from loopus_core.runtime import default_dtype
from loopus_core.split import LayerSplit


def check_loop_settings(num_loops: int, gate_init: str) -> None:
    """One-line errors for a bad loop count or gate init."""
    check_int(num_loops, "--loops", 1, MAX_LOOPS)
    if gate_init not in GATE_INITS:
        raise LoopusError(f"--gate-init {gate_init!r} is not one of {', '.join(GATE_INITS)}")


def loopus_config(base_config, split: LayerSplit, num_loops: int, gate_init: str, **extra) -> LoopusConfig:
    """The looped model's config: the base config embedded, the split, loop count, gate init and extras."""
    config = LoopusConfig(
        base_config=base_config.to_dict(),
        split_start=split.start,
        split_end=split.end,
        num_loops=num_loops,
        gate_init=gate_init,
        **extra,
    )
    config.architectures = ["LoopusForCausalLM"]
    return config


def empty_model(config: LoopusConfig, dtype: torch.dtype) -> LoopusForCausalLM:
    """The looped model with uninitialised base parameters (to be read into) and a freshly set gate/head."""
    from transformers.initialization import no_init_weights

    with no_init_weights(), default_dtype(dtype):
        model = LoopusForCausalLM(config)
    model.gate.reset()
    model.confidence_head.reset()
    return model.eval()


def loop_base_model(
    base_model,
    split: LayerSplit | str,
    num_loops: int = 1,
    gate_init: str = DEFAULT_GATE_INIT,
    **exit_settings,
) -> LoopusForCausalLM:
    """Wrap an in-memory base causal LM into a looped model that shares (does not copy) its modules."""
    check_loopable(base_model)
    if isinstance(split, str):
        split = LayerSplit.parse(split, base_model.config.num_hidden_layers)
    check_loop_settings(num_loops, gate_init)
    config = loopus_config(base_model.config, split, num_loops, gate_init, **exit_settings)
    config._attn_implementation = base_model.config._attn_implementation
    with torch.device("meta"):
        model = LoopusForCausalLM(config)
    dtype = next(base_model.parameters()).dtype
    device = next(base_model.parameters()).device
    model.adopt(base_model)
    model.gate = make_gate(config).to(device=device, dtype=dtype)
    model.confidence_head = type(model.confidence_head)(config.hidden_size).to(device=device, dtype=dtype)
    model.gate.reset()
    model.confidence_head.reset()
    return model.eval()

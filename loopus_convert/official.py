"""Import of checkpoints written by the official LoopUS code (``model_type: lds``), logits preserved.

Format (``../shared/METHOD.md``): ``config.json`` with ``base_config_dict``, ``encoder_layer_indices``,
``reasoning_layer_indices``, ``decoder_layer_indices`` (original layer ids), ``N``, ``q_threshold``,
``halting_strategy``, ``convergence_epsilon``; one ``model.safetensors`` with block-local layer numbering
(``encoder.layers.{i}``, ``reasoning.layers.{j}``, ``decoder.layers.{m}``), ``reasoning.gate.*`` and
``q_head.{0,1}.*``; legacy keys ``plateau.*`` mean ``reasoning.*``.
"""

from __future__ import annotations

import json
from pathlib import Path

from loopus_convert.build import check_loop_settings, empty_model, loopus_config
from loopus_convert.checkpoint import read_into
from loopus_convert.configuration_loopus import LoopusConfig
from loopus_convert.modeling_loopus import LoopusForCausalLM
from loopus_core.checks import MAX_LOOPS, check_float, check_int
from loopus_core.errors import LoopusError, first_line
from loopus_core.jsonio import read_json
from loopus_core.models import check_base_model_type, check_loopable_config, model_parts, weights_files
from loopus_core.progress import Progress
from loopus_core.runtime import resolve_dtype
from loopus_core.split import LayerSplit


def is_official_checkpoint(path: Path) -> bool:
    """A directory written by the official LoopUS code (``model_type: lds``)."""
    file = path / "config.json"
    if not file.is_file():
        return False
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(config, dict) and config.get("model_type") == "lds"


def _official_config(path: Path, num_loops: int | None, gate_init: str) -> tuple[LoopusConfig, dict]:
    """Our config for an official checkpoint; every field is checked (a one-line error naming it)."""
    file = path / "config.json"
    raw = read_json(file)
    if not isinstance(raw, dict):
        raise LoopusError(f"{file} is not a JSON object; is this an official LoopUS checkpoint?")
    base_config = _base_config(raw.get("base_config_dict"), file)
    num_layers = base_config.num_hidden_layers
    enc = _indices(raw, "encoder_layer_indices", file, [])
    dec = _indices(raw, "decoder_layer_indices", file, [])
    rest = [i for i in range(num_layers) if i not in enc + dec]
    loop = _indices(raw, "reasoning_layer_indices", file, rest)
    a, b = len(enc), len(enc) + len(loop)
    if enc != list(range(a)) or loop != list(range(a, b)) or dec != list(range(b, num_layers)):
        raise LoopusError(
            f"{path}: encoder {enc}, loop {loop}, decoder {dec} are not consecutive slices of the "
            f"{num_layers} "
            "layers; only A:B splits can be imported"
        )
    split = LayerSplit(a, b, num_layers)
    saved_loops = check_int(raw.get("N", 1), f"{file}: N", 1, MAX_LOOPS)
    loops = num_loops if num_loops is not None else saved_loops
    threshold = check_float(raw.get("q_threshold", 0.9), f"{file}: q_threshold")
    strategy = raw.get("halting_strategy", "threshold")
    if not isinstance(strategy, str):
        raise LoopusError(f"{file}: halting_strategy {strategy!r} is not a string")
    extra: dict = {"max_loops": saved_loops}
    if strategy in ("threshold", "cdf", "convergence") and 0.0 < threshold < 1.0:
        extra.update(exit_strategy=strategy, exit_threshold=threshold)
    else:  # the official code's q_threshold > 1 means "never halt"
        extra.update(exit_strategy="none")
    if raw.get("convergence_epsilon"):
        extra["convergence_tol"] = check_float(
            raw["convergence_epsilon"], f"{file}: convergence_epsilon", 0.0, low_open=True
        )
    check_loop_settings(loops, gate_init)
    return loopus_config(base_config, split, loops, gate_init, **extra), raw


def _base_config(base_dict, file: Path):
    """The base model's transformers config from ``base_config_dict`` (a supported family, checked on the
    dict before anything is built)."""
    from transformers import AutoConfig

    if not isinstance(base_dict, dict) or "model_type" not in base_dict:
        raise LoopusError(f"{file} has no base_config_dict; is this an official LoopUS checkpoint?")
    check_base_model_type(base_dict, file)
    base_dict = {k: v for k, v in base_dict.items() if k not in ("transformers_version", "_name_or_path")}
    try:
        base_config = AutoConfig.for_model(**base_dict)
    except Exception as exc:  # transformers raises many types for a bad config
        raise LoopusError(f"{file}: base_config_dict is not a valid config ({first_line(exc)})") from None
    check_loopable_config(base_config)
    return base_config


def _indices(raw: dict, key: str, file: Path, default: list[int]) -> list[int]:
    """A list of layer indices from the config (``default`` when absent or empty)."""
    value = raw.get(key)
    if not value:
        return list(default)
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise LoopusError(f"{file}: {key} {value!r} is not a list of layer indices")
    return list(value)


def _official_rename(model: LoopusForCausalLM):
    a, b = model.config.split_start, model.config.split_end
    layers = model.layers_path
    names = {id(module): name for name, module in model.named_modules()}
    parts = model_parts(model.base_model_of_loop)
    embed, norm = names[id(parts.embed)], names[id(parts.norm)]

    def rename(key: str) -> str:
        if key.startswith("plateau."):
            key = "reasoning." + key[len("plateau.") :]
        head, _, rest = key.partition(".")
        if key.startswith("encoder.embed_tokens."):
            return f"{embed}." + key[len("encoder.embed_tokens.") :]
        if key.startswith("reasoning.gate."):
            return "gate." + key[len("reasoning.gate.") :]
        if key.startswith("decoder.norm."):
            return f"{norm}." + key[len("decoder.norm.") :]
        if key.startswith("decoder.lm_head."):
            return "lm_head." + key[len("decoder.lm_head.") :]
        if key.startswith("q_head.0."):
            return "confidence_head.norm." + key[len("q_head.0.") :]
        if key.startswith("q_head.1."):
            return "confidence_head.proj." + key[len("q_head.1.") :]
        offsets = {"encoder": 0, "reasoning": a, "decoder": b}
        if head in offsets and rest.startswith("layers."):
            index, _, tail = rest[len("layers.") :].partition(".")
            return f"{layers}.{offsets[head] + int(index)}.{tail}"
        return key

    return rename


def import_official(
    path: str | Path, dtype: str = "float32", num_loops: int | None = None, progress: Progress | None = None
) -> LoopusForCausalLM:
    """Load a checkpoint written by the official LoopUS code as a :class:`LoopusForCausalLM` (same logits).

    The official gate already runs after every pass, including the first, as ours does; its ``q_head`` reads
    the post-gate state at the last position, which is our confidence feature for unpadded inputs.
    """
    path = Path(path).expanduser()
    config, _ = _official_config(path, num_loops, "official")
    model = empty_model(config, resolve_dtype(dtype))
    files = weights_files(path)
    if not files:
        raise LoopusError(f"{path} has a config.json but no model.safetensors")
    try:
        filled = read_into(model, files, _official_rename(model), progress)
    except KeyError as exc:
        raise LoopusError(f"{path}: unexpected tensor {exc} for an official LoopUS checkpoint") from None
    _check_complete(model, filled, path)
    return model


def _check_complete(model: LoopusForCausalLM, filled: set[str], path: Path) -> None:
    expected = {k for k, _ in model.named_parameters(remove_duplicate=False)}
    tied = model.get_expanded_tied_weights_keys(all_submodels=True)
    missing = sorted(k for k in expected - filled if k not in tied)
    if missing:
        raise LoopusError(f"{path}: the weights lack {len(missing)} tensors (e.g. {missing[0]})")
    if tied:
        model.tie_weights()

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
from loopus_core.errors import LoopusError
from loopus_core.models import family_spec, weights_files
from loopus_core.progress import Progress
from loopus_core.runtime import resolve_dtype
from loopus_core.split import LayerSplit


def is_official_checkpoint(path: Path) -> bool:
    """A directory written by the official LoopUS code (``model_type: lds``)."""
    file = path / "config.json"
    if not file.is_file():
        return False
    try:
        return json.loads(file.read_text()).get("model_type") == "lds"
    except (OSError, json.JSONDecodeError):
        return False


def _official_config(path: Path, num_loops: int | None, gate_init: str) -> tuple[LoopusConfig, dict]:
    from transformers import AutoConfig

    raw = json.loads((path / "config.json").read_text())
    base_dict = raw.get("base_config_dict")
    if not isinstance(base_dict, dict) or "model_type" not in base_dict:
        raise LoopusError(
            f"{path}/config.json has no base_config_dict; is this an official LoopUS checkpoint?"
        )
    base_dict = {k: v for k, v in base_dict.items() if k not in ("transformers_version", "_name_or_path")}
    base_config = AutoConfig.for_model(**base_dict)
    family_spec(base_config)
    num_layers = base_config.num_hidden_layers
    enc = list(raw.get("encoder_layer_indices") or [])
    dec = list(raw.get("decoder_layer_indices") or [])
    loop = list(raw.get("reasoning_layer_indices") or [i for i in range(num_layers) if i not in enc + dec])
    a, b = len(enc), len(enc) + len(loop)
    if enc != list(range(a)) or loop != list(range(a, b)) or dec != list(range(b, num_layers)):
        raise LoopusError(
            f"{path}: encoder {enc}, loop {loop}, decoder {dec} are not consecutive slices of the "
            f"{num_layers} "
            "layers; only A:B splits can be imported"
        )
    split = LayerSplit(a, b, num_layers)
    loops = num_loops if num_loops is not None else int(raw.get("N", 1))
    threshold = float(raw.get("q_threshold", 0.9))
    strategy = raw.get("halting_strategy", "threshold")
    extra: dict = {"max_loops": int(raw.get("N", loops))}
    if strategy in ("threshold", "cdf", "convergence") and 0.0 < threshold < 1.0:
        extra.update(exit_strategy=strategy, exit_threshold=threshold)
    else:  # the official code's q_threshold > 1 means "never halt"
        extra.update(exit_strategy="none")
    if raw.get("convergence_epsilon"):
        extra["convergence_tol"] = float(raw["convergence_epsilon"])
    check_loop_settings(loops, gate_init)
    return loopus_config(base_config, split, loops, gate_init, **extra), raw


def _official_rename(model: LoopusForCausalLM):
    fam = model.family
    a, b = model.config.split_start, model.config.split_end
    layers = f"{fam.backbone}.{fam.layers}"

    def rename(key: str) -> str:
        if key.startswith("plateau."):
            key = "reasoning." + key[len("plateau.") :]
        head, _, rest = key.partition(".")
        if key.startswith("encoder.embed_tokens."):
            return f"{fam.backbone}.{fam.embed}." + key[len("encoder.embed_tokens.") :]
        if key.startswith("reasoning.gate."):
            return "gate." + key[len("reasoning.gate.") :]
        if key.startswith("decoder.norm."):
            return f"{fam.backbone}.{fam.norm}." + key[len("decoder.norm.") :]
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

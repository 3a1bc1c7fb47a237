"""Base model + split -> looped checkpoint; import of the official LoopUS format; loading a looped checkpoint.

A looped checkpoint directory holds ``config.json`` (model_type ``loopus``, the base config embedded, the
split, loop and exit settings, ``auto_map``), ``model.safetensors`` (the base model's tensors under their
own names plus ``gate.*`` and ``confidence_head.*``), ``generation_config.json``, the tokenizer, and copies
of ``configuration_loopus.py`` / ``modeling_loopus.py`` so that ``trust_remote_code=True`` loads it anywhere.

Memory: converting a local safetensors base model never builds the model. The looped model is built on the
meta device to know its tensor names and shapes, and the weights file is written by copying each base
tensor's bytes from the source file (in the kernel where possible; tensors that change dtype are converted
one at a time), plus the small gate and confidence head: peak memory is a few MiB whatever the model size.
Other sources (GGUF, hub ids, checkpoints with other tensor names) go through the transformers loader and
hold one copy of the weights. Output is written to a temporary directory next to the target and renamed into
place at the end: an interrupted conversion leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from loopus_analyze.errors import LoopusError
from loopus_analyze.layer_split import LayerSplit
from loopus_analyze.models import family_spec, open_model, read_config, resolve_dtype
from loopus_analyze.progress import Progress, ensure
from loopus_convert.configuration_loopus import GATE_INITS, LoopusConfig
from loopus_convert.modeling_loopus import LoopusForCausalLM

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
_HERE = Path(__file__).resolve().parent
REMOTE_CODE_FILES = ("configuration_loopus.py", "modeling_loopus.py")
AUTO_MAP = {
    "AutoConfig": "configuration_loopus.LoopusConfig",
    "AutoModelForCausalLM": "modeling_loopus.LoopusForCausalLM",
}
_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


@dataclass(frozen=True)
class ConvertResult:
    """Where a conversion went and what it made."""

    out: Path
    source: str
    split: LayerSplit
    num_loops: int
    official: bool  # imported from the official LoopUS format


# ------------------------------------------------------------------------------------------ settings


def read_analysis_split(path: str | Path) -> str:
    """The ``"split"`` of an analysis (a directory holding analysis.json, or the file itself)."""
    path = Path(path).expanduser()
    file = path / "analysis.json" if path.is_dir() else path
    if not file.is_file():
        raise LoopusError(f"--from {path}: no analysis.json there; run `loopus analyze MODEL` first")
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LoopusError(
            f"--from {file} is not readable JSON ({exc}); pass the analysis.json of `loopus analyze`"
        ) from None
    split = data.get("split") if isinstance(data, dict) else None
    if not isinstance(split, str):
        raise LoopusError(
            f'{file} has no "split" key; it does not look like the analysis.json of `loopus analyze`'
        )
    return split


def resolve_split(split: str | None, analysis: str | Path | None, num_layers: int) -> LayerSplit:
    """``A:B``, or ``auto`` with an analysis, into a validated :class:`LayerSplit`."""
    if split is None:
        raise LoopusError("--split is required: pass --split A:B, or --split auto --from ANALYSIS_DIR")
    if split.strip().lower() == "auto":
        if analysis is None:
            raise LoopusError(
                "--split auto needs an analysis: add --from REPORT_DIR (or its analysis.json), "
                "written by `loopus analyze MODEL`"
            )
        split = read_analysis_split(analysis)
        log.info("split %s from the analysis %s", split, analysis)
    return LayerSplit.parse(split, num_layers)


def check_loop_settings(num_loops: int, gate_init: str) -> None:
    """One-line errors for a bad loop count or gate init."""
    if num_loops < 1:
        raise LoopusError(f"--loops {num_loops}: the loop count must be at least 1")
    if gate_init not in GATE_INITS:
        raise LoopusError(f"--gate-init {gate_init!r} is not one of {', '.join(GATE_INITS)}")


def _loopus_config(base_config, split: LayerSplit, num_loops: int, gate_init: str, **extra) -> LoopusConfig:
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


# ------------------------------------------------------------------------------------------ building


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _empty_model(config: LoopusConfig, dtype: torch.dtype) -> LoopusForCausalLM:
    """The looped model with uninitialised base parameters (to be read into) and a freshly set gate/head."""
    from transformers.initialization import no_init_weights

    with no_init_weights(), _default_dtype(dtype):
        model = LoopusForCausalLM(config)
    model.gate.reset(config.gate_init)
    model.confidence_head.reset()
    return model.eval()


def loop_base_model(
    base_model, split: LayerSplit | str, num_loops: int = 1, gate_init: str = "identity", **exit_settings
) -> LoopusForCausalLM:
    """Wrap an in-memory base causal LM into a looped model that shares (does not copy) its modules."""
    family_spec(base_model.config)
    if isinstance(split, str):
        split = LayerSplit.parse(split, base_model.config.num_hidden_layers)
    check_loop_settings(num_loops, gate_init)
    config = _loopus_config(base_model.config, split, num_loops, gate_init, **exit_settings)
    config._attn_implementation = base_model.config._attn_implementation
    with torch.device("meta"):
        model = LoopusForCausalLM(config)
    dtype = next(base_model.parameters()).dtype
    device = next(base_model.parameters()).device
    model.add_module(model.family.backbone, getattr(base_model, model.family.backbone))
    model.lm_head = base_model.lm_head
    model.gate = type(model.gate)(config.hidden_size, config.gate_rank).to(device=device, dtype=dtype)
    model.confidence_head = type(model.confidence_head)(config.hidden_size).to(device=device, dtype=dtype)
    model.gate.reset(gate_init)
    model.confidence_head.reset()
    return model.eval()


# ------------------------------------------------------------------------------------------ safetensors


def _read_header(file: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and where its data starts; LoopusError if it is not one."""
    try:
        size = file.stat().st_size
        with file.open("rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than a header")
            n = struct.unpack("<Q", raw)[0]
            if n > size - 8 or n > 100 << 20:
                raise ValueError("header length beyond the end of the file")
            header = json.loads(fh.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise LoopusError(f"weights file {file} is corrupted ({exc}); convert or download it again") from None
    end = max((info["data_offsets"][1] for k, info in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise LoopusError(
            f"weights file {file} is truncated ({size} bytes, header says {8 + n + end}); "
            "convert or download it again"
        )
    return header, 8 + n


def _weights_files(path: Path) -> list[Path]:
    index = path / f"{WEIGHTS_NAME}.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / name for name in names]
    single = path / WEIGHTS_NAME
    if single.is_file():
        return [single]
    return sorted(path.glob("*.safetensors"))


def _read_into(
    model: torch.nn.Module, files: list[Path], rename=lambda key: key, progress: Progress | None = None
) -> set[str]:
    """Read every tensor of ``files`` straight into the model's parameter of the (renamed) same name.

    Returns the model keys that were filled. Unknown keys are an error (a checkpoint of another model).
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    params.update(dict(model.named_buffers()))
    headers = [(_read_header(f), f) for f in files]
    total = sum(len(h) - ("__metadata__" in h) for (h, _), _ in headers)
    filled: set[str] = set()
    with ensure(progress).task("reading weights", total) as advance:
        for (header, start), file in headers:
            with file.open("rb") as fh:
                for name, info in header.items():
                    if name == "__metadata__":
                        continue
                    key = rename(name)
                    target = params.get(key)
                    if target is None:
                        raise KeyError(name)
                    dtype = _ST_DTYPES[info["dtype"]]
                    begin, end = info["data_offsets"]
                    if list(target.shape) != list(info["shape"]):
                        raise LoopusError(
                            f"{file.name}: tensor {name} has shape {info['shape']}, the model "
                            f"expects {list(target.shape)}; the config does not match the weights"
                        )
                    buffer = target if target.dtype == dtype else torch.empty(target.shape, dtype=dtype)
                    fh.seek(start + begin)
                    view = buffer.detach().view(-1).view(torch.uint8).numpy() if buffer.numel() else None
                    if view is not None and fh.readinto(memoryview(view)) != end - begin:
                        raise LoopusError(f"weights file {file} is truncated; convert or download it again")
                    if buffer is not target:
                        with torch.no_grad():
                            target.copy_(buffer)
                    filled.add(key)
                    advance(1)
    return filled


def write_safetensors(state: dict[str, torch.Tensor], file: Path, progress: Progress | None = None) -> None:
    """Write a safetensors file tensor by tensor (no second copy of the weights in memory)."""
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    tensors = {}
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": _ST_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        tensors[name] = tensor
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data to 8 bytes
    with file.open("wb") as fh, ensure(progress).task("writing weights", len(tensors)) as advance:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for name in sorted(tensors):
            tensor = tensors[name]
            if tensor.numel():
                fh.write(memoryview(tensor.view(-1).view(torch.uint8).numpy()))
            advance(1)


# ------------------------------------------------------------------------------------------ writing


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise LoopusError(f"output directory {out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise LoopusError(f"output path {out} is a file; pass a directory path")


def _write_dir(
    out: Path,
    force: bool,
    write_weights,
    config: LoopusConfig,
    dtype: torch.dtype,
    tokenizer=None,
    generation_config=None,
) -> Path:
    """Write a looped checkpoint directory atomically: everything goes to a temporary directory next to
    ``out`` that is renamed into place at the end (removed on any error or interrupt)."""
    out = Path(out).expanduser().resolve()
    _prepare_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        write_weights(tmp / WEIGHTS_NAME)
        config.auto_map = dict(AUTO_MAP)
        config.architectures = ["LoopusForCausalLM"]
        config.dtype = dtype
        config.save_pretrained(tmp)
        for name in REMOTE_CODE_FILES:
            shutil.copyfile(_HERE / name, tmp / name)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        if isinstance(tokenizer, list):
            for file in tokenizer:
                shutil.copyfile(file, tmp / file.name)
        elif tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def save_looped(
    model: LoopusForCausalLM,
    out: Path,
    tokenizer=None,
    generation_config=None,
    force: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Write an in-memory looped model as a checkpoint directory (atomically).

    ``tokenizer`` is a tokenizer object or a list of tokenizer files to copy."""
    state = model.state_dict()
    for target in model.get_expanded_tied_weights_keys(all_submodels=True):
        state.pop(target, None)  # tied: stored once, tied again on load
    return _write_dir(
        out,
        force,
        lambda file: write_safetensors(state, file, progress),
        model.config,
        next(model.parameters()).dtype,
        tokenizer,
        generation_config,
    )


def _generation_config(path: Path | None, config: LoopusConfig):
    from transformers import GenerationConfig

    if path is not None and (path / "generation_config.json").is_file():
        with contextlib.suppress(Exception):
            return GenerationConfig.from_pretrained(path)
    return GenerationConfig.from_model_config(config)


_TOKENIZER_FILES = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.model",
    "chat_template.*",
)


def _tokenizer_files(path: Path) -> list[Path]:
    """The tokenizer files of a local model directory (copied as they are: faster than load + save)."""
    return sorted({f for pattern in _TOKENIZER_FILES for f in path.glob(pattern) if f.is_file()})


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # no tokenizer files: the checkpoint is still usable with ids
        log.warning("no tokenizer saved: cannot load one from %s (%s)", path, str(exc).splitlines()[0][:120])
        return None


# ------------------------------------------------------------------------------------------ official format


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
    return _loopus_config(base_config, split, loops, gate_init, **extra), raw


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
    model = _empty_model(config, resolve_dtype(dtype))
    files = _weights_files(path)
    if not files:
        raise LoopusError(f"{path} has a config.json but no model.safetensors")
    try:
        filled = _read_into(model, files, _official_rename(model), progress)
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


# ------------------------------------------------------------------------------------------ convert


def convert_model(
    source: str | None,
    out: str | Path,
    split: str | None = None,
    analysis: str | Path | None = None,
    num_loops: int = 1,
    gate_init: str = "identity",
    dtype: str = "float32",
    force: bool = False,
    progress: Progress | None = None,
) -> ConvertResult:
    """Convert ``source`` (a HF directory, .gguf file, hub id, official LoopUS checkpoint, or None for the
    embedded default model) into a looped checkpoint at ``out``.

    ``split`` is ``"A:B"`` or ``"auto"`` (then ``analysis`` names the analysis directory or analysis.json).
    One loop of the result reproduces the base model (identity gate init). An official checkpoint keeps its
    own split, gate and confidence head.
    """
    out_path = Path(out).expanduser()
    _prepare_out(out_path, force)
    torch_dtype = resolve_dtype(dtype)
    check_loop_settings(num_loops, gate_init)
    if source is None:  # the embedded default model, as a plain HF directory (built once, cached)
        from loopus_analyze.models import default_model_dir

        local = default_model_dir()
        shown = f"{local.name} (embedded default)"
    else:
        local = Path(source).expanduser()
        shown = str(source)
    if local is not None and local.is_dir() and is_official_checkpoint(local):
        if split is not None:
            raise LoopusError(f"{source} is an official LoopUS checkpoint with its own split; drop --split")
        model = import_official(
            local, dtype=dtype, num_loops=num_loops if num_loops != 1 else None, progress=progress
        )
        tokenizer = _tokenizer_files(local) or None
        save_looped(model, out_path, tokenizer, _generation_config(local, model.config), force, progress)
        return ConvertResult(
            out_path.resolve(),
            shown,
            LayerSplit(model.config.split_start, model.config.split_end, model.config.num_base_layers),
            model.config.num_loops,
            True,
        )

    if local is not None and local.is_dir():
        base_config = read_config(local)
        family_spec(base_config)
        layer_split = resolve_split(split, analysis, base_config.num_hidden_layers)
        config = _loopus_config(base_config, layer_split, num_loops, gate_init)
        plan = _stream_plan(local, config, torch_dtype)
        if plan is not None:
            tokenizer = _tokenizer_files(local)
            if not tokenizer:
                log.warning("%s has no tokenizer files; the checkpoint is saved without one", local)
            _write_dir(
                out_path,
                force,
                lambda file: _stream_weights(plan, file, progress),
                config,
                torch_dtype,
                tokenizer,
                _generation_config(local, config),
            )
            return ConvertResult(out_path.resolve(), shown, layer_split, num_loops, False)

    opened = open_model(source, dtype=dtype, need_tokenizer=False)
    layer_split = resolve_split(split, analysis, opened.model.config.num_hidden_layers)
    model = loop_base_model(opened.model, layer_split, num_loops, gate_init)
    save_looped(
        model,
        out_path,
        opened.tokenizer,
        _generation_config(opened.path if opened.path and opened.path.is_dir() else None, model.config),
        force,
        progress,
    )
    return ConvertResult(out_path.resolve(), opened.source, layer_split, num_loops, False)


@dataclass
class _StreamPlan:
    """How to write the looped weights file from a base checkpoint without building the model."""

    entries: list[
        tuple[str, torch.dtype, list[int], Path | None, int, torch.dtype | None, torch.Tensor | None]
    ]
    # (name, dtype, shape, source file, source byte offset, source dtype, or an in-memory tensor)


def _stream_plan(path: Path, config: LoopusConfig, dtype: torch.dtype) -> _StreamPlan | None:
    """Match a local safetensors base checkpoint against the looped model's tensors (built on the meta
    device: no memory). None when names or shapes differ (then the transformers loader, which knows
    renames)."""
    files = _weights_files(path)
    if not files:
        return None
    with torch.device("meta"):
        skeleton = LoopusForCausalLM(config)
    expected = dict(skeleton.state_dict())
    tied = skeleton.get_expanded_tied_weights_keys(all_submodels=True)
    backbone = skeleton.family.backbone + "."
    sources: dict[str, tuple[Path, int, torch.dtype]] = {}
    for file in files:
        header, start = _read_header(file)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            key = name if name in expected or backbone + name not in expected else backbone + name
            if key in tied:
                continue  # stored once, tied again on load
            if (
                key not in expected
                or list(expected[key].shape) != list(info["shape"])
                or info["dtype"] not in _ST_DTYPES
            ):
                log.debug("tensor %s does not match the model; using the transformers loader", name)
                return None
            sources[key] = (file, start + info["data_offsets"][0], _ST_DTYPES[info["dtype"]])
    heads = {}
    with _default_dtype(dtype):
        gate = type(skeleton.gate)(config.hidden_size, config.gate_rank)
        head = type(skeleton.confidence_head)(config.hidden_size)
    gate.reset(config.gate_init)
    head.reset()
    heads.update({f"gate.{k}": v.detach() for k, v in gate.state_dict().items()})
    heads.update({f"confidence_head.{k}": v.detach() for k, v in head.state_dict().items()})
    missing = sorted(set(expected) - set(sources) - set(heads) - set(tied))
    if missing:
        log.debug(
            "%d base tensors missing (e.g. %s); using the transformers loader", len(missing), missing[0]
        )
        return None
    entries = []
    for name in sorted(set(sources) | set(heads)):
        shape = list(expected[name].shape)
        if name in heads:
            entries.append((name, dtype, shape, None, 0, None, heads[name].to(dtype)))
        else:
            file, offset, src_dtype = sources[name]
            target = dtype if src_dtype.is_floating_point else src_dtype
            entries.append((name, target, shape, file, offset, src_dtype, None))
    return _StreamPlan(entries)


def _stream_weights(plan: _StreamPlan, file: Path, progress: Progress | None = None) -> None:
    """Write the looped weights file: base tensors of the right dtype are copied byte for byte from the
    source file (in the kernel where possible); others are converted one tensor at a time."""
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape, *_ in plan.entries:
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    handles: dict[Path, object] = {}
    try:
        with file.open("wb") as out, ensure(progress).task("writing weights", len(plan.entries)) as advance:
            out.write(struct.pack("<Q", len(raw)))
            out.write(raw)
            for name, dtype, shape, source, src_offset, src_dtype, tensor in plan.entries:
                if source is not None and src_dtype == dtype:
                    nbytes = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
                    src = handles.setdefault(source, source.open("rb"))
                    _copy_range(src, out, src_offset, nbytes)
                else:
                    if tensor is None:  # dtype conversion: read this one tensor, convert, write
                        src = handles.setdefault(source, source.open("rb"))
                        buffer = torch.empty(shape, dtype=src_dtype)
                        src.seek(src_offset)
                        if buffer.numel():
                            src.readinto(memoryview(buffer.view(-1).view(torch.uint8).numpy()))
                        tensor = buffer.to(dtype)
                    if tensor.numel():
                        out.write(memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy()))
                advance(1)
    finally:
        for handle in handles.values():
            handle.close()


def _copy_range(src, dst, offset: int, nbytes: int, chunk: int = 64 << 20) -> None:
    """Copy ``nbytes`` of ``src`` from ``offset`` to the current end of ``dst``."""
    dst.flush()
    position = dst.tell()
    done = 0
    try:
        while done < nbytes:
            copied = os.copy_file_range(
                src.fileno(), dst.fileno(), nbytes - done, offset + done, position + done
            )
            if copied == 0:
                raise OSError("short copy")
            done += copied
        dst.seek(position + nbytes)
        return
    except (OSError, AttributeError):
        pass
    src.seek(offset + done)
    dst.seek(position + done)
    while done < nbytes:
        data = src.read(min(chunk, nbytes - done))
        if not data:
            raise LoopusError(
                f"weights file {Path(src.name).name} is truncated; download or convert it again"
            )
        dst.write(data)
        done += len(data)


# ------------------------------------------------------------------------------------------ loading


def check_checkpoint(path: str | Path) -> Path:
    """A one-line LoopusError unless ``path`` is a looped checkpoint with readable, complete weights files."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise LoopusError(f"checkpoint {path} does not exist; pass a directory written by `loopus convert`")
    file = path / "config.json"
    if not file.is_file():
        raise LoopusError(f"{path} is not a looped checkpoint: config.json is missing")
    try:
        model_type = json.loads(file.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError) as exc:
        raise LoopusError(f"{file} is not readable JSON ({exc})") from None
    if model_type != "loopus":
        hint = (
            " (an official LoopUS checkpoint: import it with `loopus convert`)" if model_type == "lds" else ""
        )
        raise LoopusError(
            f"{path} is not a looped checkpoint (model_type {model_type!r}){hint}; "
            "make one with `loopus convert MODEL --split A:B --out DIR`"
        )
    files = _weights_files(path)
    if not files:
        raise LoopusError(f"{path} has no weights file ({WEIGHTS_NAME}); convert the model again")
    for weights in files:
        if not weights.is_file():
            raise LoopusError(f"{path}: weights file {weights.name} is missing; convert the model again")
        _read_header(weights)
    return path


def load_looped(path: str | Path, dtype: str = "float32", device: str = "cpu") -> LoopusForCausalLM:
    """Load a looped checkpoint in eval mode; one-line LoopusError for anything but a complete one."""
    from loopus_analyze.models import resolve_device

    path = check_checkpoint(path)
    torch_dtype = resolve_dtype(dtype)
    torch_device = resolve_device(device)
    try:
        model, info = LoopusForCausalLM.from_pretrained(path, dtype=torch_dtype, output_loading_info=True)
    except LoopusError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LoopusError(f"cannot load the looped checkpoint {path}: {first[:200]}") from None
    missing = [k for k in info.get("missing_keys", []) if k]
    if missing:
        raise LoopusError(
            f"{path}: the weights file lacks {len(missing)} tensors (e.g. {sorted(missing)[0]}); "
            "it is incomplete: convert the model again"
        )
    return model.to(torch_device).eval()


# ------------------------------------------------------------------------------------------ running


@dataclass
class GenerationResult:
    """Text generated from a prompt and the loop passes each new token used."""

    text: str
    new_tokens: list[int]
    loops_per_token: list[int]
    context_limit: int | None
    hit_context_limit: bool  # generation was cut at the model's context limit


def check_generation_settings(
    num_loops: int | None,
    exit_strategy: str | None,
    exit_threshold: float | None,
    max_loops: int | None,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
) -> None:
    """One-line errors naming the flag, the bad value and the allowed range."""
    from loopus_convert.configuration_loopus import EXIT_STRATEGIES

    if num_loops is not None and num_loops < 1:
        raise LoopusError(f"--loops {num_loops}: the loop count must be at least 1")
    if max_loops is not None and max_loops < 1:
        raise LoopusError(f"--max-loops {max_loops}: must be at least 1")
    if exit_strategy is not None and exit_strategy not in EXIT_STRATEGIES:
        raise LoopusError(f"--exit-strategy {exit_strategy!r} is not one of {', '.join(EXIT_STRATEGIES)}")
    if exit_threshold is not None and not 0.0 < exit_threshold < 1.0:
        raise LoopusError(f"--exit-threshold {exit_threshold}: must be in (0, 1)")
    if max_new_tokens < 1:
        raise LoopusError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
    if temperature < 0:
        raise LoopusError(f"--temperature {temperature}: must be >= 0 (0 = greedy)")
    if not 0.0 < top_p <= 1.0:
        raise LoopusError(f"--top-p {top_p}: must be in (0, 1]")


def generate_text(
    checkpoint: str | Path,
    prompt: str,
    num_loops: int | None = None,
    exit_strategy: str | None = None,
    exit_threshold: float | None = None,
    max_loops: int | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    dtype: str = "float32",
    device: str = "cpu",
    on_text=None,
) -> GenerationResult:
    """Generate a continuation of ``prompt`` with a looped checkpoint through ``model.generate``.

    ``on_text(str)`` receives the text as it is produced (a transformers streamer). ``--exit-threshold``
    alone means the threshold strategy. Generation stops at the model's context limit
    (``max_position_embeddings``) instead of sliding; the result says so.
    """
    from transformers import AutoTokenizer, TextStreamer

    check_generation_settings(
        num_loops, exit_strategy, exit_threshold, max_loops, max_new_tokens, temperature, top_p
    )
    if exit_strategy is None and exit_threshold is not None:
        exit_strategy = "threshold"
    model = load_looped(checkpoint, dtype=dtype, device=device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(Path(checkpoint).expanduser())
    except Exception:
        raise LoopusError(
            f"{checkpoint} has no tokenizer; convert from a model directory that has one"
        ) from None
    encoded = tokenizer(prompt, return_tensors="pt")
    input_ids = encoded["input_ids"].to(model.device)
    if input_ids.shape[1] == 0:
        raise LoopusError("--prompt is empty after tokenisation; give some text")
    limit = model.config.max_position_embeddings
    hit_limit = False
    if limit is not None:
        if input_ids.shape[1] >= limit:
            raise LoopusError(
                f"the prompt is {input_ids.shape[1]} tokens; the model's context limit is {limit}"
            )
        if input_ids.shape[1] + max_new_tokens > limit:
            max_new_tokens = limit - input_ids.shape[1]
            hit_limit = True
    settings = {
        k: v
        for k, v in dict(
            num_loops=num_loops,
            exit_strategy=exit_strategy,
            exit_threshold=exit_threshold,
            max_loops=max_loops,
        ).items()
        if v is not None
    }
    streamer = None
    if on_text is not None:

        class _Streamer(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                on_text(text)

        streamer = _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(seed)
    sampling = (
        dict(do_sample=True, temperature=temperature, top_p=top_p)
        if temperature > 0
        else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    )
    try:
        with torch.no_grad():
            output = model.generate(
                input_ids,
                attention_mask=encoded["attention_mask"].to(model.device),
                max_new_tokens=max_new_tokens,
                pad_token_id=pad,
                streamer=streamer,
                **sampling,
                **settings,
            )
    except ValueError as exc:  # bad loop / exit settings caught by the model
        raise LoopusError(str(exc).splitlines()[0]) from None
    new = output[0, input_ids.shape[1] :].tolist()
    loops = [int(r[0]) for r in model.loop_record][: len(new)]
    text = tokenizer.decode(new, skip_special_tokens=True)
    hit_limit = hit_limit and len(new) == max_new_tokens
    return GenerationResult(
        text=text, new_tokens=new, loops_per_token=loops, context_limit=limit, hit_context_limit=hit_limit
    )

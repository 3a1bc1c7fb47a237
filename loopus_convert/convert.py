"""Base model + split -> looped checkpoint (what ``loopus convert`` runs).

Memory: converting a local safetensors base model never builds the model. The looped model is built on the
meta device to know its tensor names and shapes, and the weights file is written by copying each base
tensor's bytes from the source file (in the kernel where possible; tensors that change dtype are converted
one at a time), plus the small gate and confidence head: peak memory is a few MiB whatever the model size.
Other sources (GGUF, hub ids, checkpoints with other tensor names) go through the transformers loader and
hold one copy of the weights. A checkpoint of the official LoopUS code is imported by :mod:`.official`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from loopus_convert.build import check_loop_settings, loop_base_model, loopus_config
from loopus_convert.checkpoint import (
    ST_DTYPES,
    ST_NAMES,
    generation_config_for,
    read_header,
    replace_refusal,
    save_looped,
    tokenizer_files,
    write_checkpoint,
)
from loopus_convert.configuration_loopus import DEFAULT_GATE_INIT, LoopusConfig
from loopus_convert.modeling_loopus import LoopusForCausalLM, make_gate
from loopus_convert.official import import_official, is_official_checkpoint
from loopus_core.errors import LoopusError
from loopus_core.jsonio import read_json
from loopus_core.models import (
    check_loopable_config,
    composite_text_config,
    default_model_dir,
    note_text_model,
    open_model,
    open_text_weights,
    read_config,
    source_fingerprint,
    weights_files,
)
from loopus_core.outputs import output_lock, prepare_output
from loopus_core.progress import Progress, ensure
from loopus_core.runtime import default_dtype, resolve_dtype
from loopus_core.split import LayerSplit

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConvertResult:
    """Where a conversion went and what it made."""

    out: Path
    source: str
    split: LayerSplit
    num_loops: int
    official: bool  # imported from the official LoopUS format


# ------------------------------------------------------------------------------------------ settings


def read_analysis(path: str | Path) -> dict:
    """The analysis.json of ``loopus analyze`` (a directory holding it, or the file itself), with a
    ``"split"`` string; one-line errors otherwise."""
    path = Path(path).expanduser()
    file = path / "analysis.json" if path.is_dir() else path
    if not file.is_file():
        raise LoopusError(f"--from {path}: no analysis.json there; run `loopus analyze MODEL` first")
    data = read_json(file, "--from", "pass the analysis.json of `loopus analyze`")
    if not isinstance(data, dict) or not isinstance(data.get("split"), str):
        raise LoopusError(
            f'{file} has no "split" key; it does not look like the analysis.json of `loopus analyze`'
        )
    return data


def _check_analysed_model(analysis: dict, where: str | Path, source: str | None) -> None:
    """The analysis must be of ``source``: its recorded fingerprint (a hash of the weights files, or the hub
    revision) against the source's. An analysis that records none is used with a warning."""
    model = analysis.get("model") if isinstance(analysis.get("model"), dict) else {}
    recorded = model.get("fingerprint")
    if not isinstance(recorded, str):
        log.warning("--from %s does not say which model it analysed; its split is used unchecked", where)
        return
    actual = source_fingerprint(source)
    if recorded != actual:
        shown = "the embedded default model" if source is None else source
        raise LoopusError(
            f"--from {where} is the analysis of another model ({model.get('source', 'unknown')}, weights "
            f"{recorded}); {shown} has weights {actual}: run `loopus analyze` on it, or pass its analysis"
        )


def resolve_split(
    split: str | None, analysis: str | Path | None, num_layers: int, source: str | None = None
) -> LayerSplit:
    """``A:B``, or ``auto`` with an analysis of ``source`` (checked: :func:`_check_analysed_model`), into a
    validated :class:`LayerSplit`."""
    if split is None:
        raise LoopusError("--split is required: pass --split A:B, or --split auto --from ANALYSIS_DIR")
    if split.strip().lower() == "auto":
        if analysis is None:
            raise LoopusError(
                "--split auto needs an analysis: add --from REPORT_DIR (or its analysis.json), "
                "written by `loopus analyze MODEL`"
            )
        record = read_analysis(analysis)
        _check_analysed_model(record, analysis, source)
        split = record["split"]
        log.info("split %s from the analysis %s", split, analysis)
    return LayerSplit.parse(split, num_layers)


# ------------------------------------------------------------------------------------------ convert


def convert_model(
    source: str | None,
    out: str | Path,
    split: str | None = None,
    analysis: str | Path | None = None,
    num_loops: int = 1,
    gate_init: str = DEFAULT_GATE_INIT,
    dtype: str = "float32",
    force: bool = False,
    progress: Progress | None = None,
) -> ConvertResult:
    """Convert ``source`` (a HF directory, .gguf file, hub id, official LoopUS checkpoint, or None for the
    embedded default model) into a looped checkpoint at ``out``.

    ``split`` is ``"A:B"`` or ``"auto"`` (then ``analysis`` names the analysis directory or analysis.json
    of the same model). One loop of the result reproduces the base model (gate inits ``residual`` and
    ``identity``; ``official`` is the paper's init, not lossless). An official checkpoint keeps its own split,
    gate and confidence head. ``out``'s lock is held from the start (a second conversion into it stops at
    once); with ``force`` an existing ``out`` is replaced atomically, and only when it is a previous looped
    checkpoint or empty, never when it holds the input.
    """
    out_path = Path(out).expanduser()
    with output_lock(out_path):
        resolve_dtype(dtype)
        check_loop_settings(num_loops, gate_init)
        local = default_model_dir() if source is None else Path(source).expanduser()
        inputs = [local] + ([Path(analysis).expanduser()] if analysis is not None else [])
        prepare_output(out_path, "replace" if force else "error", replaceable=replace_refusal, inputs=inputs)
        shown = f"{local.name} (embedded default)" if source is None else str(source)
        if local.is_dir() and is_official_checkpoint(local):
            if split is not None:
                raise LoopusError(
                    f"{source} is an official LoopUS checkpoint with its own split; drop --split"
                )
            return _convert_official(local, shown, out_path, num_loops, dtype, force, progress)
        settings = _Settings(split, analysis, num_loops, gate_init, dtype, force)
        if local.is_dir():
            result = _convert_streaming(source, local, shown, out_path, settings, progress)
            if result is not None:
                return result
        return _convert_loaded(source, out_path, settings, progress)


@dataclass(frozen=True)
class _Settings:
    """The conversion settings passed from :func:`convert_model` to its paths."""

    split: str | None
    analysis: str | Path | None
    num_loops: int
    gate_init: str
    dtype: str
    force: bool


def _convert_loaded(
    source: str | None, out: Path, settings: _Settings, progress: Progress | None
) -> ConvertResult:
    """Through the transformers loader (GGUF files, hub ids, tensor names it renames): one copy of the
    weights in memory; weights that do not fill the config are a one-line error there."""
    opened = open_model(source, dtype=settings.dtype, need_tokenizer=False)
    layer_split = resolve_split(
        settings.split, settings.analysis, opened.model.config.num_hidden_layers, source
    )
    model = loop_base_model(opened.model, layer_split, settings.num_loops, settings.gate_init)
    directory = opened.path if opened.path and opened.path.is_dir() else None
    save_looped(
        model, out, opened.tokenizer, generation_config_for(directory, model.config), settings.force, progress
    )
    return ConvertResult(out.resolve(), opened.source, layer_split, settings.num_loops, False)


def _convert_official(
    local: Path, shown: str, out: Path, num_loops: int, dtype: str, force: bool, progress: Progress | None
) -> ConvertResult:
    """Import an official LoopUS checkpoint (its own split, gate and head) and save it in our format."""
    model = import_official(
        local, dtype=dtype, num_loops=num_loops if num_loops != 1 else None, progress=progress
    )
    tokenizer = tokenizer_files(local) or None
    save_looped(model, out, tokenizer, generation_config_for(local, model.config), force, progress)
    cfg = model.config
    return ConvertResult(
        out.resolve(),
        shown,
        LayerSplit(cfg.split_start, cfg.split_end, cfg.num_base_layers),
        cfg.num_loops,
        True,
    )


def _convert_streaming(
    source: str | None, local: Path, shown: str, out: Path, settings: _Settings, progress: Progress | None
) -> ConvertResult | None:
    """Stream a local safetensors base model into the looped weights file; None when its tensors do not
    match the model's names and shapes (the caller then goes through the transformers loader, which knows
    renames, and reports weights that do not fill the config)."""
    base_config = read_config(local)
    check_loopable_config(base_config)
    text = composite_text_config(base_config)  # a multimodal checkpoint: its text model is converted
    text_part = open_text_weights(local, text) if text is not None else None
    opened = text or base_config
    layer_split = resolve_split(settings.split, settings.analysis, opened.num_hidden_layers, source)
    config = loopus_config(opened, layer_split, settings.num_loops, settings.gate_init)
    torch_dtype = resolve_dtype(settings.dtype)
    plan = _stream_plan(local, config, torch_dtype, text_part.rename if text_part else None)
    if plan is None:
        return None
    if text is not None:
        note_text_model(base_config, text, shown)
    tokenizer = tokenizer_files(local)
    if not tokenizer:
        log.warning("%s has no tokenizer files; the checkpoint is saved without one", local)
    write_checkpoint(
        out,
        lambda file: _stream_weights(plan, file, progress),
        config,
        torch_dtype,
        tokenizer,
        generation_config_for(local, config),
        force=settings.force,
    )
    return ConvertResult(out.resolve(), shown, layer_split, settings.num_loops, False)


@dataclass
class _StreamPlan:
    """How to write the looped weights file from a base checkpoint without building the model."""

    entries: list[
        tuple[str, torch.dtype, list[int], Path | None, int, torch.dtype | None, torch.Tensor | None]
    ]


def _stream_plan(path: Path, config: LoopusConfig, dtype: torch.dtype, rename=None) -> _StreamPlan | None:
    """Match a local safetensors base checkpoint against the looped model's tensors (built on the meta
    device: no memory). None when names or shapes differ (then the transformers loader, which knows
    renames). ``rename`` maps a composite checkpoint's text tensors to the text model's names (None: a
    tensor of another part, not read)."""
    files = weights_files(path)
    if not files:
        return None
    from transformers.initialization import no_init_weights

    with torch.device("meta"), no_init_weights():  # names and shapes only: no initialisation to run
        skeleton = LoopusForCausalLM(config)
    expected = dict(skeleton.state_dict())
    tied = skeleton.get_expanded_tied_weights_keys(all_submodels=True)
    backbone = skeleton.backbone_prefix
    sources: dict[str, tuple[Path, int, torch.dtype]] = {}
    for file in files:
        header, start = read_header(file)
        for name, info in header.items():
            if name == "__metadata__" or (rename is not None and rename(name) is None):
                continue
            name = rename(name) if rename is not None else name
            key = name if name in expected or backbone + name not in expected else backbone + name
            if key in tied:
                continue  # stored once, tied again on load
            if (
                key not in expected
                or list(expected[key].shape) != list(info["shape"])
                or info["dtype"] not in ST_DTYPES
            ):
                log.debug("tensor %s does not match the model; using the transformers loader", name)
                return None
            sources[key] = (file, start + info["data_offsets"][0], ST_DTYPES[info["dtype"]])
    heads = {}
    with default_dtype(dtype):
        gate = make_gate(config)
        head = type(skeleton.confidence_head)(config.hidden_size)
    gate.reset()
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
        header[name] = {"dtype": ST_NAMES[dtype], "shape": shape, "data_offsets": [offset, offset + nbytes]}
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

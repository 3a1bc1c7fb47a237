"""The looped checkpoint on disk: safetensors I/O, writing a checkpoint directory, checking and loading one.

A looped checkpoint directory holds ``config.json`` (model_type ``loopus``, the base config embedded, the
split, loop and exit settings, ``auto_map``), ``model.safetensors`` (the base model's tensors under their
own names plus ``gate.*`` and ``confidence_head.*``), ``generation_config.json``, the tokenizer, and copies
of ``configuration_loopus.py`` / ``modeling_loopus.py`` so that ``trust_remote_code=True`` loads it anywhere.
Directories are written through :func:`loopus_core.outputs.atomic_directory`: an interrupted write leaves
nothing half-written. Only safetensors are read or written.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import math
import shutil
import struct
from pathlib import Path

import torch

from loopus_convert.configuration_loopus import LoopusConfig
from loopus_convert.modeling_loopus import LoopusForCausalLM
from loopus_core.checks import MAX_LOOPS, check_int
from loopus_core.errors import LoopusError, first_line
from loopus_core.jsonio import read_json
from loopus_core.models import WEIGHTS_NAME, check_loading_info, weights_files
from loopus_core.outputs import atomic_directory
from loopus_core.progress import Progress, ensure
from loopus_core.runtime import resolve_device, resolve_dtype

log = logging.getLogger(__name__)

_HERE = Path(__file__).resolve().parent


REMOTE_CODE_FILES = ("configuration_loopus.py", "modeling_loopus.py")

AUTO_MAP = {
    "AutoConfig": "configuration_loopus.LoopusConfig",
    "AutoModelForCausalLM": "modeling_loopus.LoopusForCausalLM",
}

ST_DTYPES = {
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

ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


# ------------------------------------------------------------------------------------------ safetensors


def read_header(file: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and where its data starts; LoopusError if it is not one.

    Checked: the header is a JSON object; each tensor entry is an object with a dtype string, a shape of
    non-negative integers and ``data_offsets`` ``[begin, end]`` whose length fits the shape and dtype; the
    data lies inside the file. ``__metadata__`` is an object when present.
    """
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
        problem = _header_problem(header)
        if problem:
            raise ValueError(problem)
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise LoopusError(
            f"weights file {file} is corrupted ({first_line(exc)}); convert or download it again"
        ) from None
    end = max((info["data_offsets"][1] for k, info in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise LoopusError(
            f"weights file {file} is truncated ({size} bytes, header says {8 + n + end}); "
            "convert or download it again"
        )
    return header, 8 + n


def _header_problem(header) -> str | None:
    """What is wrong with a parsed safetensors header (None: nothing)."""
    if not isinstance(header, dict):
        return f"the header is a JSON {type(header).__name__}, not an object"
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict):
                return "its __metadata__ is not an object"
            continue
        problem = _entry_problem(info)
        if problem:
            return f"tensor {name!r} {problem}"
    return None


def _entry_problem(info) -> str | None:
    if not isinstance(info, dict):
        return "is not described by an object"
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str):
        return "has no dtype"
    if not isinstance(shape, list) or not all(_natural(d) for d in shape):
        return "has no shape of non-negative integers"
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_natural(o) for o in offsets):
        return "has no data_offsets [begin, end]"
    if dtype in ST_DTYPES:
        expected = math.prod(shape) * torch.empty(0, dtype=ST_DTYPES[dtype]).element_size()
        if offsets[1] - offsets[0] != expected:
            return f"has data_offsets {offsets} for {expected} bytes of data"
    elif offsets[1] < offsets[0]:
        return f"has data_offsets {offsets} that end before they begin"
    return None


def _natural(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_into(
    model: torch.nn.Module, files: list[Path], rename=lambda key: key, progress: Progress | None = None
) -> set[str]:
    """Read every tensor of ``files`` straight into the model's parameter of the (renamed) same name.

    Returns the model keys that were filled. Unknown keys are an error (a checkpoint of another model).
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    params.update(dict(model.named_buffers()))
    headers = [(read_header(f), f) for f in files]
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
                    if info["dtype"] not in ST_DTYPES:
                        raise LoopusError(f"{file.name}: tensor {name} has dtype {info['dtype']}, which "
                                          f"loopus does not read ({', '.join(ST_DTYPES)})")
                    dtype = ST_DTYPES[info["dtype"]]
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
            "dtype": ST_NAMES[tensor.dtype],
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


def write_checkpoint(
    out: Path,
    write_weights,
    config: LoopusConfig,
    dtype: torch.dtype,
    tokenizer=None,
    generation_config=None,
    *,
    force: bool = False,
) -> Path:
    """Write a looped checkpoint directory atomically (see the module docstring); ``write_weights(file)``
    writes the weights file. An existing ``out`` is replaced only with ``force``, and only when it is a
    previous looped checkpoint or empty (:func:`replace_refusal`)."""
    out = Path(out).expanduser().resolve()
    with atomic_directory(out, existing="replace" if force else "error", replaceable=replace_refusal) as tmp:
        write_checkpoint_files(tmp, write_weights, config, dtype, tokenizer, generation_config)
    return out


def write_checkpoint_files(
    directory: Path,
    write_weights,
    config: LoopusConfig,
    dtype: torch.dtype,
    tokenizer=None,
    generation_config=None,
) -> None:
    """The files of a looped checkpoint, written into an existing (temporary) ``directory``.

    ``tokenizer`` is a tokenizer object or a list of tokenizer files to copy."""
    write_weights(directory / WEIGHTS_NAME)
    config.auto_map = dict(AUTO_MAP)
    config.architectures = ["LoopusForCausalLM"]
    config.dtype = dtype
    config.save_pretrained(directory)
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(_HERE / name, directory / name)
    if generation_config is not None:
        generation_config.save_pretrained(directory)
    if isinstance(tokenizer, list):
        for file in tokenizer:
            shutil.copyfile(file, directory / file.name)
    elif tokenizer is not None:
        tokenizer.save_pretrained(directory)


def looped_state(
    model: LoopusForCausalLM, state: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The tensors to save: the state dict (or ``state``, one gathered elsewhere, e.g. from sharded
    training) without the tied copies (stored once, tied again on load)."""
    state = dict(model.state_dict() if state is None else state)
    for target in model.get_expanded_tied_weights_keys(all_submodels=True):
        state.pop(target, None)
    return state


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
    state = looped_state(model)
    return write_checkpoint(
        out,
        lambda file: write_safetensors(state, file, progress),
        model.config,
        next(model.parameters()).dtype,
        tokenizer,
        generation_config,
        force=force,
    )


def generation_config_for(path: Path | None, config: LoopusConfig):
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


def tokenizer_files(path: Path) -> list[Path]:
    """The tokenizer files of a local model directory (copied as they are: faster than load + save)."""
    return sorted({f for pattern in _TOKENIZER_FILES for f in path.glob(pattern) if f.is_file()})


# what a looped checkpoint directory holds (converted, or saved by the trainer with its state)
_CHECKPOINT_FILES = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    f"{WEIGHTS_NAME}.index.json",
    *REMOTE_CODE_FILES,
    *_TOKENIZER_FILES,
    "trainer_state.*",
)


def replace_refusal(directory: Path) -> str | None:
    """Why ``--force`` must not replace the existing, non-empty ``directory``, or None when it is a previous
    looped checkpoint: a config.json of model_type ``loopus`` and only the files such a checkpoint holds
    (no subdirectory, nothing else: those would be lost)."""
    entries = sorted(directory.iterdir())
    others = [
        p.name + "/" if p.is_dir() else p.name
        for p in entries
        if p.is_dir() or not any(fnmatch.fnmatch(p.name, pattern) for pattern in _CHECKPOINT_FILES)
    ]
    rule = "--force replaces only a previous looped checkpoint or an empty directory"
    if _model_type(directory) != "loopus":
        return f"is not a looped checkpoint (it holds {_few([p.name for p in entries])}): {rule}"
    if others:
        return f"holds files a looped checkpoint does not ({_few(others)}): {rule}"
    return None


def _few(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _model_type(path: Path):
    """The model_type in ``path/config.json``, or None when there is none to read."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return config.get("model_type") if isinstance(config, dict) else None


# ------------------------------------------------------------------------------------------ loading


def check_checkpoint(path: str | Path) -> Path:
    """A one-line LoopusError unless ``path`` is a looped checkpoint with readable, complete weights files."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise LoopusError(f"checkpoint {path} does not exist; pass a directory written by `loopus convert`")
    file = path / "config.json"
    if not file.is_file():
        raise LoopusError(_adapter_only(path) or f"{path} is not a looped checkpoint: config.json is missing")
    config = read_json(file)
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "loopus":
        hint = (
            " (an official LoopUS checkpoint: import it with `loopus convert`)" if model_type == "lds" else ""
        )
        raise LoopusError(
            f"{path} is not a looped checkpoint (model_type {model_type!r}){hint}; "
            "make one with `loopus convert MODEL --split A:B --out DIR`"
        )
    _check_loop_counts(path, config)
    files = weights_files(path)
    if not files:
        raise LoopusError(f"{path} has no weights file ({WEIGHTS_NAME}); convert the model again")
    for weights in files:
        if not weights.is_file():
            raise LoopusError(f"{path}: weights file {weights.name} is missing; convert the model again")
        read_header(weights)
    return path


def _adapter_only(path: Path) -> str | None:
    """The message for a checkpoint directory that holds a LoRA adapter and no model (None: it does not):
    a LoRA run writes the merged looped checkpoint only into its last checkpoint."""
    if not any(path.glob("adapter_config.json")) and not any(path.glob("*/adapter_config.json")):
        return None
    run = path.parent.parent if path.parent.name == "checkpoints" else Path("RUN")
    try:  # the base checkpoint the run trains (run.json, written by `loopus finetune`)
        base = json.loads((run / "run.json").read_text())["config"]["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        base = "BASE"
    return (
        f"{path} holds a LoRA adapter, not a looped checkpoint (no config.json): a LoRA run writes the "
        f"merged model only into its last checkpoint; finish the run (`loopus finetune {base} --out {run} "
        "--resume`, its other flags as before) and use that checkpoint"
    )


def _check_loop_counts(path: Path, config: dict) -> None:
    """The loop counts a checkpoint's config.json sets are capped like ``--loops`` (a saved num_loops of
    100000 would run for an hour): at most :data:`~loopus_core.checks.MAX_LOOPS`."""
    for key in ("num_loops", "min_loops", "max_loops"):
        value = config.get(key)
        if value is not None:
            check_int(value, f"{path}: config.json's {key}", 1, MAX_LOOPS, why="pass --loops to run fewer")


def load_looped(path: str | Path, dtype: str = "float32", device: str = "cpu") -> LoopusForCausalLM:
    """Load a looped checkpoint in eval mode; one-line LoopusError for anything but a complete one, with
    weights that fit its config and hold only finite numbers (NaN weights generate nothing, silently)."""
    path = check_checkpoint(path)
    torch_dtype = resolve_dtype(dtype)
    torch_device = resolve_device(device)
    try:
        model, info = LoopusForCausalLM.from_pretrained(
            path, dtype=torch_dtype, output_loading_info=True, ignore_mismatched_sizes=True
        )  # a tensor of another shape: check_loading_info names it (transformers would point at a report)
    except LoopusError:
        raise
    except Exception as exc:
        raise LoopusError(f"cannot load the looped checkpoint {path}: {first_line(exc)}") from None
    check_loading_info(info, str(path), "the checkpoint is damaged: convert the model again")
    check_finite(model, path)
    return model.to(torch_device).eval()


def check_finite(model: torch.nn.Module, path: str | Path) -> None:
    """A one-line LoopusError naming the first parameter that holds a NaN or an infinite value."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.is_floating_point() and not bool(torch.isfinite(param).all()):
                bad = "NaN" if bool(torch.isnan(param).any()) else "infinite"
                raise LoopusError(
                    f"{path}: tensor {name} holds {bad} values (a diverged training run or a damaged file); "
                    "load an earlier checkpoint or convert the model again"
                )


def load_with_tokenizer(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[LoopusForCausalLM, object]:
    """A looped checkpoint in fp32 on ``device`` and the tokenizer saved next to it (one-line errors)."""

    model = load_looped(str(path), dtype="float32", device=str(device))
    return model, load_tokenizer(path)


def load_tokenizer(path: str | Path):
    """The tokenizer saved next to a looped checkpoint, never one that needs the checkpoint's own code; a
    one-line LoopusError with transformers' reason when there is none to load."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(Path(path).expanduser()), trust_remote_code=False)
    except Exception as exc:
        raise LoopusError(
            f"{path} has no tokenizer loopus can load ({first_line(exc, 160)}); save a tokenizer next to the "
            "checkpoint (convert from a model directory that has one)"
        ) from None

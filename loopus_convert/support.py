"""Which causal-LM types of the installed transformers loop: each one built tiny from its config class and
checked, or refused with the reason.

:func:`tiny_config` shrinks a type's default config (4 layers, hidden 64; a per-type override where the
defaults cannot be shrunk, :data:`OVERRIDES`); :func:`check_type` builds a random model from it and either
states why it cannot loop (:func:`loopus_core.models.model_refusal`) or checks the looped model: one loop
reproduces the base logits with left padding, two loops differ, cached greedy generation at K = 2 and 3
equals the uncached recomputation (``full``), ``first`` cached equals its uncached forward, and ``last`` in
one call equals ``full``. ``python -m loopus_convert.support --write`` regenerates the support table
(``docs/support.md``, ``docs/support.json``, and ``docs/support_multimodal.json`` for the types with a text
model inside, read from their configs: :func:`multimodal_rows`); ``tests/convert/test_families.py`` and
``tests/convert/test_composite.py`` keep them true.
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from loopus_core.models import model_refusal, text_config

log = logging.getLogger(__name__)

LAYERS = 4
SPLIT = "1:3"
SHRINK = dict(
    num_hidden_layers=LAYERS,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=256,
    max_position_embeddings=256,
    sliding_window=6,
    attention_chunk_size=6,
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    first_k_dense_replace=1,
    kv_lora_rank=32,
    q_lora_rank=32,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=16,
    rotary_dim=8,
    index_head_dim=16,
    index_n_heads=2,
    n_group=1,
    topk_group=1,
    vocab_size_per_layer_input=256,
    hidden_size_per_layer_input=16,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
OVERRIDES: dict[str, dict] = {
    "gpt_neo": {"attention_types": [[["global", "local"], 2]]},
}
MAX_PARAMETERS = 30_000_000  # a tiny config that stays larger than this is not tested (its row says so)


def causal_lm_types() -> list[str]:
    """Every model type in transformers' causal-LM auto mapping, sorted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def tiny_config(model_type: str, **changes):
    """The type's config shrunk to 4 layers and hidden 64 (its text config, for a composite type);
    ``changes`` (e.g. ``num_hidden_layers=6, vocab_size=384``) on top."""
    from transformers import AutoConfig

    default = text_config(AutoConfig.for_model(model_type))
    settings = {**SHRINK, **OVERRIDES.get(model_type, {}), **changes}
    attribute_map = getattr(default, "attribute_map", {}) or {}
    known = set(default.to_dict()) | set(attribute_map)
    kwargs = {attribute_map.get(k, k): v for k, v in settings.items() if k in known}
    if "layer_types" in known:
        kwargs["layer_types"] = None
    if "qk_rope_head_dim" in known:  # MLA: the rotary part of a head is its head_dim, K/V heads = heads
        kwargs["head_dim"] = settings["qk_rope_head_dim"]
        kwargs[attribute_map.get("num_key_value_heads", "num_key_value_heads")] = settings[
            "num_attention_heads"
        ]
    config = type(default)(**{**_fixed(default), **kwargs})
    _fit_layer_lists(config, settings["num_hidden_layers"])
    return config


def _fixed(default) -> dict:
    """Settings of the default config that the constructor would not recompute (kept as they are)."""
    return {k: v for k, v in default.to_dict().items() if k in ("rope_parameters", "rope_scaling")}


def _fit_layer_lists(config, layers: int) -> None:
    """Per-layer lists of the default's length cut or repeated to the tiny model's layer count."""
    for name, value in list(vars(config).items()):
        if isinstance(value, list) and value and name.endswith(("layer_types", "_layers_block_type")):
            if len(value) != layers:
                setattr(config, name, [value[i % len(value)] for i in range(layers)])


@dataclass
class TypeResult:
    """One causal-LM type: ``supported`` with its measured differences, or refused with the reason."""

    model_type: str
    status: str  # "supported" | "refused" | "untested" (no tiny model could be built) | "error"
    reason: str = ""
    causal_lm: str = ""  # the class that was built
    one_loop_diff: float | None = None  # max |logits(1 loop) - logits(base)|, left padding
    two_loop_diff: float | None = None  # max |logits(2 loops) - logits(base)|
    cached_diff: float | None = None  # max over K = 2, 3 and the strategies of |cached - uncached|


def _left_padded(batch: int = 2, length: int = 9, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 250, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return ids, mask


def _recomputed(model, sequences, prompt_mask, new: int, **kwargs) -> torch.Tensor:
    """Uncached logits (B, new, V) of the generated steps from one forward over the whole sequence."""
    full = sequences[:, :-1]
    extra = torch.ones(full.shape[0], full.shape[1] - prompt_mask.shape[1], dtype=prompt_mask.dtype)
    mask = torch.cat([prompt_mask, extra], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(full, attention_mask=mask, position_ids=positions, **kwargs).logits
    start = prompt_mask.shape[1] - 1
    return logits[:, start : start + new]


def _cached_vs_uncached(model, ids, mask, new: int = 5) -> float:
    """Greedy cached generation at K = 2 and 3 (``full``) and K = 3 (``first``) against the uncached
    recomputation; ``last`` in one call against ``full``. The largest difference."""
    worst = 0.0
    settings = dict(do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    for loops, strategy in ((2, "full"), (3, "full"), (3, "first")):
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new,
            min_new_tokens=new,
            num_loops=loops,
            kv_strategy=strategy,
            **settings,
        )
        cached = torch.stack(out.logits, dim=1)  # (B, new, V)
        uncached = _recomputed(model, out.sequences, mask, new, num_loops=loops, kv_strategy=strategy)
        worst = max(worst, (cached - uncached).abs().max().item())
    full = model(ids, attention_mask=mask, num_loops=3, use_cache=True, kv_strategy="full").logits
    last = model(ids, attention_mask=mask, num_loops=3, use_cache=True, kv_strategy="last").logits
    return max(worst, (full - last).abs().max().item())


def check_type(model_type: str, workdir: Path | None = None) -> TypeResult:
    """Build a tiny random model of ``model_type`` and check it loops (or say why it cannot).

    With ``workdir``, the model is also saved there and converted through :func:`convert_model` (what
    ``loopus convert`` runs), and the loaded checkpoint's one loop is compared with the base too."""
    from transformers import AutoConfig

    from loopus_convert.build import loop_base_model
    from loopus_core.models import config_refusal

    try:
        reason = config_refusal(AutoConfig.for_model(model_type))
    except Exception as exc:  # transformers cannot build this type's default config
        return TypeResult(model_type, "untested", f"no default config builds: {_first(exc)}")
    if reason is not None:
        return TypeResult(model_type, "refused", reason)
    ids, mask = _left_padded()
    try:
        base, reference = _tiny_base(model_type, ids, mask)
    except Exception as exc:  # transformers' own tiny model of this type does not build or run
        return TypeResult(model_type, "untested", f"no tiny model runs: {type(exc).__name__}: {_first(exc)}")
    if isinstance(base, str):
        return TypeResult(model_type, "untested", base)
    reason = model_refusal(base)
    if reason is not None:
        return TypeResult(model_type, "refused", reason, type(base).__name__)
    with torch.no_grad():
        looped = loop_base_model(base, SPLIT)
        one = looped(ids, attention_mask=mask, num_loops=1).logits
        two = looped(ids, attention_mask=mask, num_loops=2).logits
        cached = _cached_vs_uncached(looped, ids, mask)
        one_diff = (one - reference).abs().max().item()
        if workdir is not None:
            one_diff = max(one_diff, _converted_diff(base, workdir, ids, mask, reference))
    return TypeResult(
        model_type,
        "supported",
        causal_lm=type(base).__name__,
        one_loop_diff=one_diff,
        two_loop_diff=(two - reference).abs().max().item(),
        cached_diff=cached,
    )


def _first(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1][:160] if lines else ""


def _tiny_base(model_type: str, ids, mask):
    """The type's tiny random base model (fp32, eval) and its logits on ``ids``; a reason string instead of
    the model when the tiny config stays too large to test."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type)
    with torch.device("meta"):
        size = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    if size > MAX_PARAMETERS:
        return f"its tiny config still has {size / 1e6:.0f}M parameters", None
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        return base, base(input_ids=ids, attention_mask=mask).logits


def _converted_diff(base, workdir: Path, ids, mask, reference) -> float:
    """Save ``base``, convert it with :func:`convert_model` at :data:`SPLIT`, load it back: one loop's max
    difference from ``reference``."""
    from loopus_convert.checkpoint import load_looped
    from loopus_convert.convert import convert_model

    base.save_pretrained(workdir / "base")
    result = convert_model(str(workdir / "base"), workdir / "looped", split=SPLIT)
    model = load_looped(result.out)
    return (model(ids, attention_mask=mask, num_loops=1).logits - reference).abs().max().item()


def support_table(results: list[TypeResult]) -> str:
    """The README's support table (Markdown): every type, its status and reason."""
    from transformers import __version__

    count = {s: sum(r.status == s for r in results) for s in ("supported", "refused", "untested")}
    lines = [
        f"transformers {__version__}: {count['supported']} of {len(results)} causal-LM types loop, "
        f"{count['refused']} are refused with the reason below, {count['untested']} could not be tested "
        "(their own tiny model does not build or run here) (`python -m loopus_convert.support --write`, kept "
        "true by `tests/convert/test_families.py`).",
        "",
        "| model type | causal LM class | status |",
        "|---|---|---|",
    ]
    for r in results:
        status = "supported" if r.status == "supported" else f"{r.status}: {r.reason}"
        lines.append(f"| `{r.model_type}` | {r.causal_lm or '-'} | {status} |")
    return "\n".join(lines) + "\n"


def multimodal_rows(results: list[TypeResult]) -> list[dict]:
    """Every other config type of the installed transformers with a text config of another type (multimodal,
    audio, retrieval ...): opened through its text model (the status of that causal-LM type in
    ``results``), or refused with the reason. Read from the configs alone; no model is built."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    from loopus_core.models import composite_text_config, config_refusal

    status = {r.model_type: r for r in results}
    rows = []
    for model_type in sorted(set(CONFIG_MAPPING_NAMES) - set(status)):
        try:
            config = AutoConfig.for_model(model_type)
        except Exception:  # no default config builds: not listed (nothing says what its text part is)
            continue
        text = text_config(config)
        if text is config:
            continue
        reason = config_refusal(config)
        opened = composite_text_config(config)
        row = {"model_type": model_type, "text_model_type": text.model_type, "status": "refused"}
        row["reason"] = ""
        if reason is not None:
            row["reason"] = reason
        elif opened is not None and opened.model_type in status:
            row["status"] = status[opened.model_type].status
            row["reason"] = status[opened.model_type].reason
        rows.append(row)
    return rows


def multimodal_table(rows: list[dict]) -> str:
    """The support table's second part (Markdown): the types opened through their text model."""
    opened = sum(r["status"] == "supported" for r in rows)
    lines = [
        "",
        f"Types with a text model inside (multimodal, audio ...): {len(rows)}; {opened} are opened through "
        "their text model, which loops (`loopus_core.models.composite_text_config`: one log line says so; "
        "the status is the text type's above, tiny composites of `gemma3`, `mistral3` and `llama4` are "
        "converted in `tests/convert/test_composite.py`), the others are refused with the reason.",
        "",
        "| model type | text model type | status |",
        "|---|---|---|",
    ]
    for r in rows:
        opened = r["status"] == "supported"
        status = "opened through its text model" if opened else f"{r['status']}: {r['reason']}"
        lines.append(f"| `{r['model_type']}` | `{r['text_model_type']}` | {status} |")
    return "\n".join(lines) + "\n"


DOCS = Path(__file__).resolve().parent.parent / "docs"


def main(argv: list[str] | None = None) -> None:
    """Check every causal-LM type of the installed transformers; ``--write`` updates docs/support.*."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--write", action="store_true", help="write docs/support.md, support.json, support_multimodal.json"
    )
    parser.add_argument(
        "--multimodal-only",
        action="store_true",
        help="with --write: keep docs/support.json's causal-LM rows, rewrite the multimodal part only",
    )
    parser.add_argument("types", nargs="*", help="model types (default: all)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    if args.multimodal_only:
        saved = [TypeResult(**row) for row in json.loads((DOCS / "support.json").read_text())]
        return write_tables(saved) if args.write else None
    results = []
    for model_type in args.types or causal_lm_types():
        try:
            result = check_type(model_type)
        except Exception as exc:  # a type the derivation cannot run: reported, not hidden
            result = TypeResult(model_type, "error", f"{type(exc).__name__}: {str(exc).strip()[:200]}")
        print(f"{model_type}: {result.status} {result.reason}", flush=True)
        results.append(result)
    if args.write:
        write_tables(results)


def write_tables(results: list[TypeResult]) -> None:
    """docs/support.json (the causal-LM rows), docs/support_multimodal.json and docs/support.md (both)."""
    rows = multimodal_rows(results)
    DOCS.mkdir(exist_ok=True)
    (DOCS / "support.json").write_text(json.dumps([asdict(r) for r in results], indent=1) + "\n")
    (DOCS / "support_multimodal.json").write_text(json.dumps(rows, indent=1) + "\n")
    (DOCS / "support.md").write_text(support_table(results) + multimodal_table(rows))


if __name__ == "__main__":
    main()

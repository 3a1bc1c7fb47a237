"""Text generation from a looped checkpoint through ``model.generate`` (what ``loopus generate`` runs)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from loopus_convert.checkpoint import check_checkpoint, load_looped, load_tokenizer
from loopus_convert.configuration_loopus import EXIT_STRATEGIES
from loopus_core.checks import MAX_LOOPS, MAX_SEED, check_float, check_int
from loopus_core.errors import LoopusError, first_line
from loopus_core.texts import check_text


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
    seed: int = 0,
) -> None:
    """One-line errors naming the flag, the bad value and the allowed range (NaN and infinities too: a NaN
    temperature would decode greedily without a word)."""
    if num_loops is not None:
        check_int(num_loops, "--loops", 1, MAX_LOOPS)
    if max_loops is not None:
        check_int(max_loops, "--max-loops", 1, MAX_LOOPS)
    if exit_strategy is not None and exit_strategy not in EXIT_STRATEGIES:
        raise LoopusError(f"--exit-strategy {exit_strategy!r} is not one of {', '.join(EXIT_STRATEGIES)}")
    if exit_threshold is not None:
        check_float(exit_threshold, "--exit-threshold", 0.0, 1.0, low_open=True, high_open=True)
    check_int(max_new_tokens, "--max-new-tokens", 1)
    check_float(temperature, "--temperature", 0.0)
    check_float(top_p, "--top-p", 0.0, 1.0, low_open=True)
    check_int(seed, "--seed", 0, MAX_SEED)


def generate_text(
    checkpoint: str | Path,
    prompt: str,
    num_loops: int | None = None,
    exit_strategy: str | None = None,
    exit_threshold: float | None = None,
    max_loops: int | None = None,
    kl_threshold: float | None = None,
    argmax_patience: int | None = None,
    kv_strategy: str | None = None,
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
    alone means the threshold strategy. ``kl_threshold`` / ``argmax_patience`` are the settings of the
    zero-shot ``kl`` / ``argmax`` exits and ``kv_strategy`` the loop block's KV cache (``full``, ``last``,
    ``first``); the model checks them (a bad value is a one-line error). Generation stops at the model's
    context limit (``max_position_embeddings``) instead of sliding; the result says so.
    """
    check_generation_settings(
        num_loops, exit_strategy, exit_threshold, max_loops, max_new_tokens, temperature, top_p, seed
    )
    check_text(prompt, "--prompt")
    if exit_strategy is None and exit_threshold is not None:
        exit_strategy = "threshold"
    flags = dict(exit_threshold=exit_threshold, max_loops=max_loops)
    flags.update(kl_threshold=kl_threshold, argmax_patience=argmax_patience)
    strategy = exit_strategy or _saved_strategy(checkpoint)
    check_flags_apply(strategy, exit_strategy is not None, num_loops, **flags)
    model, tokenizer = _load(checkpoint, dtype, device)
    encoded = tokenizer(prompt, return_tensors="pt")
    input_ids = encoded["input_ids"].to(model.device)
    if input_ids.shape[1] == 0:
        raise LoopusError("--prompt is empty after tokenisation; give some text")
    limit = model.config.max_position_embeddings
    allowed = _fit_context(input_ids.shape[1], max_new_tokens, limit)
    settings = dict(num_loops=num_loops, exit_strategy=exit_strategy, kv_strategy=kv_strategy, **flags)
    settings = {k: v for k, v in settings.items() if v is not None}
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(seed)
    try:
        with torch.no_grad():
            output = model.generate(
                input_ids,
                attention_mask=encoded["attention_mask"].to(model.device),
                max_new_tokens=allowed,
                pad_token_id=pad,
                streamer=_streamer(tokenizer, on_text),
                **_sampling(temperature, top_p),
                **settings,
            )
    except ValueError as exc:  # bad loop / exit settings caught by the model
        raise LoopusError(first_line(exc)) from None
    new = output[0, input_ids.shape[1] :].tolist()
    loops = [int(r[0]) for r in model.loop_record][: len(new)]
    return GenerationResult(
        text=tokenizer.decode(new, skip_special_tokens=True),
        new_tokens=new,
        loops_per_token=loops,
        context_limit=limit,
        hit_context_limit=allowed < max_new_tokens and len(new) == allowed,
    )


# flag -> the exit strategies under which it does something (given under another, it would be ignored)
_STRATEGY_FLAGS = {
    "exit_threshold": ("threshold", "cdf"),
    "kl_threshold": ("kl",),
    "argmax_patience": ("argmax",),
    "max_loops": tuple(s for s in EXIT_STRATEGIES if s != "none"),
}


def check_flags_apply(strategy: str, chosen: bool, num_loops: int | None = None, **given) -> None:
    """One rule for every flag that would be silently ignored: a one-line LoopusError. ``strategy`` is the
    exit strategy the run uses (``chosen``: from --exit-strategy, else the checkpoint's); ``given`` holds
    the strategy flags (None: not given). Under early exit a token takes at most --max-loops passes and
    --loops is not read, so both together must agree."""
    whose = "" if chosen else " (the checkpoint's; choose one with --exit-strategy)"
    for name, value in given.items():
        strategies = _STRATEGY_FLAGS[name]
        if value is not None and strategy not in strategies:
            flag = "--" + name.replace("_", "-")
            needs = "--exit-strategy " + " or ".join(strategies)
            needs = "an --exit-strategy other than none" if name == "max_loops" else needs
            raise LoopusError(
                f"{flag} {value} only applies under {needs}; the exit strategy here is {strategy}{whose}, "
                "under which it would be ignored"
            )
    max_loops = given.get("max_loops")
    if max_loops is not None and num_loops is not None and max_loops != num_loops:
        raise LoopusError(
            f"--loops {num_loops} and --max-loops {max_loops}: under early exit a token takes at most "
            "--max-loops passes and --loops is not used; give one of them"
        )


def _saved_strategy(checkpoint: str | Path) -> str:
    """The exit strategy a checkpoint's config.json sets (``none`` when it sets none)."""
    path = check_checkpoint(checkpoint)
    return json.loads((path / "config.json").read_text()).get("exit_strategy") or "none"


def _load(checkpoint: str | Path, dtype: str, device: str):
    """The looped model and its tokenizer (a checkpoint without a tokenizer cannot take a text prompt)."""
    return load_looped(checkpoint, dtype=dtype, device=device), load_tokenizer(checkpoint)


def _fit_context(prompt_tokens: int, max_new_tokens: int, limit: int | None) -> int:
    """The new tokens that fit in the context limit (a one-line error when the prompt alone does not)."""
    if limit is None:
        return max_new_tokens
    if prompt_tokens >= limit:
        raise LoopusError(f"the prompt is {prompt_tokens} tokens; the model's context limit is {limit}")
    return min(max_new_tokens, limit - prompt_tokens)


def _sampling(temperature: float, top_p: float) -> dict:
    """``generate`` keyword arguments: sampling at ``temperature`` > 0, else greedy."""
    if temperature > 0:
        return dict(do_sample=True, temperature=temperature, top_p=top_p)
    return dict(do_sample=False, temperature=None, top_p=None, top_k=None)


def _streamer(tokenizer, on_text):
    """A transformers streamer that hands each finished piece of text to ``on_text`` (None: no streaming)."""
    if on_text is None:
        return None
    from transformers import TextStreamer

    class _Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            on_text(text)

    return _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)

"""How each kind of training record becomes token ids and labels (the Hugging Face ``labels`` convention).

Record kinds (:mod:`loopus_train.sources` tells them apart by their fields):

* ``text`` (``{"text": ...}``, ``.txt`` files): the text's tokens, then EOS; no labels (every next token
  is a target).
* ``chat`` (``{"messages": [{"role": ..., "content": ...}, ...]}``): the conversation rendered with the
  tokenizer's own chat template; labelled exactly on the assistant turns (their content and the template's
  end-of-turn marker, e.g. ChatML's ``<|im_end|>``), everything else -100.
* ``completion`` (``{"prompt": ..., "completion": ...}``): prompt tokens, completion tokens, EOS; labelled
  on the completion and the EOS.
* ``tokens`` (``{"input_ids": [...], "labels": [...]}``): pre-tokenised; the labels are taken as given
  (same length, -100 where unsupervised), checked against the vocabulary.

Labels follow ``*ForCausalLM.forward``: the logits at position t are scored against ``labels[t + 1]``, so
``labels == input_ids`` is plain next-token prediction and a label may also be a token that is not the
next input (a task whose answers never appear in the input).

The assistant mask: a template with ``{% generation %}`` markers gives it itself (transformers'
``apply_chat_template(..., return_assistant_tokens_mask=True)``); otherwise it comes from rendering the
conversation turn by turn (as TRL and torchtune do for templates without the markers): for the assistant turn
i, the characters between the rendering of ``messages[:i]`` with the generation prompt and the rendering of
``messages[:i + 1]`` (trailing whitespace after the end-of-turn marker left out) are the turn's (a
conversation that opens with the assistant, e.g. a greeting, has no ``messages[:0]`` to render: the turn's
start is where a placeholder answer starts in the rendering of that turn alone); a token is
labelled when its first character lies in such a span (the fast tokenizer's offset mapping). A template whose
renderings are not prefixes of each other cannot be masked this way: a one-line error.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence

import numpy as np

from loopus_core.errors import LoopusError

IGNORE = -100  # the label of an unsupervised position (Hugging Face's ignore_index)
KINDS = ("text", "chat", "completion", "tokens")
IMPLIED_LOSS = {"text": "all", "chat": "assistant", "completion": "completion", "tokens": "labels"}
LABEL_DTYPE = np.dtype("<i4")


def check_chat_template(tokenizer, label: str) -> None:
    """A one-line error when ``tokenizer`` has no chat template to render ``messages`` records with."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "this checkpoint"
        raise LoopusError(
            f"--data {label} holds chat records (messages), but the tokenizer of {name} has no chat "
            "template to render them with; use a checkpoint of an instruct model, or give the data as "
            "prompt/completion pairs"
        )


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans ``[start, end)`` of its assistant turns."""
    render = tokenizer.apply_chat_template
    full = render(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _turn_start(render, messages, i)
        upto = render(messages[: i + 1], tokenize=False)
        if before is None or not (full.startswith(upto) and upto.startswith(before)):
            raise LoopusError(_NOT_TURN_BY_TURN)
        end = len(upto.rstrip())
        spans.append((len(before), max(end, len(before))))
    return full, spans


_NOT_TURN_BY_TURN = (
    "the tokenizer's chat template does not render a conversation turn by turn (the rendering of the first "
    "turns is not a prefix of the whole), so its assistant turns cannot be masked; give the data as "
    "prompt/completion pairs or pre-tokenised input_ids/labels"
)
_PLACEHOLDER = "LOOPUS-ANSWER-PLACEHOLDER"


def _turn_start(render, messages: list[dict], i: int) -> str | None:
    """The rendering that precedes the content of assistant turn ``i``: ``messages[:i]`` with the generation
    prompt, or for a first turn (nothing before it to render) the rendering of a placeholder answer alone up
    to the placeholder; None when the template drops the placeholder."""
    if i:
        return render(messages[:i], tokenize=False, add_generation_prompt=True)
    probe = render([{"role": "assistant", "content": _PLACEHOLDER}], tokenize=False)
    at = probe.find(_PLACEHOLDER)
    return probe[:at] if at >= 0 else None


_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


def encode_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and its labels: the id on assistant tokens, else -100."""
    if _GENERATION.search(tokenizer.chat_template or ""):  # the template marks the assistant's tokens
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids = list(out["input_ids"])
        return ids, [t if m else IGNORE for t, m in zip(ids, out["assistant_masks"], strict=True)]
    text, spans = assistant_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    starts = np.array([a for a, _ in encoded["offset_mapping"]], dtype=np.int64)
    inside = np.zeros(len(ids), dtype=bool)
    for a, b in spans:
        inside |= (starts >= a) & (starts < b)
    return ids, np.where(inside, ids, IGNORE).tolist()


def encode_completion(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """Prompt tokens, completion tokens and EOS; labelled on the completion and the EOS."""
    first = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    second = tokenizer(completion, add_special_tokens=False)["input_ids"] + _eos(tokenizer)
    return first + second, [IGNORE] * len(first) + second


def check_tokens(ids: Sequence[int], labels: Sequence[int], vocab: int, where: str) -> None:
    """One-line errors for pre-tokenised ids or labels outside ``0 .. vocab - 1`` (labels may be -100) or of
    different lengths."""
    if len(ids) != len(labels):
        raise LoopusError(
            f"{where}: input_ids has {len(ids)} entries and labels {len(labels)}; give one label per "
            "token (-100 where unsupervised)"
        )
    arr, lab = np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    bad = arr[(arr < 0) | (arr >= vocab)]
    bad_labels = lab[((lab < 0) & (lab != IGNORE)) | (lab >= vocab)]
    if len(bad) or len(bad_labels):
        what, value = ("input_ids", bad[0]) if len(bad) else ("labels", bad_labels[0])
        raise LoopusError(
            f"{where}: {what} holds {value}, outside this tokenizer's vocabulary 0..{vocab - 1}"
            f"{'' if what == 'input_ids' else ' (or -100)'}; tokenise the records with the checkpoint's "
            "tokenizer"
        )


def _eos(tokenizer) -> list[int]:
    return [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]


def _pairs(pairs) -> tuple[list, list]:
    """[(a, b), ...] -> ([a, ...], [b, ...])."""
    firsts, seconds = [], []
    for a, b in pairs:
        firsts.append(a)
        seconds.append(b)
    return firsts, seconds


def encode_records(
    tokenizer, kind: str, records: list, dtype: np.dtype, first: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Encode a batch of records of one ``kind``, concatenated: (tokens, lengths per record, labels or None
    for ``text``). ``first``: the number of the batch's first record in its source (for messages)."""
    if kind == "text":
        ids = tokenizer(records, add_special_tokens=False)["input_ids"]
        ids = [x + _eos(tokenizer) for x in ids]
        labels = None
    elif kind == "chat":
        ids, labels = _pairs(encode_chat(tokenizer, m) for m in records)
    elif kind == "completion":
        ids, labels = _pairs(encode_completion(tokenizer, p, c) for p, c in records)
    elif kind == "tokens":
        ids, labels = _pairs(records)
        for n, (x, y) in enumerate(zip(ids, labels, strict=True)):
            check_tokens(x, y, len(tokenizer), f"record {first + n}")
    else:
        raise ValueError(f"unknown record kind {kind!r}")
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    total = int(lengths.sum())
    tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=total)
    if labels is None:
        return tokens, lengths, None
    return tokens, lengths, np.fromiter(itertools.chain.from_iterable(labels), dtype=LABEL_DTYPE, count=total)

"""Variable-chain programs with a depth knob, answer labels, and a hash split of held-out programs.

A program is ``n`` single assignments ``X=Y;`` over distinct variable names, where ``Y`` is a digit (hop
depth 0) or an earlier variable (hop depth = depth(Y) + 1). The statements form linear chains interleaved at
random: ``deep`` chains of exactly ``depth + 1`` statements (the target chain and, with ``deep = 2``, a second
one as long, which removes the "most frequent earlier value" shortcut) and random shorter chains filling the
rest, so a program's maximum hop depth is exactly ``depth``.

Tokens (the ``pair`` format): ``<s>`` then one token per statement ``X=Y;`` (vocabulary names x (names +
10 digits)) and the ten digits (the answers). The answer of each statement (its chain's root digit) is
predicted at the statement's own position; values never appear in the input, so a statement of hop depth d
needs d sequential look-ups inside the network. As a trainer record (:meth:`Codec.record`, the Hugging Face
convention the trainer scores: the logits at t against ``labels[t + 1]``) the program ends with ``</s>`` and
the labels are shifted one place right: ``labels[p + 1]`` = the answer of statement p, -100 elsewhere.

Split: a program's text hashes (sha256) into 100 buckets: buckets 0-4 are the test split, 5-9 the
validation split, 10-99 the training split (:func:`split_of`). The pretraining predates the three-way split
and held out buckets 0-9, so it never saw a validation or test program either. A sampler draws programs of
one split only (it rejects the others).

A port of the research generator (/work/research/depth/task.py, pair format): the same random draws in the
same order, so a seed gives the same programs.
"""

from __future__ import annotations

import hashlib
import random
import string
from collections import Counter

import torch

LETTERS = string.ascii_lowercase
DIGITS = string.digits
SPECIALS = ("<pad>", "<s>", "</s>")
PAD, BOS, EOS = 0, 1, 2
IGNORE = -100  # label of the positions that are not answers
SPLITS = {"test": (0, 5), "val": (5, 10), "train": (10, 100)}  # hash buckets [lo, hi) of each split
EVAL_SEED = 12345


class Codec:
    """The pair vocabulary: specials, the ten digits, then one token per statement ``x=y;``."""

    def __init__(self, names: int = 20) -> None:
        self.names = LETTERS[:names]
        self.vocab = (
            list(SPECIALS) + list(DIGITS) + [f"{x}={y};" for x in self.names for y in self.names + DIGITS]
        )
        self.token_id = {t: i for i, t in enumerate(self.vocab)}

    def encode(self, statements, values, depths) -> tuple[list[int], list[int], list[int]]:
        """(ids, labels, hop depths) of one program; labels / depths are -100 / -1 at ``<s>``."""
        ids, labels, hops = [BOS], [IGNORE], [-1]
        for (x, y), v, d in zip(statements, values, depths, strict=False):
            ids.append(self.token_id[f"{x}={y};"])
            labels.append(self.token_id[str(v)])
            hops.append(d)
        return ids, labels, hops

    def record(self, statements, values, depths) -> tuple[list[int], list[int], list[int]]:
        """The trainer's record of one program: (input_ids, labels, hops) with ``</s>`` appended and labels
        / hop depths shifted one place right (the logits at a statement score its answer; see the module
        docstring)."""
        ids, labels, hops = self.encode(statements, values, depths)
        return ids + [EOS], [IGNORE] + labels, [-1] + hops

    def tokenizer(self):
        """A ``PreTrainedTokenizerFast`` over this vocabulary (``<s>`` prepended), so the toolkit loads it."""
        from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.WordLevel(vocab=self.token_id, unk_token="<pad>"))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex("[a-z]=[a-z0-9];|."), behavior="isolated")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<pad>"
        )


def program_text(statements: list[tuple[str, str]]) -> str:
    """The program's text: ``a=7;b=a;...``."""
    return "".join(f"{x}={y};" for x, y in statements)


def split_of(text: str) -> str:
    """The hash split of a program's text: ``train``, ``val`` or ``test`` (see :data:`SPLITS`)."""
    bucket = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") % 100
    return next(name for name, (lo, hi) in SPLITS.items() if lo <= bucket < hi)


def is_held_out(text: str) -> bool:
    """True for a validation or test program (never trained on, nor pretrained on)."""
    return split_of(text) != "train"


def chain_lengths(rng: random.Random, n: int, depth: int, deep: int) -> list[int]:
    """``deep`` chains of ``depth + 1`` statements, then random chains of 1..depth+1 up to ``n``."""
    if not 0 <= depth < n or deep * (depth + 1) > n:
        raise ValueError(f"{deep} chain(s) of depth {depth} do not fit in {n} statements")
    lengths = [depth + 1] * deep
    left = n - deep * (depth + 1)
    while left > 0:
        size = rng.randint(1, min(depth + 1, left))
        lengths.append(size)
        left -= size
    return lengths


def make_program(rng: random.Random, n: int, depth: int, names: str, deep: int = 1):
    """One program of ``n`` statements and maximum hop depth ``depth``: (statements, values, hop depths)."""
    lengths = chain_lengths(rng, n, depth, deep)
    order = [c for c, size in enumerate(lengths) for _ in range(size)]
    rng.shuffle(order)
    chosen = rng.sample(names, n)
    roots = [rng.choice(DIGITS) for _ in lengths]
    last: dict[int, tuple[str, int]] = {}  # chain -> (its last variable, its hop depth)
    statements, values, depths = [], [], []
    for i, chain in enumerate(order):
        y, d = (last[chain][0], last[chain][1] + 1) if chain in last else (roots[chain], 0)
        statements.append((chosen[i], y))
        values.append(int(roots[chain]))
        depths.append(d)
        last[chain] = (chosen[i], d)
    return statements, values, depths


class Sampler:
    """Deterministic programs from one split of the hash split (``train``, ``val`` or ``test``)."""

    def __init__(self, seed: int, n: int, split: str, codec: Codec, deep: int = 1) -> None:
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
        self.rng = random.Random(seed)
        self.n, self.split, self.codec, self.deep = n, split, codec, deep

    def program(self, depth: int):
        """The next program of max depth ``depth`` in this sampler's split."""
        while True:
            st, vals, deps = make_program(self.rng, self.n, depth, self.codec.names, self.deep)
            if split_of(program_text(st)) == self.split:
                return st, vals, deps

    def batch(self, size: int, depths: list[int]) -> dict[str, torch.Tensor]:
        """``size`` programs, each's max depth drawn uniformly from ``depths``: input_ids / labels / hops
        (B, n + 1), the answer of a statement at its own position (the pretraining's format)."""
        rows = [self.codec.encode(*self.program(self.rng.choice(depths))) for _ in range(size)]
        ids, labels, hops = (torch.tensor([r[i] for r in rows]) for i in range(3))
        return {"input_ids": ids, "labels": labels, "hops": hops}

    def records(self, size: int, depths: list[int]) -> list[dict]:
        """``size`` trainer records (:meth:`Codec.record`; max depth uniform over ``depths``), each with its
        ``hops`` and ``depth`` too."""
        out = []
        for _ in range(size):
            depth = self.rng.choice(depths)
            ids, labels, hops = self.codec.record(*self.program(depth))
            out.append({"input_ids": ids, "labels": labels, "hops": hops, "depth": depth})
        return out


def eval_records(n: int, depths: list[int], size: int, codec: Codec, deep: int, split: str) -> list[dict]:
    """``size`` records of max depth exactly d for every d, from ``split`` (``val`` or ``test``): the same
    for every run."""
    offset = {"val": 0, "test": 1000}[split]
    return [
        r
        for d in depths
        for r in Sampler(EVAL_SEED + offset + d, n, split, codec, deep).records(size, [d])
    ]


def stack_sets(records: list[dict]) -> dict[int, dict[str, torch.Tensor]]:
    """Records grouped by max depth: input_ids / labels / hops tensors (B, n + 2) per depth."""
    out: dict[int, dict[str, torch.Tensor]] = {}
    for d in sorted({r["depth"] for r in records}):
        rows = [r for r in records if r["depth"] == d]
        out[d] = {k: torch.tensor([r[k] for r in rows]) for k in ("input_ids", "labels", "hops")}
    return out


def chance(sets: dict[int, dict[str, torch.Tensor]]) -> dict[int, float]:
    """Accuracy of guessing uniformly among a program's distinct root digits, per depth."""
    out = {}
    for d, s in sets.items():
        vals = [
            1.0 / len(set(lab[hops == 0].tolist())) for lab, hops in zip(s["labels"], s["hops"], strict=False)
        ]
        out[d] = sum(vals) / len(vals)
    return out


def majority(sets: dict[int, dict[str, torch.Tensor]]) -> dict[int, float]:
    """Accuracy of the shortcut "most frequent true value among the earlier statements", per depth."""
    out = {}
    for d, s in sets.items():
        right = total = 0
        for lab, hops in zip(s["labels"], s["hops"], strict=False):
            for p in (hops == d).nonzero().flatten().tolist():
                counts = Counter(v for v in lab[1:p].tolist() if v != IGNORE)
                if counts:
                    right += int(counts.most_common(1)[0][0] == int(lab[p]))
                    total += 1
        out[d] = right / max(1, total)
    return out

"""Variable-chain programs with a depth knob, answer labels, and a hash split of held-out programs.

A program is ``n`` single assignments ``X=Y;`` over distinct variable names, where ``Y`` is a digit (hop
depth 0) or an earlier variable (hop depth = depth(Y) + 1). The statements form linear chains interleaved at
random: ``deep`` chains of exactly ``depth + 1`` statements (the target chain and, with ``deep = 2``, a second
one as long, which removes the "most frequent earlier value" shortcut) and random shorter chains filling the
rest, so a program's maximum hop depth is exactly ``depth``.

Tokens (the ``pair`` format): ``<s>`` then one token per statement ``X=Y;`` (vocabulary names x (names +
10 digits)) and the ten digits (the answers). The answer of each statement (its chain's root digit) is the
label at its own position; values never appear in the input, so a statement of hop depth d needs d
sequential look-ups inside the network.

Split: a program's text hashes (sha256) into 100 buckets; buckets < ``HELD_OUT_PERCENT`` are held out. The
training sampler rejects held-out programs and the evaluation sampler accepts only them.

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
HELD_OUT_PERCENT = 10
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


def is_held_out(text: str) -> bool:
    """The hash split: True for programs in the held-out buckets."""
    bucket = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") % 100
    return bucket < HELD_OUT_PERCENT


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
    """Deterministic batches of programs from one side of the hash split."""

    def __init__(self, seed: int, n: int, held_out: bool, codec: Codec, deep: int = 1) -> None:
        self.rng = random.Random(seed)
        self.n, self.held_out, self.codec, self.deep = n, held_out, codec, deep

    def program(self, depth: int):
        """The next program of max depth ``depth`` on this sampler's side of the split."""
        while True:
            st, vals, deps = make_program(self.rng, self.n, depth, self.codec.names, self.deep)
            if is_held_out(program_text(st)) == self.held_out:
                return st, vals, deps

    def batch(self, size: int, depths: list[int]) -> dict[str, torch.Tensor]:
        """``size`` programs, each's max depth drawn uniformly from ``depths``: input_ids / labels / hops
        (B, n + 1)."""
        rows = [self.codec.encode(*self.program(self.rng.choice(depths))) for _ in range(size)]
        ids, labels, hops = (torch.tensor([r[i] for r in rows]) for i in range(3))
        return {"input_ids": ids, "labels": labels, "hops": hops}


def eval_sets(
    n: int, depths: list[int], size: int, codec: Codec, deep: int
) -> dict[int, dict[str, torch.Tensor]]:
    """Held-out programs of max depth exactly d, for every d (the same for every run of a seed-free set)."""
    return {
        d: Sampler(EVAL_SEED + d, n, held_out=True, codec=codec, deep=deep).batch(size, [d]) for d in depths
    }


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

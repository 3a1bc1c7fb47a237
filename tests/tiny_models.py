"""Tiny models built from configs, one per supported family, and a tiny byte-level BPE tokenizer.

Everything here is deterministic and offline. ``conftest.py`` saves each model once per test session.
"""

from __future__ import annotations

import inspect
import json
import textwrap
from pathlib import Path

import torch

HIDDEN = 64
LAYERS = 8
VOCAB = 384

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=128,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def tiny_config(family: str):
    """A transformers config of the given family with 8 layers and hidden size 64."""
    import transformers as tf

    if family == "llama":
        return tf.LlamaConfig(**_COMMON)
    if family == "mistral":
        return tf.MistralConfig(**_COMMON, sliding_window=None)
    if family == "qwen2":
        return tf.Qwen2Config(**_COMMON)
    if family == "qwen3":
        return tf.Qwen3Config(**_COMMON, head_dim=16)
    if family == "gemma3_text":  # tied embeddings, sliding-window layers mixed with full attention
        return tf.Gemma3TextConfig(**{**_COMMON, "tie_word_embeddings": True}, head_dim=16, sliding_window=16,
                                   query_pre_attn_scalar=16)
    if family == "phi3":
        return tf.Phi3Config(**_COMMON)
    if family == "olmo2":
        return tf.Olmo2Config(**_COMMON)
    if family == "gpt_neox":
        cfg = {k: v for k, v in _COMMON.items() if k not in ("num_key_value_heads",)}
        return tf.GPTNeoXConfig(**cfg, rotary_pct=0.5)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=512,
                             bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)
    raise ValueError(family)


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3", "olmo2", "gpt_neox", "gpt2")


def _training_text() -> list[str]:
    """Varied text to train the tiny tokenizer on: prose, code, numbers."""
    import json as json_module
    import textwrap as textwrap_module

    prose = [
        "The quick brown fox jumps over the lazy dog.",
        "It was the best of times, it was the worst of times, it was the age of wisdom.",
        "Call me Ishmael. Some years ago, never mind how long precisely, I thought I would sail about.",
        "Q: What is 12 plus 30? A: 12 plus 30 is 42.",
        "User: Hello, how are you today? Assistant: I am well, thank you for asking.",
    ]
    code = [inspect.getsource(json_module), inspect.getsource(textwrap_module)]
    numbers = [" ".join(f"{i} + {j} = {i + j}." for i in range(20) for j in range(0, 20, 3))]
    return prose * 20 + code + numbers


def make_tokenizer(path: Path):
    """Train a byte-level BPE tokenizer of VOCAB entries and save it as a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>")
    fast.save_pretrained(path)
    return fast


def make_tiny_model(family: str, path: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Build the tiny model of ``family`` (seeded weights, perturbed norms) and save it with the tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # norm weights away from their init so that a dropped norm shows
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.add_(0.2 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


def write_text_files(folder: Path) -> Path:
    """A folder with a .txt and a .jsonl file, for --data tests."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.txt").write_text("\n\n".join(_training_text()[:40]))
    with (folder / "b.jsonl").open("w") as fh:
        for line in _training_text()[40:]:
            fh.write(json.dumps({"text": textwrap.shorten(line, 2000)}) + "\n")
    return folder

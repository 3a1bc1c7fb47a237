"""Multimodal (composite) checkpoints whose text part is a causal LM are opened through their text model
(issue 22 item 6): a tiny model of each is built from its config class (tiny text and vision configs), saved,
converted by `loopus convert`'s code, and its one loop = the text model's logits."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from loopus_convert import convert_model, load_looped, loop_base_model
from loopus_convert.support import tiny_config
from loopus_core.errors import LoopusError
from loopus_core.models import open_model

TINY_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    image_size=28,
    patch_size=14,
    vision_output_dim=32,
    projector_input_dim=32,
    projector_output_dim=32,
    out_hidden_size=64,
    depth=1,
)


def tiny_composite(model_type: str, **text_changes):
    """A tiny random composite model (fp32, eval) of ``model_type``: its text config shrunk like the support
    table's (``text_changes`` on top), its vision config to one small layer."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    default = AutoConfig.for_model(model_type)
    kwargs = {"text_config": tiny_config(default.get_text_config().model_type, **text_changes).to_dict()}
    vision = getattr(default, "vision_config", None)
    if vision is not None:
        known = set(vision.to_dict())
        kwargs["vision_config"] = {k: v for k, v in TINY_VISION.items() if k in known}
    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_config(type(default)(**kwargs), dtype=torch.float32).eval()


IDS = torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(0))
MASK = torch.ones_like(IDS)
MASK[0, :3] = 0


@pytest.fixture(scope="module")
def composites(tmp_path_factory):
    """model type -> (saved directory, the composite's text-only logits on IDS)."""
    out = {}
    for model_type in ("gemma3", "mistral3", "llama4"):
        model = tiny_composite(model_type)
        with torch.no_grad():
            logits = model(input_ids=IDS, attention_mask=MASK).logits
        directory = tmp_path_factory.mktemp("composite") / model_type
        model.save_pretrained(directory)  # transformers saves the hub's names (language_model.model. ...)
        out[model_type] = (directory, logits)
        if model_type == "mistral3":  # also under the in-memory names (model.language_model. ...)
            again = tmp_path_factory.mktemp("composite") / model_type
            model.save_pretrained(again)
            state = {k: v.contiguous() for k, v in model.state_dict().items()}
            assert model.config.tie_word_embeddings
            state.pop("lm_head.weight")  # tied: stored once
            save_file(state, again / "model.safetensors", metadata={"format": "pt"})
            out["mistral3 in-memory names"] = (again, logits)
    return out


@pytest.mark.parametrize("case", ["gemma3", "mistral3", "mistral3 in-memory names", "llama4"])
def test_composite_opens_its_text_model(composites, case, tmp_path, caplog):
    directory, reference = composites[case]
    model_type = case.split()[0]
    with caplog.at_level(logging.INFO, logger="loopus_core.models"):
        opened = open_model(str(directory), need_tokenizer=False)
    assert "ForConditionalGeneration" not in type(opened.model).__name__
    notes = [r.getMessage() for r in caplog.records if "multimodal checkpoint" in r.getMessage()]
    assert len(notes) == 1 and f"model type '{model_type}'" in notes[0]
    with torch.no_grad():
        text = opened.model(input_ids=IDS, attention_mask=MASK).logits
        torch.testing.assert_close(text, reference, atol=1e-4, rtol=0)
        looped = loop_base_model(opened.model, "1:3")
        one = looped(IDS, attention_mask=MASK, num_loops=1).logits
        torch.testing.assert_close(one, text, atol=1e-4, rtol=0)
        convert_model(str(directory), tmp_path / "looped", split="1:3")  # what `loopus convert` runs
        converted = load_looped(tmp_path / "looped")
        assert converted.config.base_config.model_type == opened.model.config.model_type
        for loops in (1, 2):
            got = converted(IDS, attention_mask=MASK, num_loops=loops).logits
            want = looped(IDS, attention_mask=MASK, num_loops=loops).logits
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        assert (converted(IDS, attention_mask=MASK, num_loops=2).logits - text).abs().max() > 1e-3


@pytest.mark.families
def test_composite_analyze_then_convert_cli(cli, tiny_tokenizer_dir, tmp_path, figures_not_drawn):
    """`loopus analyze` runs end to end on a composite (tiny budget); `loopus convert --split auto` takes its
    analysis and says which model it opened."""
    from transformers import AutoTokenizer

    path = tmp_path / "gemma3"
    tiny_composite("gemma3", num_hidden_layers=6, vocab_size=384).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_tokenizer_dir).save_pretrained(path)
    fast = ("--tokens", "256", "--seq-len", "32", "--map-tokens", "400", "--device", "cpu", "--no-probes")
    code, _, stderr = cli("analyze", path, "--out", tmp_path / "report", *fast)
    assert code == 0, stderr
    analysis = json.loads((tmp_path / "report" / "analysis.json").read_text())
    assert analysis["model"]["model_type"] == "gemma3_text"
    code, stdout, stderr = cli(
        "convert", path, "--split", "auto", "--from", tmp_path / "report", "--out", tmp_path / "looped"
    )
    assert code == 0, stderr
    said = " ".join((stdout + stderr).split())
    assert said.count("is a multimodal checkpoint (model type 'gemma3')") == 1, said
    assert analysis["split"] in stdout


def test_composite_whose_text_part_has_no_causal_lm_is_one_line(tmp_path):
    model = tiny_composite("qwen2_5_vl")
    model.save_pretrained(tmp_path / "qwen2_5_vl")
    with pytest.raises(LoopusError) as info:
        open_model(str(tmp_path / "qwen2_5_vl"), need_tokenizer=False)
    message = str(info.value)
    assert "\n" not in message and "'qwen2_5_vl'" in message and "'qwen2_5_vl_text'" in message


@pytest.mark.families
def test_multimodal_table_is_the_generated_one():
    """docs/support_multimodal.json (and the table in docs/support.md) is what the installed transformers'
    configs say, with the causal-LM rows of docs/support.json; the types built above read as they ran."""
    from loopus_convert.support import DOCS, TypeResult, multimodal_rows, multimodal_table

    saved = [TypeResult(**row) for row in json.loads((DOCS / "support.json").read_text())]
    rows = multimodal_rows(saved)
    assert rows == json.loads((DOCS / "support_multimodal.json").read_text())
    assert (DOCS / "support.md").read_text().endswith(multimodal_table(rows))
    status = {row["model_type"]: row["status"] for row in rows}
    assert status["mistral3"] == "supported" and status["qwen2_5_vl"] == "refused"

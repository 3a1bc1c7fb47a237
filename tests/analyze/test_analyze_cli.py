"""``loopus analyze`` on the tiny model of every family, and every kind of bad input (one test each)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from loopus_core.split import LayerSplit
from tests.tiny_models import FAMILIES, LAYERS

# small budgets: 3 measuring batches of 8 x 31 tokens (bootstrap needs >= 2), 2 + 8 map windows
FAST = ("--tokens", "512", "--seq-len", "32", "--map-tokens", "222", "--device", "cpu", "--seed", "0")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and 2 threads on a loaded 2-core machine are very slow."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def read_analysis(out: Path) -> dict:
    return json.loads((out / "analysis.json").read_text())


@pytest.mark.parametrize("family", FAMILIES)
def test_analyze_every_family(cli, tiny_model_dirs, tmp_path, family, request):
    out = tmp_path / "report"
    probes = () if family in ("llama", "gpt2") else ("--no-probes",)
    if probes:  # llama and gpt2 (with probes) draw the report's figures; the others build them, not drawn
        request.getfixturevalue("figures_not_drawn")
    code, stdout, stderr = cli("analyze", tiny_model_dirs[family], "--out", out, *FAST, *probes)
    assert code == 0, stderr
    analysis = read_analysis(out)
    assert analysis["schema_version"] == 2
    split = LayerSplit.parse(analysis["split"], LAYERS)
    assert split.loop_size >= 2 and split.start >= 1 and split.end <= LAYERS - 1
    assert analysis["decision"]["recommended"]["split"] == analysis["split"]
    assert analysis["convert_command"].endswith(f"--split {analysis['split']} --out looped/{family}-loop"
                                                f"{split.start}-{split.end}")
    cka = np.array(analysis["measurements"]["cka_debiased"], dtype=float)
    assert cka.shape == (LAYERS + 1, LAYERS + 1) and not np.isnan(cka).any()
    assert analysis["repeat_map"]["tokens"] > 0 and analysis["decision"]["report_text"]["tokens"] > 0
    repeat = np.array(analysis["repeat_map"]["repeat"]["delta_nll"], dtype=float)
    assert np.isfinite(repeat[split.start, split.end])  # every valid split is on the map
    assert np.isfinite(repeat[1, LAYERS - 1]) and np.isnan(repeat[0, 3])
    assert bool(analysis["measurements"]["probes"]) == (not probes)
    assert f"recommended split: {analysis['split']}" in stdout
    assert str(out / "report.html") in stdout.replace("\n", "")
    html = (out / "report.html").read_text()
    assert f'id="recommended-split">{analysis["split"]}<' in html
    assert sorted(p.name for p in out.iterdir()) == ["analysis.json", "report.html"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left


def test_rerun_replaces_the_report_in_place(cli, tiny_llama_dir, tmp_path, figures_not_drawn):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, stderr = cli("analyze", tiny_llama_dir, "--out", out, *FAST, "--no-probes", "--seed", "1")
    assert code == 0, stderr
    assert (out / "notes.txt").read_text() == "mine"
    assert read_analysis(out)["provenance"]["seed"] == 1


# ----------------------------------------------------------------------------------------- bad input


def assert_one_line_error(code: int, stdout: str, stderr: str, *needles: str) -> str:
    assert code == 2, (stdout, stderr)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr + stdout
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def run_bad(cli, tmp_path, *args) -> tuple[int, str, str, Path]:
    out = tmp_path / "nested" / "out"
    code, stdout, stderr = cli("analyze", *args, "--out", out)
    assert not out.exists() and not (tmp_path / "nested").exists()  # nothing half-written, no parents left
    return code, stdout, stderr, out


def test_model_path_that_does_not_exist(cli, tmp_path):
    code, stdout, stderr, _ = run_bad(cli, tmp_path, tmp_path / "no-such-model", *FAST)
    assert_one_line_error(code, stdout, stderr, "does not exist")


def test_directory_without_a_model(cli, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, stdout, stderr, _ = run_bad(cli, tmp_path, empty, *FAST)
    assert_one_line_error(code, stdout, stderr, "config.json is missing")


def test_non_causal_model(cli, tmp_path):
    from transformers import BertConfig, BertModel

    path = tmp_path / "bert"
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32)
    BertModel(config).save_pretrained(path)
    code, stdout, stderr, _ = run_bad(cli, tmp_path, path, *FAST)
    assert_one_line_error(code, stdout, stderr, "'bert' is not a decoder-only causal language model")


def test_refused_hybrid_type(cli, tmp_path):
    """A hybrid whose linear-attention layers carry a recurrent state cannot loop: one line naming the layers
    and why, decided from the config."""
    path = tmp_path / "qwen3_next"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "qwen3_next", "num_hidden_layers": 4}))
    code, stdout, stderr, _ = run_bad(cli, tmp_path, path, *FAST)
    line = assert_one_line_error(code, stdout, stderr, "'qwen3_next' cannot loop")
    assert "layers 0, 1, 2 (layer types linear_attention) carry a recurrent state" in line


def test_empty_data_file(cli, tiny_llama_dir, tmp_path):
    data = tmp_path / "empty.txt"
    data.write_text("  \n\n")
    code, stdout, stderr, _ = run_bad(cli, tmp_path, tiny_llama_dir, "--data", data, *FAST)
    assert_one_line_error(code, stdout, stderr, "holds no text")


def test_unreadable_data_file(cli, tiny_llama_dir, tmp_path):
    data = tmp_path / "weights.txt"
    data.write_bytes(bytes(range(256)) * 4)
    code, stdout, stderr, _ = run_bad(cli, tmp_path, tiny_llama_dir, "--data", data, *FAST)
    assert_one_line_error(code, stdout, stderr, "binary")


def test_data_path_that_does_not_exist(cli, tiny_llama_dir, tmp_path):
    code, stdout, stderr, _ = run_bad(cli, tmp_path, tiny_llama_dir, "--data", tmp_path / "nope.txt", *FAST)
    assert_one_line_error(code, stdout, stderr, "does not exist")


def test_zero_tokens(cli, tiny_llama_dir, tmp_path):
    code, stdout, stderr, _ = run_bad(cli, tmp_path, tiny_llama_dir, "--tokens", "0", "--seq-len", "32")
    assert_one_line_error(code, stdout, stderr, "--tokens 0 is out of range")


def test_fewer_tokens_than_one_batch(cli, tiny_llama_dir, tmp_path):
    code, stdout, stderr, _ = run_bad(cli, tmp_path, tiny_llama_dir, "--tokens", "100", "--seq-len", "32")
    assert_one_line_error(code, stdout, stderr, "less than one batch")


def test_loop_layers_that_leave_no_valid_split(cli, tiny_llama_dir, tmp_path):
    code, stdout, stderr, _ = run_bad(cli, tmp_path, tiny_llama_dir, *FAST, "--loop-layers", "7")
    assert_one_line_error(code, stdout, stderr, "--loop-layers 7 leaves no valid split", "2..6 layers")
    code, stdout, stderr, _ = run_bad(cli, tmp_path, tiny_llama_dir, *FAST, "--loop-layers", "3:5")
    assert_one_line_error(code, stdout, stderr, "--loop-layers '3:5' is malformed")


def test_bad_repeat_budget_and_map_tokens(cli, tiny_llama_dir, tmp_path):
    code, stdout, stderr, _ = run_bad(cli, tmp_path, tiny_llama_dir, *FAST, "--repeat-budget", "-1")
    assert_one_line_error(code, stdout, stderr, "--repeat-budget -1.0 is out of range")
    code, stdout, stderr, _ = run_bad(cli, tmp_path, tiny_llama_dir, "--map-tokens", "10", *FAST[:4])
    assert_one_line_error(code, stdout, stderr, "--map-tokens 10 is out of range", ">= 111",
                          "one map window of 128 tokens")


def test_bad_dtype_and_device(cli, tiny_llama_dir, tmp_path):
    code, stdout, stderr, _ = run_bad(cli, tmp_path, tiny_llama_dir, *FAST[:4], "--dtype", "int8")
    assert_one_line_error(code, stdout, stderr, "--dtype")
    code, stdout, stderr, _ = run_bad(cli, tmp_path, tiny_llama_dir, *FAST[:4], "--device", "tpu")
    assert_one_line_error(code, stdout, stderr, "--device")


def test_output_under_a_regular_file(cli, tiny_llama_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    out = blocker / "sub" / "out"
    code, stdout, stderr = cli("analyze", tiny_llama_dir, "--out", out, *FAST)
    assert_one_line_error(code, stdout, stderr, "cannot be created", "is a file")
    assert blocker.read_text() == "not a directory"


def test_output_is_an_existing_file(cli, tiny_llama_dir, tmp_path):
    out = tmp_path / "report.html"
    out.write_text("keep me")
    code, stdout, stderr = cli("analyze", tiny_llama_dir, "--out", out, *FAST)
    assert_one_line_error(code, stdout, stderr, "is not a directory")
    assert out.read_text() == "keep me"


def test_existing_output_is_unchanged_on_error(cli, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "analysis.json").write_text('{"old": true}')
    code, stdout, stderr = cli("analyze", tmp_path / "missing-model", "--out", out, *FAST)
    assert_one_line_error(code, stdout, stderr, "does not exist")
    assert [p.name for p in out.iterdir()] == ["analysis.json"]
    assert (out / "analysis.json").read_text() == '{"old": true}'
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# --------------------------------------------------------------------------------------------- escaping


def test_user_strings_are_escaped_in_the_html(cli, tiny_llama_dir, tmp_path):
    evil = "tiny<script>alert(1)<!--"
    model = tmp_path / evil
    shutil.copytree(tiny_llama_dir, model)
    data = tmp_path / "notes<img src=x>.txt"
    data.write_text(" ".join(f"The number {i} follows {i - 1} and precedes {i + 1}." for i in range(600)))
    out = tmp_path / "out"
    code, _, stderr = cli("analyze", model, "--data", data, "--out", out, *FAST, "--no-probes")
    assert code == 0, stderr
    page = (out / "report.html").read_text()
    assert "<script>alert" not in page and "<img src=x>" not in page
    assert "&lt;script&gt;alert(1)" in page  # shown as text (title, heading, provenance)
    assert "notes&lt;img src=x&gt;.txt" in page
    assert page.count("<script") == 1  # only the JSON data block
    start = page.index('id="analysis-data">') + len('id="analysis-data">')
    embedded = json.loads(page[start:page.index("</script>", start)])
    assert embedded["model"]["name"] == evil
    written = read_analysis(out)
    assert "hsic_batches" in written["measurements"] and "hsic_batches" not in embedded["measurements"]
    written["measurements"] = {k: v for k, v in written["measurements"].items() if not k.endswith("_batches")}
    assert embedded == written | {"provenance": embedded["provenance"]}

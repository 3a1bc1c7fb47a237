"""`loopus convert` and `loopus generate` from the command line: results, and one test per bad input."""

from __future__ import annotations

import json

import pytest

from tests.convert.conftest import CONFORMANCE


def _one_line_error(code: int, stdout: str, stderr: str, *words: str) -> None:
    assert code == 2
    assert "Traceback" not in stdout + stderr
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    for word in words:
        assert word in lines[0], lines[0]


def _nothing_written(out) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_convert_then_generate(cli, tiny_llama_dir, tmp_path):
    out = tmp_path / "looped"
    code, stdout, stderr = cli("convert", tiny_llama_dir, "--split", "2:6", "--out", out, "--loops", "3")
    assert code == 0, stderr
    assert str(out) in stdout and "2:6" in stdout
    assert json.loads((out / "config.json").read_text())["num_loops"] == 3
    code, stdout, stderr = cli("generate", out, "--prompt", "The quick brown", "--max-new-tokens", "5")
    assert code == 0, stderr
    assert stdout.startswith("The quick brown")
    assert "loops per token: 3 3 3 3 3 (mean 3.00)" in stdout
    code, stdout, _ = cli(
        "generate",
        out,
        "--prompt",
        "The quick",
        "--max-new-tokens",
        "4",
        "--exit-threshold",
        "0.4",
        "--max-loops",
        "5",
    )
    assert code == 0 and "loops per token: 1 1 1 1" in stdout  # sigmoid(0) = 0.5 > 0.4: exits at once


def test_convert_split_auto_reads_the_analysis(cli, tiny_llama_dir, tmp_path):
    report = tmp_path / "report"
    report.mkdir()
    (report / "analysis.json").write_text(json.dumps({"schema_version": 1, "split": "3:7"}))
    out = tmp_path / "auto"
    code, _, stderr = cli("convert", tiny_llama_dir, "--split", "auto", "--from", report, "--out", out)
    assert code == 0, stderr
    config = json.loads((out / "config.json").read_text())
    assert (config["split_start"], config["split_end"]) == (3, 7)


def test_generate_stops_at_the_context_limit(cli, looped_llama_dir, tmp_path):
    import shutil

    small = tmp_path / "short-context"
    shutil.copytree(looped_llama_dir, small)
    config = json.loads((small / "config.json").read_text())
    config["base_config"]["max_position_embeddings"] = 24
    (small / "config.json").write_text(json.dumps(config))
    code, stdout, stderr = cli("generate", small, "--prompt", "The quick brown fox", "--max-new-tokens", "50")
    assert code == 0, stderr
    assert "stopped at the model's context limit (24 tokens)" in stdout


@pytest.mark.parametrize(
    "split, words",
    [
        ("4-6", ("malformed", "A:B")),
        ("2:99", ("out of range", "8 layers")),
        ("6:2", ("A must be smaller than B",)),
    ],
)
def test_bad_split(cli, tiny_llama_dir, tmp_path, split, words):
    out = tmp_path / "out"
    _one_line_error(*cli("convert", tiny_llama_dir, "--split", split, "--out", out), *words)
    _nothing_written(out)


def test_split_auto_without_an_analysis(cli, tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    _one_line_error(*cli("convert", tiny_llama_dir, "--split", "auto", "--out", out), "--from")
    _nothing_written(out)


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ({"model_type": "bert", "num_hidden_layers": 4}, "it is a bidirectional encoder"),
        ({"model_type": "t5", "num_layers": 4}, "it is an encoder-decoder"),
        ({"model_type": "jamba", "num_hidden_layers": 4}, "carry a recurrent state"),
    ],
)
def test_refused_types(cli, tmp_path, config, reason):
    """An encoder, an encoder-decoder and a hybrid with recurrent-state layers: one line naming the model
    type and the reason, exit 2, nothing written."""
    model = tmp_path / config["model_type"]
    model.mkdir()
    (model / "config.json").write_text(json.dumps(config))
    (model / "model.safetensors").write_bytes(b"")
    out = tmp_path / "out"
    code_out_err = cli("convert", model, "--split", "1:3", "--out", out)
    _one_line_error(*code_out_err, f"'{config['model_type']}'", reason)
    _nothing_written(out)


def test_existing_output_directory(cli, tiny_llama_dir, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _one_line_error(
        *cli("convert", tiny_llama_dir, "--split", "2:6", "--out", out), "already exists", "--force"
    )
    assert (out / "keep.txt").read_text() == "mine"
    _one_line_error(  # --force replaces only a previous looped checkpoint or an empty directory
        *cli("convert", tiny_llama_dir, "--split", "2:6", "--out", out, "--force"), "not a looped checkpoint"
    )
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    code, _, stderr = cli("convert", tiny_llama_dir, "--split", "2:6", "--out", out, "--force")
    assert code == 0, stderr
    assert (out / "model.safetensors").is_file()


def test_loop_count_below_one(cli, tiny_llama_dir, looped_llama_dir, tmp_path):
    out = tmp_path / "out"
    _one_line_error(
        *cli("convert", tiny_llama_dir, "--split", "2:6", "--out", out, "--loops", "0"), "--loops 0"
    )
    _nothing_written(out)
    code, stdout, stderr = cli("generate", looped_llama_dir, "--prompt", "Hi", "--loops", "0")
    _one_line_error(code, stdout, stderr, "--loops 0")
    assert stdout == ""


def test_checkpoint_with_a_missing_weights_file(cli, looped_llama_dir, tmp_path):
    import shutil

    broken = tmp_path / "no-weights"
    shutil.copytree(looped_llama_dir, broken)
    (broken / "model.safetensors").unlink()
    _one_line_error(*cli("generate", broken, "--prompt", "Hi"), "no weights file")


def test_checkpoint_with_a_corrupted_weights_file(cli, looped_llama_dir, tmp_path):
    import shutil

    broken = tmp_path / "truncated"
    shutil.copytree(looped_llama_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _one_line_error(*cli("generate", broken, "--prompt", "Hi"), "truncated")
    garbage = tmp_path / "garbage"
    shutil.copytree(looped_llama_dir, garbage)
    (garbage / "model.safetensors").write_bytes(b"\xff" * 64)
    _one_line_error(*cli("generate", garbage, "--prompt", "Hi"), "corrupted")


def test_not_a_looped_checkpoint(cli, tiny_llama_dir):
    _one_line_error(*cli("generate", tiny_llama_dir, "--prompt", "Hi"), "not a looped checkpoint")
    _one_line_error(*cli("generate", CONFORMANCE / "llama" / "official", "--prompt", "Hi"), "loopus convert")


def test_interrupted_convert_leaves_nothing(cli, tiny_llama_dir, tmp_path, monkeypatch):
    import loopus_convert.convert as convert

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert, "_stream_weights", interrupted)
    out = tmp_path / "out"
    code, _, stderr = cli("convert", tiny_llama_dir, "--split", "2:6", "--out", out)
    assert code == 130 and "nothing half-written" in stderr
    _nothing_written(out)

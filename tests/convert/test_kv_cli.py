"""`loopus generate` and `loopus eval` with KV strategies and the zero-shot exits; one test per bad input."""

from __future__ import annotations

import json

import pytest

from tests.convert.test_cli import _one_line_error


def test_generate_with_a_kv_strategy_and_a_zero_shot_exit(cli, looped_llama_dir):
    code, stdout, stderr = cli(
        "generate",
        looped_llama_dir,
        "--prompt",
        "The quick brown",
        "--max-new-tokens",
        "4",
        "--kv-strategy",
        "last",
        "--exit-strategy",
        "argmax",
        "--argmax-patience",
        "2",
        "--max-loops",
        "5",
    )
    assert code == 0, stderr
    assert stdout.startswith("The quick brown")
    loops = stdout.split("loops per token: ")[1].split(" (mean")[0].split()
    assert len(loops) == 4 and all(3 <= int(k) <= 5 for k in loops)  # patience 2: pass 3 at the earliest


@pytest.mark.parametrize(
    "args, words",
    [
        (("--kv-strategy", "middle"), ("kv_strategy 'middle'", "full, last, first")),
        (("--exit-strategy", "kl", "--kl-threshold", "-1"), ("kl_threshold must be > 0", "-1.0")),
        (("--exit-strategy", "argmax", "--argmax-patience", "0"), ("argmax_patience", ">= 1", "0")),
        (("--exit-strategy", "entropy"), ("--exit-strategy 'entropy'", "kl, argmax")),
    ],
)
def test_generate_bad_kv_and_exit_settings(cli, looped_llama_dir, args, words):
    code, stdout, stderr = cli("generate", looped_llama_dir, "--prompt", "Hi", "--max-new-tokens", "2", *args)
    _one_line_error(code, stdout, stderr, *words)
    assert stdout == ""


def test_eval_reports_each_kv_strategy_against_full(cli, looped_llama_dir, tmp_path):
    out = tmp_path / "eval.json"
    args = [
        "--loops",
        "1,2",
        "--exit-threshold",
        "",
        "--block-size",
        "12",
        "--max-blocks",
        "2",
        "--json",
        out,
    ]
    code, stdout, stderr = cli(
        "eval", looped_llama_dir, "--device", "cpu", "--kv-strategy", "last,first", *args
    )
    assert code == 0, stderr
    assert "top-1 = full" in stdout and "vs base" in stdout and "1.50x" in stdout
    kv = json.loads(out.read_text())["kv_strategies"]["strategies"]
    assert list(kv) == ["full", "last", "first"] and list(kv["last"]) == ["1", "2"]
    assert kv["last"]["2"]["vs_base"] == 1.0 and kv["full"]["2"]["vs_base"] == 1.5  # (8 + 4) / 8 slots


def test_eval_with_an_unknown_kv_strategy(cli, looped_llama_dir):
    args = [
        "--loops",
        "1",
        "--exit-threshold",
        "",
        "--block-size",
        "12",
        "--max-blocks",
        "1",
        "--device",
        "cpu",
    ]
    code, stdout, stderr = cli("eval", looped_llama_dir, "--kv-strategy", "last,cycle:2", *args)
    _one_line_error(code, stdout, stderr, "--kv-strategy", "kv_strategy 'cycle:2'", "full, last, first")

"""One test per defect of issue 13 outside the trainer (the probe log: shared/reading/qa-probes.md).

Each test reproduces the probe's scenario on the tiny models and checks the promise it broke: a one-line
``error:`` with exit code 2 and nothing half-written, nothing lost, nothing silently wrong. Items 1, 5 and 10
under real signals are in ``test_signals.py``; the output helper itself in ``tests/core/test_outputs.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.convert.conftest import CONFORMANCE

FAST = ("--tokens", "512", "--seq-len", "32", "--device", "cpu", "--no-probes")
EVAL = ("--loops", "1", "--exit-threshold", "", "--block-size", "16", "--max-blocks", "2", "--device", "cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def one_line_error(result, *words: str) -> str:
    code, stdout, stderr = result
    assert code == 2, (code, stdout, stderr)
    assert "Traceback" not in stdout + stderr
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]  # after any INFO lines of the work done
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def snapshot(root: Path) -> dict[str, str]:
    """Every file below ``root`` (relative path -> sha256) and every directory."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


def variant(base: Path, path: Path, config: dict | None = None, drop: tuple[str, ...] = ()) -> Path:
    """A copy of a model directory with config.json entries changed and tensors removed from its weights."""
    shutil.copytree(base, path)
    if config:
        data = json.loads((path / "config.json").read_text())
        data.update(config)
        (path / "config.json").write_text(json.dumps(data))
    if drop:
        weights = load_file(path / "model.safetensors")
        save_file({k: v for k, v in weights.items() if k not in drop}, path / "model.safetensors",
                  metadata={"format": "pt"})
    return path


def write_header(file: Path, header, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.fixture(scope="module")
def looped_gpt2_dir(tiny_model_dirs, tmp_path_factory) -> Path:
    from loopus_convert import convert_model

    out = tmp_path_factory.mktemp("gpt2") / "ck"
    return convert_model(str(tiny_model_dirs["gpt2"]), out, split="1:7").out


# ------------------------------------------------------------------------------------- 1: --force


def test_item01_force_over_a_directory_holding_the_source_and_other_files_keeps_every_file(
    cli, tiny_llama_dir, looped_llama_dir, tmp_path, monkeypatch
):
    sb = tmp_path / "sb"
    shutil.copytree(tiny_llama_dir, sb / "models" / "llama")
    (sb / "notes").mkdir()
    (sb / "notes" / "precious.txt").write_text("important")
    before = snapshot(sb)
    one_line_error(cli("convert", sb / "models" / "llama", "--split", "2:6", "--out", sb, "--force"),
                   "holds the input", "--force would delete it")
    assert snapshot(sb) == before
    # `--out . --force` in a working directory holding anything else
    monkeypatch.chdir(sb / "notes")
    one_line_error(cli("convert", tiny_llama_dir, "--split", "2:6", "--out", ".", "--force"),
                   "not a looped checkpoint", "precious.txt",
                   "--force replaces only a previous looped checkpoint")
    assert snapshot(sb) == before
    # the source itself
    one_line_error(cli("convert", sb / "models" / "llama", "--split", "2:6", "--out", sb / "models" / "llama",
                       "--force"), "holds the input")
    assert snapshot(sb) == before and list(tmp_path.iterdir()) == [sb]
    # a previous looped checkpoint with something else in it
    extra = shutil.copytree(looped_llama_dir, tmp_path / "ck-notes")
    (extra / "my-notes.txt").write_text("mine")
    one_line_error(cli("convert", tiny_llama_dir, "--split", "3:7", "--out", extra, "--force"),
                   "holds files a looped checkpoint does not (my-notes.txt)")
    assert (extra / "my-notes.txt").read_text() == "mine"
    # what --force is for: a previous looped checkpoint is replaced
    previous = shutil.copytree(looped_llama_dir, tmp_path / "ck")
    code, _, stderr = cli("convert", tiny_llama_dir, "--split", "3:7", "--out", previous, "--force")
    assert code == 0, stderr
    assert json.loads((previous / "config.json").read_text())["split_start"] == 3


# ------------------------------------------------------------------------ 2: config/weights mismatch


@pytest.mark.parametrize(
    "name, change, words",
    [
        ("more-layers", dict(config={"num_hidden_layers": 12}), ("lack 36 tensors", "model.layers.10.")),
        ("fewer-layers", dict(config={"num_hidden_layers": 4}), ("hold 36 tensors", "no place", "layers.4.")),
        ("no-lm-head", dict(drop=("lm_head.weight",)), ("lack 1 tensors", "lm_head.weight")),
        ("wider-mlp", dict(config={"intermediate_size": 256}),
         ("shape [64, 128] in the weights", "[64, 256]")),
    ],
)
def test_item02_weights_that_do_not_match_the_config_are_refused(cli, tiny_llama_dir, tmp_path, name, change,
                                                                 words):
    model = variant(tiny_llama_dir, tmp_path / name, **change)
    for command in (("analyze", model, "--out", tmp_path / "rep", *FAST),
                    ("convert", model, "--split", "1:3", "--out", tmp_path / "ck")):
        line = one_line_error(cli(*command), *words, "config.json does not match the weights")
        assert "above report" not in line  # item 21: transformers' pointer to a report nobody sees
    assert not (tmp_path / "rep").exists() and not (tmp_path / "ck").exists()


@pytest.mark.parametrize("family", ["gpt2", "gemma3_text"])
def test_item02_tied_weights_stay_fine(tiny_model_dirs, family):
    from loopus_core.models import open_model

    model = open_model(str(tiny_model_dirs[family])).model  # the lm_head is stored once, as the embedding
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


# --------------------------------------------------------------------------------- 4: error printer


def test_item04_user_text_is_printed_as_text_without_control_characters(cli, tiny_llama_dir, tmp_path):
    one_line_error(cli("analyze", tmp_path / "x[/bold]", *FAST), "x[/bold] does not exist")
    one_line_error(cli("analyze", tmp_path / "models" / "run[v2]", *FAST), "run[v2] does not exist")
    one_line_error(cli("convert", tiny_llama_dir, "--split", "2:[/]", "--out", tmp_path / "o"), "'2:[/]'",
                   "malformed")
    evil = variant(tiny_llama_dir, tmp_path / "evil",
                   config={"model_type": "\x1b[2J\x1b[31m[link=https://evil.example]spoof[/link]\x07"})
    line = one_line_error(cli("analyze", evil, "--out", tmp_path / "r", *FAST), "[link=https://evil.example]spoof")
    assert not any(ord(c) < 32 or 0x7F <= ord(c) <= 0x9F for c in line)
    out = tmp_path / "ck[/b]"  # success messages too
    code, stdout, stderr = cli("convert", tiny_llama_dir, "--split", "2:6", "--out", out)
    assert code == 0, stderr
    assert f"written to {out}" in stdout


def test_item04_printable_replaces_control_characters():
    from loopus.app import printable

    assert printable("a\x1b[2Jb\rc\nd\u202ee\x9bf") == "a [2Jb c d e f"


# ------------------------------------------------------------------------------- 5: stale partials


@pytest.mark.parametrize("command", ["convert", "analyze"])
def test_item05_partials_a_killed_run_left_are_removed_by_the_next_run(
    cli, tiny_llama_dir, tmp_path, command, figures_not_drawn
):
    out = tmp_path / "out"
    stale = [".tmp-out-0123456789ab", ".old-out-0123456789ab", ".out.partial-7g5u09ko", ".out.tmp-v5fmbsdr"]
    for name in stale:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"\0" * 4096)
    (tmp_path / "out").mkdir()  # what was there before (a finished earlier run)
    args = (("convert", tiny_llama_dir, "--split", "2:6", "--out", out, "--force") if command == "convert"
            else ("analyze", tiny_llama_dir, "--out", out, *FAST))
    code, _, stderr = cli(*args)
    assert code == 0, stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---------------------------------------------------------------------------- 6: unwritable outputs


@pytest.mark.parametrize("where", ["/proc/loopus-ck", "/sys/loopus-ck", "/proc/no/such/ck"])
def test_item06_convert_into_a_special_file_system_is_a_one_line_error(cli, tiny_llama_dir, where):
    if not os.path.ismount("/" + where.split("/")[1]):
        pytest.skip("no such file system here")
    one_line_error(cli("convert", tiny_llama_dir, "--split", "2:6", "--out", where), "cannot be written")


def test_item06_eval_json_path_is_checked_before_the_evaluation(cli, looped_llama_dir, tmp_path, monkeypatch):
    import loopus_train.evaluate

    def must_not_run(*args, **kwargs):
        raise AssertionError("the evaluation ran before the --json path was checked")

    monkeypatch.setattr(loopus_train.evaluate, "evaluate_checkpoint", must_not_run)
    one_line_error(cli("eval", looped_llama_dir, *EVAL, "--json", tmp_path), "is a directory")
    if os.path.ismount("/proc"):
        one_line_error(cli("eval", looped_llama_dir, *EVAL, "--json", "/proc/loopus/e.json"),
                       "cannot be written")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    one_line_error(cli("eval", looped_llama_dir, *EVAL, "--json", blocker / "e.json"), "is a file")


def test_item06_an_unwritable_model_cache_fails_before_the_gguf_work(cli, tmp_path, monkeypatch):
    if not os.path.ismount("/sys"):
        pytest.skip("no /sys here")
    import loopus_core.models as models

    def must_not_run(gguf):
        raise AssertionError("the GGUF was dequantised although the cache cannot be written")

    monkeypatch.setattr(models, "_dequantised_default", must_not_run)
    monkeypatch.setenv("LOOPUS_CACHE", "/sys/loopus-cache")
    one_line_error(cli("analyze", "--out", tmp_path / "rep", *FAST), "the model cache", "cannot be written")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------ 7: a checkpoint's own code


def test_item07_analyze_refuses_a_looped_checkpoint_without_offering_its_code(
    cli, looped_llama_dir, tmp_path, monkeypatch
):
    import transformers.dynamic_module_utils as dynamic

    evil = shutil.copytree(looped_llama_dir, tmp_path / "ck_evil")
    marker = tmp_path / "PWNED"
    for name in ("configuration_loopus.py", "modeling_loopus.py"):
        (evil / name).write_text(f"open({str(marker)!r}, 'w').write('ran')\n")

    def never(*args, **kwargs):
        raise AssertionError("transformers was asked whether to run the checkpoint's code")

    monkeypatch.setattr(dynamic, "resolve_trust_remote_code", never)
    one_line_error(cli("analyze", evil, "--out", tmp_path / "rep", *FAST), "is a looped checkpoint already",
                   "analyze and convert take the base model")
    one_line_error(cli("convert", evil, "--split", "2:6", "--out", tmp_path / "ck"), "is a looped checkpoint")
    assert not marker.exists()


# ---------------------------------------------------------------------------------- 8: pickles


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_item08_pickle_weights_are_refused_with_how_to_convert(cli, tiny_llama_dir, tmp_path):
    model = tmp_path / "m_bin"
    shutil.copytree(tiny_llama_dir, model)
    torch.save(load_file(model / "model.safetensors"), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    for command in (("analyze", model, "--out", tmp_path / "rep", *FAST),
                    ("convert", model, "--split", "2:6", "--out", tmp_path / "ck")):
        line = one_line_error(cli(*command), "pickle weights (pytorch_model.bin)", "safetensors",
                              "save_pretrained")
        assert "weights_only" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m_bin"]


def test_item08_a_pickle_next_to_safetensors_is_never_opened(cli, tiny_llama_dir, tmp_path,
                                                             figures_not_drawn):
    model = shutil.copytree(tiny_llama_dir, tmp_path / "both")
    marker = tmp_path / "PWNED"
    torch.save({"x": _Evil(str(marker))}, model / "pytorch_model.bin")
    code, _, stderr = cli("analyze", model, "--out", tmp_path / "rep", *FAST)
    assert code == 0, stderr
    code, _, stderr = cli("convert", model, "--split", "2:6", "--out", tmp_path / "ck")
    assert code == 0, stderr
    assert not marker.exists()


def test_item08_fingerprints_are_of_the_weights_files(tiny_model_dirs, tmp_path):
    from loopus_core.models import source_fingerprint

    llama = source_fingerprint(str(tiny_model_dirs["llama"]))
    assert llama.startswith("sha256-head-tail:") and llama != "sha256-head-tail:e3b0c44298fc1c14"
    assert llama != source_fingerprint(str(tiny_model_dirs["gpt2"]))
    other = variant(tiny_model_dirs["llama"], tmp_path / "other", drop=("lm_head.weight",))
    assert source_fingerprint(str(other)) != llama


# -------------------------------------------------------------------------------- 9, 16: numbers


def test_item09_out_of_range_numbers_are_one_line_errors_with_the_range(
    cli, tiny_llama_dir, looped_llama_dir, looped_gpt2_dir, tiny_model_dirs, tmp_path
):
    generate = ("generate", looped_llama_dir, "--prompt", "hi", "--max-new-tokens", "1")
    one_line_error(cli(*generate, "--loops", "1000000000000"), "--loops 1000000000000", "[1, 1024]")
    one_line_error(cli(*generate, "--loops", "99999999999999999999999"), "[1, 1024]")
    one_line_error(cli(*generate, "--exit-threshold", "0.5", "--max-loops", "1000000000000"), "--max-loops",
                   "[1, 1024]")
    for seed in ("-1", str(2**64)):
        one_line_error(cli(*generate, "--seed", seed), f"--seed {seed}", "[0, 4294967295]")
    evaluate = ("eval", looped_llama_dir, "--block-size", "16", "--max-blocks", "2", "--device", "cpu")
    one_line_error(cli(*evaluate, "--loops", "1", "--exit-threshold", "0.5", "--max-loops", "1000000000000"),
                   "--max-loops", "[1, 1024]")
    one_line_error(cli(*evaluate, "--loops", "1000000000000"), "--loops", "[1, 1024]")
    one_line_error(cli("eval", looped_gpt2_dir, *EVAL[:4], "--block-size", "600", "--device", "cpu"),
                   "--block-size 600", "[2, 512]")  # GPT-2's context: 512 positions
    for family in ("gpt2", "llama"):  # learned positions (an IndexError) and RoPE (silently past the context)
        one_line_error(cli("analyze", tiny_model_dirs[family], "--out", tmp_path / "rep", "--tokens", "8000",
                           "--seq-len", "600", "--device", "cpu", "--no-probes"), "--seq-len 600", "[3, 512]")
    one_line_error(cli("analyze", tiny_llama_dir, "--out", tmp_path / "rep", *FAST, "--seed", str(2**64)),
                   "[0, 4294967295]")
    one_line_error(cli("convert", tiny_llama_dir, "--split", "2:6", "--out", tmp_path / "ck", "--loops",
                       "1000000000000"), "[1, 1024]")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_item16_nan_temperature_and_zero_max_loops_are_refused(cli, looped_llama_dir):
    one_line_error(cli("generate", looped_llama_dir, "--prompt", "hi", "--temperature", "nan"),
                   "--temperature nan", "a finite number >= 0")
    one_line_error(cli("eval", looped_llama_dir, "--loops", "1,2", "--max-loops", "0", "--exit-threshold",
                       "0.5", "--block-size", "16", "--max-blocks", "2", "--device", "cpu"),
                   "--max-loops 0", "[1, 1024]")


# ---------------------------------------------------------------------- 11: malformed safetensors


@pytest.mark.parametrize(
    "name, header, words",
    [
        ("k_list", [1, 2, 3], ("corrupted", "a JSON list")),
        ("k_str", "hello", ("corrupted", "a JSON str")),
        ("k_nooff", {"lm_head.weight": {"dtype": "F32", "shape": [2]}}, ("corrupted", "no data_offsets")),
        ("k_badoff", {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, ("for 16 bytes",)),
        ("k_meta", {"__metadata__": [1]}, ("__metadata__",)),
    ],
)
def test_item11_malformed_headers_are_one_line_errors(cli, looped_llama_dir, tiny_llama_dir, tmp_path, name,
                                                      header, words):
    ck = shutil.copytree(looped_llama_dir, tmp_path / name)
    write_header(ck / "model.safetensors", header, b"\0" * 64)
    one_line_error(cli("generate", ck, "--prompt", "hi", "--max-new-tokens", "2"), *words)
    base = shutil.copytree(tiny_llama_dir, tmp_path / f"base-{name}")
    write_header(base / "model.safetensors", header, b"\0" * 64)
    one_line_error(cli("convert", base, "--split", "2:6", "--out", tmp_path / "ck"), *words)


@pytest.mark.parametrize(
    "index",
    ["{not json", '{"weight_map": [1]}', '{"weight_map": {"a": "../../x"}}', '{"weight_map": {"a": 5}}',
     "[" * 100000],
    ids=["not-json", "list", "outside", "not-a-name", "deep"],
)
def test_item11_a_malformed_index_is_a_one_line_error(cli, looped_llama_dir, tiny_llama_dir, tmp_path, index):
    ck = shutil.copytree(looped_llama_dir, tmp_path / "k_index")
    (ck / "model.safetensors.index.json").write_text(index)
    one_line_error(cli("generate", ck, "--prompt", "hi", "--max-new-tokens", "2"), "is damaged")
    base = shutil.copytree(tiny_llama_dir, tmp_path / "base")
    (base / "model.safetensors.index.json").write_text(index)
    one_line_error(cli("convert", base, "--split", "2:6", "--out", tmp_path / "ck"), "is damaged")


# ----------------------------------------------------------------- 12: text the tokenizer rejects


def test_item12_text_the_tokenizer_rejects_is_a_one_line_error(
    cli, tiny_llama_dir, looped_llama_dir, tmp_path
):
    surrogate = tmp_path / "s.jsonl"
    surrogate.write_text(json.dumps({"text": "a \ud800 b " * 300}) + "\n")  # valid JSON, not valid Unicode
    one_line_error(cli("analyze", tiny_llama_dir, "--data", surrogate, "--out", tmp_path / "r", *FAST),
                   "line 1 holds a lone surrogate", "U+D800")
    one_line_error(cli("eval", looped_llama_dir, "--data", surrogate, *EVAL), "lone surrogate")
    # invalid UTF-8 in an argument: Python decodes byte 0xff to the surrogate U+DCFF
    one_line_error(cli("generate", looped_llama_dir, "--prompt", "hello \udcff world"), "--prompt",
                   "byte 0xff, not UTF-8")
    deep = tmp_path / "deep.jsonl"
    deep.write_text("[" * 100000 + "]" * 100000 + "\n")
    one_line_error(cli("analyze", tiny_llama_dir, "--data", deep, "--out", tmp_path / "r", *FAST),
                   "line 1 nests JSON too deeply")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep.jsonl", "s.jsonl"]


# -------------------------------------------------------------------- 15: official-format configs


@pytest.mark.parametrize(
    "change, words",
    [
        ({"N": "abc"}, ("N 'abc' is not an integer", "[1, 1024]")),
        ({"q_threshold": None}, ("q_threshold None is not a number",)),
        ({"encoder_layer_indices": 5}, ("encoder_layer_indices 5 is not a list of layer indices",)),
        ({"base_config_dict": {"model_type": "nonexistent_family"}}, ("'nonexistent_family'",)),
        ({"convergence_epsilon": "x"}, ("convergence_epsilon",)),
    ],
)
def test_item15_malformed_official_configs_are_one_line_errors(cli, tmp_path, change, words):
    official = shutil.copytree(CONFORMANCE / "llama" / "official", tmp_path / "lds")
    config = json.loads((official / "config.json").read_text())
    config.update(change)
    (official / "config.json").write_text(json.dumps(config))
    line = one_line_error(cli("convert", official, "--out", tmp_path / "ck"), *words)
    assert len(line) < 400  # not transformers' 10 kB list of model types
    assert not (tmp_path / "ck").exists()


# ------------------------------------------------------------------------ 18: --from another model


def test_item18_split_auto_from_the_analysis_of_another_model_is_refused(cli, tiny_model_dirs, tmp_path):
    from loopus_core.models import source_fingerprint

    llama, gpt2 = tiny_model_dirs["llama"], tiny_model_dirs["gpt2"]
    report = tmp_path / "rep_llama"
    report.mkdir()
    model = {"source": str(llama), "fingerprint": source_fingerprint(str(llama))}
    (report / "analysis.json").write_text(json.dumps({"schema_version": 1, "split": "2:6", "model": model}))
    one_line_error(cli("convert", gpt2, "--split", "auto", "--from", report, "--out", tmp_path / "c_wrong"),
                   "is the analysis of another model", str(llama))
    assert not (tmp_path / "c_wrong").exists()
    code, _, stderr = cli("convert", llama, "--split", "auto", "--from", report,
                          "--out", tmp_path / "c_right")
    assert code == 0, stderr


# --------------------------------------------------------------------------- 19: strict eval JSON


def test_item19_eval_json_is_strict_json(cli, looped_llama_dir, tmp_path):
    hot = shutil.copytree(looped_llama_dir, tmp_path / "ck_hot")
    weights = load_file(hot / "model.safetensors")
    weights["lm_head.weight"] = weights["lm_head.weight"] * 1e5  # losses far above 700: perplexity inf
    save_file(weights, hot / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "hot.json"
    code, _, stderr = cli("eval", hot, "--loops", "1", "--exit-threshold", "0.5", "--block-size", "16",
                          "--max-blocks", "2", "--device", "cpu", "--json", out)
    assert code == 0, stderr

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    result = json.loads(out.read_text(), parse_constant=refuse)
    assert result["loops"]["1"]["ppl"] is None and result["loops"]["1"]["loss"] > 700


# ------------------------------------------------------------------------------ 20: FIFO as --data


def test_item20_data_naming_a_fifo_is_refused_at_once(cli, tiny_llama_dir, tmp_path):
    fifo = tmp_path / "fifo.txt"
    os.mkfifo(fifo)
    done = threading.Event()

    def unblock() -> None:  # should the reader block: a writer and an end, so the test fails, not hangs
        while not done.wait(5):
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass

    thread = threading.Thread(target=unblock, daemon=True)
    thread.start()
    started = time.monotonic()
    try:
        one_line_error(cli("analyze", tiny_llama_dir, "--data", fifo, "--out", tmp_path / "r", *FAST),
                       "is not a regular file")
    finally:
        done.set()
    assert time.monotonic() - started < 300


# ------------------------------------------------------------------------- 21: misleading messages


def test_item21_messages_say_what_happened(cli, tiny_llama_dir, looped_llama_dir, tmp_path):
    line = one_line_error(cli("convert", looped_llama_dir, "--split", "2:6", "--out", tmp_path / "again"),
                          "looped checkpoint already")
    assert "not a decoder-only" not in line
    code, stdout, stderr = cli("convert", tiny_llama_dir, "--split", "0:8", "--out", tmp_path / "c08")
    assert code == 0, stderr
    assert "encoder: embeddings only" in stdout and "decoder: final norm and lm_head only" in stdout
    assert "0..-1" not in stdout
    short = tmp_path / "short.txt"
    short.write_text("a few words only")
    line = one_line_error(cli("analyze", tiny_llama_dir, "--data", short, "--out", tmp_path / "r", *FAST),
                          "--seq-len")
    assert "--batch-size" not in line  # analyze has no such flag
    remote = shutil.copytree(looped_llama_dir, tmp_path / "remote-tokenizer")
    (remote / "tokenizer.json").unlink()
    config = json.loads((remote / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="EvilTokenizer",
                  auto_map={"AutoTokenizer": ["evil_tok.EvilTokenizer", None]})
    (remote / "tokenizer_config.json").write_text(json.dumps(config))
    # the reason (it needs the checkpoint's own code), not a bare "has no tokenizer"
    one_line_error(cli("generate", remote, "--prompt", "hi"), "has no tokenizer loopus can load",
                   "custom code")

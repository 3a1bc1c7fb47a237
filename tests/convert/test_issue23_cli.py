"""Issue 23, the command-line, checkpoint and harness items: user text printed as text (item 6), task files
that do not parse or name an unknown metric (14), a checkpoint's loop counts capped like --loops (15),
lm-eval's run-time errors as one line (16), flags that would be silently ignored refused by one rule (17),
an adapter-only checkpoint named as such (19), NaN / infinite weights refused at load (22), third-party
noise kept out of the terminal (23)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from loopus_convert.harness import LOCAL_TASKS, RunOptions, evaluate_tasks
from tests.convert.test_cli import _one_line_error

OPTIONS = RunOptions(limit=2, batch_size=4, device="cpu")
TASK = ("--tasks", "loopus_mc", "--limit", "2", "--loops", "1")  # a short harness run


def _copy(src, dst, **config_changes):
    """A copy of a checkpoint directory with config.json entries changed (``base_config`` merged)."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["base_config"].update(config_changes.pop("base_config", {}))
    config.update(config_changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


# ------------------------------------------------------------------- 6: user text is never markup


def test_item06_progress_descriptions_are_text_not_markup(monkeypatch, capsys):
    """A progress line naming a file such as ``x[/].txt`` (old: rich's MarkupError, the run died)."""
    from loopus.app import RichProgress

    monkeypatch.setenv("LOOPUS_PROGRESS", "1")
    with RichProgress() as progress, progress.task("tokenising data/x[/].txt", 2) as advance:
        advance(2)
    assert "x[/].txt" in capsys.readouterr().err


def test_item06_plain_console_prints_markup_like_text(capsys):
    """Every status line through the shared consoles: ``[bold]`` and ``[/]`` in a path stay as they are."""
    from loopus.app import console

    console.print("saved runs/x[/]/[bold]y")
    assert "saved runs/x[/]/[bold]y" in capsys.readouterr().out


def test_item06_convert_and_generate_with_markup_in_the_path(cli, tiny_llama_dir, tmp_path):
    out = tmp_path / "x[/]" / "[bold]looped"
    code, stdout, stderr = cli("convert", tiny_llama_dir, "--split", "2:6", "--out", out)
    assert code == 0, stderr
    assert "x[/]/[bold]looped" in stdout
    code, stdout, stderr = cli("generate", out, "--prompt", "a [red]b[/]", "--max-new-tokens", "2")
    assert code == 0, stderr
    assert stdout.startswith("a [red]b[/]")


# ------------------------------------------------------------------- 14: task files


def _task_dir(tmp_path, name: str, **changes) -> tuple:
    """A folder with a copy of the shipped multiple-choice task (its loader and data beside it), renamed
    ``name``, its text lines replaced by ``changes`` (``{"doc_to_target: answer": "..."}``)."""
    folder = tmp_path / f"tasks-{name}"
    folder.mkdir()
    shutil.copy(LOCAL_TASKS / "loader.py", folder)
    (folder / "data").symlink_to(LOCAL_TASKS / "data")
    text = (LOCAL_TASKS / "loopus_mc.yaml").read_text().replace("task: loopus_mc", f"task: {name}")
    for old, new in changes.get("lines", {}).items():
        assert old in text
        text = text.replace(old, new)
    (folder / f"{name}.yaml").write_text(text)
    return folder, folder / f"{name}.yaml"


@pytest.mark.parametrize("as_folder", [False, True], ids=["file", "folder"])
def test_item14_unknown_metric_is_named(cli, looped_llama_dir, tmp_path, as_folder):
    """Old: the metric was dropped without a word (or the task failed with a hint about hub datasets)."""
    folder, file = _task_dir(tmp_path, "my_mc", lines={"metric: acc\n": "metric: acuracy\n"})
    target = folder if as_folder else file
    code, stdout, stderr = cli("eval", looped_llama_dir, "--tasks", target, "--device", "cpu", "--loops", "1")
    _one_line_error(code, stdout, stderr, "my_mc.yaml", "'acuracy'", "not one of lm-eval's metrics",
                    "did you mean acc")  # fmt: skip


def test_item14_a_folder_whose_task_file_does_not_parse(cli, looped_llama_dir, tmp_path):
    """Old: "the folder holds no task YAML files"."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "broken.yaml").write_text("task: broken\ndoc_to_text: [unclosed\n")
    code, stdout, stderr = cli("eval", looped_llama_dir, "--tasks", folder, "--device", "cpu")
    _one_line_error(code, stdout, stderr, "broken.yaml", "does not parse")


def test_item14_a_local_task_that_does_not_build_gets_no_hub_advice(cli, looped_llama_dir, tmp_path):
    """Old: "hub tasks need their dataset cached" for a template that names a field the data lacks."""
    _, file = _task_dir(tmp_path, "my_mc", lines={"doc_to_target: answer": 'doc_to_target: "{{nope}}"'})
    code, stdout, stderr = cli("eval", looped_llama_dir, "--tasks", file, "--device", "cpu")
    _one_line_error(code, stdout, stderr, "my_mc.yaml", "'nope' is undefined", "templates")
    assert "hub" not in stderr


# ------------------------------------------------------------------- 15: loop counts of a checkpoint


@pytest.mark.parametrize(
    "changes, words",
    [
        (dict(num_loops=100000), ["num_loops", "100000", "[1, 1024]"]),
        (dict(exit_strategy="threshold", max_loops=5000), ["max_loops", "5000", "[1, 1024]"]),
    ],
    ids=["num_loops", "max_loops"],
)
def test_item15_checkpoint_loop_counts_are_capped_like_loops(cli, looped_llama_dir, tmp_path, changes, words):
    """Old: loaded, and `loopus generate` ran 100000 loop passes per token, for an hour."""
    from loopus_convert.checkpoint import load_looped
    from loopus_core.errors import LoopusError

    ckpt = _copy(looped_llama_dir, tmp_path / "many-loops", **changes)
    with pytest.raises(LoopusError) as caught:
        load_looped(ckpt)
    assert all(word in str(caught.value) for word in words), caught.value
    args = ["--loops", "1", "--exit-threshold", "", "--block-size", "16", "--max-blocks", "1"]
    code, stdout, stderr = cli("eval", ckpt, *args, "--device", "cpu")  # every command loads through it
    _one_line_error(code, stdout, stderr, str(ckpt), *words)


# ------------------------------------------------------------------- 16: lm-eval's run-time errors


def test_item16_num_fewshot_beyond_the_task_is_one_line(cli, looped_llama_dir, tmp_path):
    """Old: ValueError "Sample larger than population" with a traceback, after the model was loaded."""
    out = tmp_path / "r.json"
    args = ["--tasks", "loopus_mc", "--num-fewshot", "500", "--device", "cpu", "--json", out]
    code, stdout, stderr = cli("eval", looped_llama_dir, *args)
    _one_line_error(code, stdout, stderr, "--num-fewshot 500", "loopus_mc", "at most 24")
    assert not out.exists()


def test_item16_an_error_inside_the_harness_is_one_line_a_model_error_keeps_its_traceback(
    cli, looped_llama_dir, monkeypatch
):
    import lm_eval

    def harness_fails(**kwargs):
        raise KeyError("doc_field")  # raised in harness code: a task the harness cannot run

    args = ["eval", looped_llama_dir, "--tasks", "loopus_mc", "--device", "cpu", "--loops", "1"]
    monkeypatch.setattr(lm_eval, "simple_evaluate", harness_fails)
    code, stdout, stderr = cli(*args)
    _one_line_error(code, stdout, stderr, "--tasks loopus_mc", "lm-eval stopped", "KeyError", "doc_field")

    def model_fails(model, **kwargs):
        model.model(torch.zeros(1, 1, dtype=torch.float32))  # float ids: an error inside torch = a bug

    monkeypatch.setattr(lm_eval, "simple_evaluate", model_fails)
    with pytest.raises(RuntimeError):
        cli(*args)


# ------------------------------------------------------------------- 17: flags that would be ignored


@pytest.mark.parametrize(
    "args, words",
    [
        (["--exit-strategy", "none", "--exit-threshold", "0.5"], ["--exit-threshold 0.5", "or cdf"]),
        (["--kl-threshold", "0.1"], ["--kl-threshold 0.1", "--exit-strategy kl", "the checkpoint's"]),
        (["--exit-strategy", "kl", "--argmax-patience", "3"], ["--argmax-patience 3", "here is kl"]),
        (["--max-loops", "3"], ["--max-loops 3", "other than none"]),
        (["--loops", "4", "--max-loops", "2", "--exit-threshold", "0.5"], ["--loops 4", "--max-loops 2"]),
    ],
    ids=["threshold-under-none", "kl-without-kl", "patience-under-kl", "max-loops-without-exit",
         "max-loops-below-loops"],
)  # fmt: skip
def test_item17_generate_refuses_flags_it_would_ignore(cli, looped_llama_dir, args, words):
    code, stdout, stderr = cli("generate", looped_llama_dir, "-p", "The", "--max-new-tokens", "1", *args)
    _one_line_error(code, stdout, stderr, *words)
    assert stdout == ""  # refused before anything was generated


def test_item17_generate_takes_the_flags_where_they_apply(cli, looped_llama_dir):
    code, stdout, stderr = cli(
        "generate", looped_llama_dir, "--prompt", "The", "--max-new-tokens", "2", "--exit-strategy", "kl",
        "--kl-threshold", "0.1", "--max-loops", "3",
    )  # fmt: skip
    assert code == 0, stderr
    assert "loops per token" in stdout


@pytest.mark.parametrize(
    "args, words",
    [
        ([*TASK, "--kv-strategy", "last"], ["--tasks ignores --kv-strategy"]),
        ([*TASK, "--max-blocks", "4"], ["--tasks ignores --max-blocks"]),
        ([*TASK, "--max-loops", "4"], ["--max-loops", "--exit-threshold"]),
        ([*TASK, "--min-loops", "2"], ["--min-loops", "--exit-threshold"]),
        (["--loops", "1", "--block-size", "16", "--exit-threshold", "", "--max-loops", "4"],
         ["--max-loops", "no early-exit row"]),
    ],
    ids=["tasks-kv", "tasks-max-blocks", "tasks-max-loops", "tasks-min-loops", "no-threshold-max-loops"],
)
def test_item17_eval_refuses_flags_it_would_ignore(cli, looped_llama_dir, tmp_path, args, words):
    out = tmp_path / "r.json"
    code, stdout, stderr = cli("eval", looped_llama_dir, *args, "--device", "cpu", "--json", out)
    _one_line_error(code, stdout, stderr, *words)
    assert not out.exists()


# ------------------------------------------------------------------- 19: an adapter-only checkpoint


def test_item19_eval_of_a_run_whose_newest_checkpoint_is_an_adapter(cli, looped_llama_dir, tmp_path):
    """The layout a LoRA run writes before its last checkpoint (loopus_train.lora): old: "config.json is
    missing"."""
    from loopus_train.lora import ADAPTER_DIR
    from loopus_train.state import CHECKPOINT_DIR, STATE_JSON

    run = tmp_path / "run"
    step = run / CHECKPOINT_DIR / "step-2"
    (step / ADAPTER_DIR).mkdir(parents=True)
    (step / ADAPTER_DIR / "adapter_config.json").write_text("{}")
    (step / STATE_JSON).write_text(json.dumps({"step": 2, "files": {}}))
    (run / "run.json").write_text(json.dumps({"config": {"checkpoint": str(looped_llama_dir)}}))
    code, stdout, stderr = cli("eval", run, "--device", "cpu")
    _one_line_error(code, stdout, stderr, "step-2", "LoRA adapter", "merged",
                    f"loopus finetune {looped_llama_dir} --out {run} --resume")  # fmt: skip
    assert "config.json is missing" not in stderr


# ------------------------------------------------------------------- 22: NaN or infinite weights


@pytest.mark.parametrize("value, word", [(float("nan"), "NaN"), (float("inf"), "infinite")])
def test_item22_non_finite_weights_are_refused_at_load(cli, looped_llama_dir, tmp_path, value, word):
    """Old: loaded, and generated an empty continuation with rc 0."""
    from loopus_convert.checkpoint import load_looped, save_looped

    model = load_looped(looped_llama_dir)
    with torch.no_grad():
        model.model.layers[3].mlp.down_proj.weight[0, 0] = value
    ckpt = save_looped(model, tmp_path / "bad", tokenizer=sorted(looped_llama_dir.glob("tokenizer*")))
    code, stdout, stderr = cli("generate", ckpt, "--prompt", "The", "--max-new-tokens", "2")
    _one_line_error(code, stdout, stderr, "layers.3.mlp.down_proj.weight", word)
    assert stdout == ""


# ------------------------------------------------------------------- 23: third-party noise


def test_item23_weights_that_do_not_fit_the_config_are_named_not_a_hidden_report(
    cli, looped_llama_dir, tmp_path
):
    """Old: "... For details look at the above report!" with no report shown."""
    ckpt = _copy(looped_llama_dir, tmp_path / "wider", base_config={"intermediate_size": 256})
    code, stdout, stderr = cli("generate", ckpt, "--prompt", "The", "--max-new-tokens", "1")
    _one_line_error(code, stdout, stderr, "mlp", "has shape", "[64, 128]", "the config expects")
    assert "report" not in stderr


def test_item23_a_tasks_run_prints_nothing_of_its_own(looped_llama_dir, tmp_path, monkeypatch, capfd):
    """Outside a git repository (old: git's "fatal: not a git repository" on every run, and lm-eval's and
    datasets' tqdm bars)."""
    from tqdm import std

    monkeypatch.chdir(tmp_path)
    init = std.tqdm.__init__
    result = evaluate_tasks(looped_llama_dir, "loopus_mc,loopus_gen", loops=(1,), options=OPTIONS).to_json()
    out, err = capfd.readouterr()
    assert result["rows"][0]["tasks"]["loopus_mc"]["metrics"]["loopus_mc"]["acc,none"] >= 0
    assert "fatal" not in err and "it/s" not in err and "%|" not in err, err
    assert out == ""
    assert std.tqdm.__init__ is init  # restored
    import lm_eval.evaluator

    assert lm_eval.evaluator.get_git_commit_hash.__module__ == "lm_eval.loggers.utils"


def test_item23_the_cli_shows_lm_eval_progress_as_its_own(cli, looped_llama_dir, monkeypatch):
    """One progress of ours (n of m task runs) instead of the harness's bars."""
    monkeypatch.setenv("LOOPUS_PROGRESS", "1")
    code, _, stderr = cli("eval", looped_llama_dir, "--tasks", "loopus_mc", "--limit", "2", "--loops", "1,2",
                          "--device", "cpu")  # fmt: skip
    assert code == 0, stderr
    assert "lm-eval: 1 task(s) x 2 setting(s)" in stderr and "2/2" in stderr
    assert "it/s" not in stderr

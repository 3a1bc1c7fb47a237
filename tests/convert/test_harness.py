"""lm-evaluation-harness on looped checkpoints: the plain ``lm_eval --model hf`` and ``loopus eval --tasks``.

"Separate lm_eval runs" below are ``simple_evaluate(model="hf", model_args="pretrained=DIR,...")``, what
the ``lm_eval`` command calls after parsing its flags: a fresh ``HFLM`` that loads the checkpoint from disk
(with ``trust_remote_code``: the model files copied next to the checkpoint). One test runs the real
``lm_eval`` command in a subprocess.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch

from loopus_convert.harness import (
    LOCAL_TASKS,
    RunOptions,
    evaluate_tasks,
    forwards_recorded,
    gate_is_identity,
)

LIMIT = 4  # documents per task: enough for both request types, small enough for a 2-core machine
TASKS = ("loopus_mc", "loopus_gen")
OPTIONS = RunOptions(limit=LIMIT, batch_size=4, device="cpu")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _manager():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(LOCAL_TASKS), include_defaults=False)


def _hflm(model_args: str):
    """The HFLM that ``lm_eval --model hf --model_args MODEL_ARGS --batch_size 4 --device cpu`` builds."""
    from lm_eval.models.huggingface import HFLM

    return HFLM.create_from_arg_string(model_args, {"batch_size": 4, "device": "cpu"})


def _evaluate(model, tasks=TASKS, limit=LIMIT, **kwargs) -> dict:
    """``simple_evaluate`` on a model-args string (a separate lm_eval run) or an HFLM, with samples."""
    from lm_eval import simple_evaluate

    return simple_evaluate(
        model="hf" if isinstance(model, str) else model,
        model_args=model if isinstance(model, str) else None,
        tasks=list(tasks),
        task_manager=_manager(),
        limit=limit,
        batch_size=4,
        device="cpu",
        log_samples=True,
        **kwargs,
    )


def _numbers(results: dict, task: str) -> dict[str, float]:
    return {k: v for k, v in results["results"][task].items() if isinstance(v, (int, float))}


def _scores(samples: list[dict]) -> list:
    """Per document: every choice's loglikelihood (multiple choice) or the filtered answer (generation)."""
    return [
        [float(r[0]) if isinstance(r, (list, tuple)) else r for r in s["filtered_resps"]]  # JSON: strings
        for s in sorted(samples, key=lambda s: s["doc_id"])
    ]


def _assert_same_scores(got: list, expected: list, tol: float) -> None:
    assert len(got) == len(expected) > 0
    for a, b in zip(got, expected, strict=True):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert x == y if isinstance(x, str) else abs(x - y) <= tol, (got, expected)


def _lm_eval_command(model_args: str, out, limit: int = LIMIT) -> tuple[dict, dict[str, list]]:
    """Run the ``lm_eval`` command in a fresh process, offline; its results and logged samples."""
    command = [
        sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", model_args, "--include_path",
        str(LOCAL_TASKS), "--tasks", ",".join(TASKS), "--limit", str(limit), "--batch_size", "4", "--device",
        "cpu", "--output_path", str(out), "--log_samples",
    ]  # fmt: skip
    env = {**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=out.parent, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    samples = {
        task: [
            json.loads(line) for line in next(out.rglob(f"samples_{task}_*.jsonl")).read_text().splitlines()
        ]
        for task in TASKS
    }
    return results, samples


def test_lm_eval_command_runs_a_looped_checkpoint_offline_and_one_loop_is_the_base(
    looped_llama_dir, tiny_llama_dir, tmp_path
):
    looped, looped_samples = _lm_eval_command(
        f"pretrained={looped_llama_dir},trust_remote_code=True,num_loops=1", tmp_path / "looped"
    )
    base = _evaluate(f"pretrained={tiny_llama_dir}")
    for task in TASKS:
        assert looped["n-samples"][task]["effective"] == LIMIT
        assert _numbers(looped, task) == pytest.approx(_numbers(base, task), abs=1e-12)
        _assert_same_scores(_scores(looped_samples[task]), _scores(base["samples"][task]), tol=1e-4)


def test_checkpoint_loads_without_remote_code_once_loopus_convert_is_imported(looped_llama_dir):
    from loopus_convert.modeling_loopus import LoopusForCausalLM

    lm = _hflm(f"pretrained={looped_llama_dir},num_loops=3")
    assert type(lm.model) is LoopusForCausalLM  # our class, registered for the Auto classes on import
    assert lm.model.config.num_loops == 3
    results = _evaluate(lm, tasks=("loopus_mc",))
    assert results["n-samples"]["loopus_mc"]["effective"] == LIMIT


@contextlib.contextmanager
def _calls(*modules) -> Iterator[list[int]]:
    """How often each module's forward ran inside the block."""
    counts = [0] * len(modules)

    def counter(i: int):
        def hook(*_) -> None:
            counts[i] += 1

        return hook

    handles = [module.register_forward_hook(counter(i)) for i, module in enumerate(modules)]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def test_num_loops_in_model_args_runs_that_many_passes_and_changes_the_scores(looped_llama_dir):
    scores = {}
    for k in (1, 3):
        lm = _hflm(f"pretrained={looped_llama_dir},trust_remote_code=True,num_loops={k}")
        assert lm.model.config.num_loops == k  # a config attribute: transformers sets it, forward reads it
        with _calls(lm.model, lm.model.gate) as calls:
            results = _evaluate(lm, tasks=("loopus_mc",))
        forward, gate = calls
        assert forward > 0 and gate == k * forward  # the gate runs once per loop pass
        scores[k] = [x for doc in _scores(results["samples"]["loopus_mc"]) for x in doc]
    assert max(abs(a - b) for a, b in zip(scores[1], scores[3], strict=True)) > 1e-3


def _loops_used(lm, tasks, **kwargs) -> set[int]:
    with forwards_recorded(lm.model) as record:
        _evaluate(lm, tasks=tasks, **kwargs)
    assert len(record.loops) == record.calls > 0
    return set(torch.cat(record.loops).tolist())


def test_exit_settings_through_model_args_and_gen_kwargs(looped_llama_dir):
    """A fresh checkpoint's confidence head says sigmoid(0) = 0.5 at every pass: tau 0.4 exits at once."""
    lm = _hflm(f"pretrained={looped_llama_dir},trust_remote_code=True,num_loops=4")
    assert _loops_used(lm, ("loopus_gen",)) == {4}
    assert _loops_used(lm, ("loopus_gen",), gen_kwargs="exit_threshold=0.4") == {1}
    assert _loops_used(lm, ("loopus_gen",), gen_kwargs="exit_threshold=0.4,min_loops=3") == {3}
    assert _loops_used(lm, ("loopus_gen",), gen_kwargs="exit_strategy=cdf,exit_threshold=0.7") == {2}
    args = f"pretrained={looped_llama_dir},trust_remote_code=True,num_loops=4"
    lm = _hflm(f"{args},exit_strategy=threshold,exit_threshold=0.4,min_loops=2")
    assert _loops_used(lm, TASKS) == {2}  # loglikelihood and generation alike: read at forward time
    lm = _hflm(f"{args},exit_strategy=threshold,exit_threshold=0.9,max_loops=3")
    assert _loops_used(lm, TASKS) == {3}  # never confident enough: stops at max_loops, not num_loops
    lm = _hflm(f"{args},exit_strategy=none,exit_threshold=0.4")  # the Python API parses "none" as None
    assert lm.model.config.exit_strategy is None
    assert _loops_used(lm, ("loopus_mc",)) == {4}  # a config threshold alone does not switch exit on


def test_loopus_eval_tasks_equals_separate_lm_eval_runs_in_one_load(
    cli, looped_llama_dir, tmp_path, monkeypatch
):
    from loopus_convert.modeling_loopus import LoopusForCausalLM

    loads = []
    original = LoopusForCausalLM.from_pretrained.__func__
    monkeypatch.setattr(
        LoopusForCausalLM,
        "from_pretrained",
        classmethod(lambda cls, *a, **k: loads.append(a) or original(cls, *a, **k)),
    )
    monkeypatch.setenv("COLUMNS", "250")  # the whole table on one line per row
    out = tmp_path / "harness.json"
    code, stdout, stderr = cli(
        "eval", looped_llama_dir, "--tasks", ",".join(TASKS), "--loops", "1,3", "--exit-threshold", "0.4",
        "--limit", LIMIT, "--batch-size", "4", "--device", "cpu", "--json", out,
    )  # fmt: skip
    monkeypatch.undo()
    assert code == 0, stderr
    assert len(loads) == 1
    result = json.loads(out.read_text())
    assert [row["label"] for row in result["rows"]] == ["base (= 1 loop)", "3 loops", "threshold 0.4 (<= 3)"]
    assert result["harness"]["lm_eval"] == __import__("lm_eval").__version__
    assert result["harness"]["task_versions"] == {"loopus_mc": 1.0, "loopus_gen": 1.0}
    for title in (
        "loopus_mc acc ",
        "loopus_mc acc_norm",
        "loopus_gen exact_match (strip)",
        "loopus_gen loops",
    ):
        assert title in stdout
    for row, expected_loops in zip(result["rows"], (1, 3, 1), strict=True):
        separate = _evaluate(f"pretrained={looped_llama_dir},trust_remote_code=True,{row['model_args']}")
        cells = [row["label"]]
        for task in TASKS:
            entry = row["tasks"][task]
            assert entry["metrics"][task] == pytest.approx(_numbers(separate, task), abs=1e-12)
            assert entry["mean_loops"] == expected_loops and entry["forward_calls"] > 0
            cells += [
                f"{v:.4f}"
                for k, v in entry["metrics"][task].items()
                if "stderr" not in k and k != "sample_len"
            ]
        assert any(all(cell in line for cell in cells) for line in stdout.splitlines()), (cells, stdout)


def _bad_yaml(tmp_path) -> list[str]:
    (tmp_path / "broken.yaml").write_text("task: loopus_broken\ndoc_to_text: [unclosed\n")
    return ["--tasks", str(tmp_path / "broken.yaml")]


def _no_task_key(tmp_path) -> list[str]:
    (tmp_path / "nameless.yaml").write_text("output_type: multiple_choice\n")
    return ["--tasks", str(tmp_path / "nameless.yaml")]


@pytest.mark.parametrize(
    "args, words",
    [
        (["--tasks", "loopus_mcq"], ["--tasks loopus_mcq", "unknown task", "did you mean loopus_mc"]),
        (_bad_yaml, ["broken.yaml", "does not parse"]),
        (_no_task_key, ["nameless.yaml", "names no 'task:'"]),
        (["--tasks", "/nowhere/tasks.yaml"], ["tasks.yaml", "does not exist"]),
        (["--tasks", "loopus_mc", "--loops", "0"], ["--loops", "0", "[1, 1024]"]),
        (["--tasks", "loopus_mc", "--exit-threshold", "1.5"], ["--exit-threshold", "1.5"]),
        (["--tasks", "loopus_mc", "--exit-threshold", "0.5", "--exit-strategy", "convergence"],
         ["--exit-strategy", "threshold, cdf"]),
        (["--tasks", "loopus_mc", "--limit", "0"], ["--limit", "0"]),
        (["--tasks", "loopus_mc", "--data", "x.txt"], ["--data", "--tasks"]),
        (["--limit", "4"], ["--limit", "only apply with --tasks"]),
    ],
    ids=["unknown-task", "yaml-does-not-parse", "yaml-names-no-task", "yaml-missing", "loops-0", "threshold",
         "strategy", "limit", "data-with-tasks", "limit-without-tasks"],
)  # fmt: skip
def test_bad_harness_input_is_one_line(cli, looped_llama_dir, tmp_path, args, words):
    from tests.convert.test_cli import _one_line_error

    args = args(tmp_path) if callable(args) else args
    out = tmp_path / "harness.json"
    code, stdout, stderr = cli("eval", looped_llama_dir, *args, "--device", "cpu", "--json", out)
    _one_line_error(code, stdout, stderr, *words)
    assert not out.exists()


def test_tasks_without_the_harness_installed_say_how_to_install_it(cli, looped_llama_dir, monkeypatch):
    from tests.convert.test_cli import _one_line_error

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    code, stdout, stderr = cli("eval", looped_llama_dir, "--tasks", "loopus_mc", "--device", "cpu")
    _one_line_error(code, stdout, stderr, "lm-evaluation-harness", "pip install 'loopus[eval]'")


def test_base_row_is_claimed_only_for_a_fresh_identity_gate_checkpoint(
    looped_llama_dir, tiny_llama_dir, tmp_path
):
    from loopus_convert.checkpoint import load_looped, save_looped

    model = load_looped(looped_llama_dir)
    assert gate_is_identity(model)
    with torch.no_grad():
        model.gate.delta_proj.weight.normal_(generator=torch.Generator().manual_seed(0))
    assert not gate_is_identity(model)
    moved = save_looped(model, tmp_path / "moved", tokenizer=list(looped_llama_dir.glob("tokenizer*")))
    kwargs = dict(options=OPTIONS)

    result = evaluate_tasks(moved, "loopus_mc", loops=(1, 2), **kwargs).to_json()
    assert [row["label"] for row in result["rows"]] == ["1 loop", "2 loops"]
    assert result["base"].startswith("not measured") and "--base" in result["base"]
    trained = evaluate_tasks(looped_llama_dir, "loopus_mc", loops=(2,), trained=True, **kwargs).to_json()
    assert [row["label"] for row in trained["rows"]] == ["2 loops"]  # trained: 1 loop is not the base

    result = evaluate_tasks(moved, "loopus_mc", loops=(2,), base=str(tiny_llama_dir), **kwargs).to_json()
    assert [row["label"] for row in result["rows"]] == [f"base ({tiny_llama_dir.name})", "2 loops"]
    assert result["rows"][0]["tasks"]["loopus_mc"]["mean_loops"] is None
    separate = _evaluate(f"pretrained={tiny_llama_dir}", tasks=("loopus_mc",))
    assert result["rows"][0]["tasks"]["loopus_mc"]["metrics"]["loopus_mc"] == pytest.approx(
        _numbers(separate, "loopus_mc"), abs=1e-12
    )


@pytest.mark.slow
def test_lm_eval_command_on_the_default_model_one_loop_is_the_base(
    default_model_dir, default_analysis, tmp_path
):
    """The embedded default model converted with the identity gate (``--split auto``): the ``lm_eval``
    command at one loop gives the base model's scores under ``--model hf``, choice by choice."""
    from loopus_convert import convert_model

    out = convert_model(None, tmp_path / "smollm-looped", split="auto", analysis=default_analysis[3]).out
    limit = 8
    looped, samples = _lm_eval_command(
        f"pretrained={out},trust_remote_code=True,num_loops=1", tmp_path / "looped", limit=limit
    )
    base = _evaluate(f"pretrained={default_model_dir}", limit=limit)
    for task in TASKS:
        assert looped["n-samples"][task]["effective"] == limit
        assert _numbers(looped, task) == pytest.approx(_numbers(base, task), abs=1e-12)
        _assert_same_scores(_scores(samples[task]), _scores(base["samples"][task]), tol=1e-3)

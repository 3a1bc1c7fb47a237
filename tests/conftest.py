"""Session fixtures: tiny models of every family, the embedded default model, a CLI runner."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.tiny_models import FAMILIES, make_tiny_model, make_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# pytest-xdist's workers inherit COLUMNS=80, and the CLI's rich consoles fix the width they find at import:
# a test's own COLUMNS (monkeypatch) would then not apply. Unset, the width is read at each print.
os.environ.pop("COLUMNS", None)
if os.environ.get("PYTEST_XDIST_WORKER"):
    # two workers on the CI machine's two cores: one thread each (and in the runs they start), as torch's
    # threads of two processes on two cores spend their time waiting for each other
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


DEFAULT_ANALYSIS_GROUP = "default-analysis"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items) -> None:
    """Groups for pytest-xdist's ``--dist loadgroup`` (``make test``: a worker per core, at most 4): each test
    file runs in one worker, so that its module fixtures are built once, and every test that reads the
    embedded default analysis (a session fixture of about two minutes) runs in the same worker."""
    for item in items:
        uses_analysis = "default_analysis" in getattr(item, "fixturenames", ())
        group = DEFAULT_ANALYSIS_GROUP if uses_analysis else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    make_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, tiny_tokenizer_dir) -> dict[str, Path]:
    """family -> saved tiny model directory (8 layers, hidden 64, with tokenizer)."""
    root = tmp_path_factory.mktemp("tiny")
    return {family: make_tiny_model(family, root / family, tiny_tokenizer_dir) for family in FAMILIES}


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model_dirs) -> Path:
    return tiny_model_dirs["llama"]


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The embedded default model (SmolLM2-135M-Instruct) as a plain HF directory, built once and cached."""
    from loopus_core.models import default_model_dir as build

    return build()


@pytest.fixture(scope="session")
def default_analysis(default_model_dir, tmp_path_factory):
    """``loopus analyze`` of the embedded default model, run once per session with a modest budget.

    Returns (stdout, analysis.json as a dict, report.html text, the report directory). The convert and
    finetune tests convert the default model at the split this analysis recommends (``--split auto``).
    """
    import json

    import torch
    from typer.testing import CliRunner

    from loopus.cli import app

    out = tmp_path_factory.mktemp("default-analysis") / "report"
    before = torch.get_num_threads()
    torch.set_num_threads(min(2, before))  # at most the 2 cores of the CI machine
    try:
        # the race over the 231 splits of useful length on one window of 128 tokens (the least --map-tokens
        # takes: one document, so nothing is eliminated and the confidence is low), the report text's blocks
        # on one window: most of this fixture's time (the default budget: benchmarks/bench_analyze_seeds.py)
        args = ["analyze", "--out", str(out), "--tokens", "2048", "--seq-len", "64", "--map-tokens", "111",
                "--device", "cpu", "--no-probes"]
        result = CliRunner().invoke(app, args, catch_exceptions=False)
    finally:
        torch.set_num_threads(before)
    assert result.exit_code == 0, result.stderr
    analysis = json.loads((out / "analysis.json").read_text())
    return result.stdout, analysis, (out / "report.html").read_text(), out


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny models gain nothing from threads on a shared 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cli():
    """Run ``loopus ARGS`` in-process; returns (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from loopus.cli import app

    runner = CliRunner()

    def invoke(*args: str):
        result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        return result.exit_code, result.stdout, result.stderr

    return invoke


@pytest.fixture
def figures_not_drawn(monkeypatch):
    """The analysis report's figures built but not drawn (an empty PNG): drawing is ~2/3 of a tiny model's
    analysis and does not depend on the model. For the tests that run the analysis on many model types;
    the report tests (tests/analyze/test_report.py) and one analysis per CLI file draw them for real."""
    import html

    from loopus_analyze import plots

    def png(fig, alt: str, caption: str = "") -> str:
        return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,"></figure>'

    monkeypatch.setattr(plots, "png", png)

"""``loopus analyze [MODEL]``: measure the layers, recommend a split, write report.html + analysis.json."""

from __future__ import annotations

from pathlib import Path

import typer

from loopus.app import RichProgress, app, console, guarded
from loopus_analyze.corpus import DEFAULT_SEQ_LEN, DEFAULT_TOKENS


@app.command("analyze")
def analyze(
    model: str = typer.Argument(
        None, show_default=False,
        help="Local HF model directory, .gguf file or hub id; default: the embedded SmolLM2-135M-Instruct.",
    ),
    out: str = typer.Option(None, "--out", help="Output directory (default: reports/<model-name>/).",
                            show_default=False),
    data: str = typer.Option(None, "--data", help="Probe text: a .txt / .jsonl file or a folder of them "
                             "(default: the built-in corpus).", show_default=False),
    tokens: int = typer.Option(DEFAULT_TOKENS, "--tokens", help="Tokens to measure (first position and "
                               "padding excluded)."),
    seq_len: int = typer.Option(DEFAULT_SEQ_LEN, "--seq-len", help="Tokens per sequence window."),
    seed: int = typer.Option(0, "--seed", help="Seed for document order, probes and bootstrap."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto."),
    no_probes: bool = typer.Option(False, "--no-probes", help="Skip the linear probes (faster)."),
) -> None:
    """Measure every layer of a causal LM and recommend the encoder / loop block / decoder split."""
    from loopus_analyze.analyze import run_analysis

    with guarded(), RichProgress() as progress:
        result = run_analysis(
            model, out=Path(out) if out is not None else None, data=data, tokens=tokens, seq_len=seq_len,
            seed=seed, dtype=dtype, device=device, probes=not no_probes, progress=progress,
        )
    console.print(f"recommended split: [bold]{result.split}[/] ({result.confidence} confidence)",
                  highlight=False)
    console.print(f"why: {result.reason}", highlight=False, markup=False, soft_wrap=True)
    if result.alternatives:
        shown = ", ".join(f"{a['split']} ({a['score']:.3f})" for a in result.alternatives[:5])
        console.print(f"alternatives (score): {shown}", highlight=False, markup=False, soft_wrap=True)
    console.print(f"next: {result.convert_command}", highlight=False, markup=False, soft_wrap=True)
    console.print(f"report: {result.report_path}", highlight=False, markup=False, soft_wrap=True)
    console.print(f"data:   {result.json_path}", highlight=False, markup=False, soft_wrap=True)

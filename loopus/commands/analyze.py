"""``loopus analyze [MODEL]``: map the repeat cost of every split, recommend one, write the report."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.text import Text

from loopus.app import RichProgress, app, console, guarded
from loopus_analyze.corpus import DEFAULT_SEQ_LEN, DEFAULT_TOKENS
from loopus_analyze.heldout import DEFAULT_MAP_TOKENS, MAP_SEQ_LEN, REPORT_SHARE
from loopus_analyze.race import RACE_SHARE
from loopus_analyze.rule import DEFAULT_REPEAT_BUDGET


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
    tokens: int = typer.Option(DEFAULT_TOKENS, "--tokens", help="Tokens for the similarity measurements "
                               "(first position and padding excluded)."),
    seq_len: int = typer.Option(DEFAULT_SEQ_LEN, "--seq-len", help="Tokens per window of the similarity "
                                "measurements."),
    map_tokens: int = typer.Option(DEFAULT_MAP_TOKENS, "--map-tokens", help="Held-out predictions each "
                                   "final contender of the race over the splits reads (selection text, "
                                   f"windows of {MAP_SEQ_LEN} tokens; the race spends at most "
                                   f"{RACE_SHARE:.2g} of the uniform map at this budget, the report text "
                                   f"gets {REPORT_SHARE:.0%} of it). Raise it on a GPU."),
    loop_layers: str = typer.Option(None, "--loop-layers", help="Loop block length N, or a range N-M "
                                    "(default: a quarter of the layers or more).", show_default=False),
    repeat_budget: float = typer.Option(None, "--repeat-budget", help="Nats per token a block may cost "
                                        f"when it runs twice (default {DEFAULT_REPEAT_BUDGET}): the "
                                        "longest block within it is recommended.", show_default=False),
    seed: int = typer.Option(0, "--seed", help="Seed for document order, probes and bootstrap."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto."),
    no_probes: bool = typer.Option(False, "--no-probes", help="Skip the linear probes (faster)."),
) -> None:
    """Map what running each block twice costs, recommend the encoder / loop block / decoder split."""
    from loopus_analyze.analyze import run_analysis

    with guarded(), RichProgress() as progress:
        result = run_analysis(
            model, out=Path(out) if out is not None else None, data=data, tokens=tokens, seq_len=seq_len,
            seed=seed, dtype=dtype, device=device, probes=not no_probes, map_tokens=map_tokens,
            loop_layers=loop_layers, repeat_budget=repeat_budget, progress=progress,
        )
    console.print(Text.assemble("recommended split: ", (str(result.split), "bold"),
                                f" ({result.confidence} confidence)"))
    console.print(f"why: {result.reason}", highlight=False, markup=False, soft_wrap=True)
    if result.stability:
        console.print(result.stability, highlight=False, markup=False, soft_wrap=True)
    if result.alternatives:
        shown = ", ".join(f"{a['length']} layers {a['split']} ({a['repeat_delta_nll']['value']:+.3f})"
                          for a in result.alternatives)
        console.print(f"cheapest block of each other length (repeat cost, nats): {shown}", highlight=False,
                      markup=False, soft_wrap=True)
    console.print(f"next: {result.convert_command}", highlight=False, markup=False, soft_wrap=True)
    console.print(f"report: {result.report_path}", highlight=False, markup=False, soft_wrap=True)
    console.print(f"data:   {result.json_path}", highlight=False, markup=False, soft_wrap=True)

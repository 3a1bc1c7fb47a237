"""``loopus eval CKPT``: held-out perplexity per loop count, confidence calibration, early-exit statistics."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from loopus.app import RichProgress, app, console, guarded, number_list, say


@app.command("eval")
def evaluate(
    checkpoint: Path = typer.Argument(..., help="A looped checkpoint, or a `loopus finetune` run directory."),
    data: str = typer.Option(
        None,
        "--data",
        help=".txt / .jsonl file or folder (default: the run's held-out "
        "split for a trained checkpoint, else the built-in corpus).",
    ),
    loops: str = typer.Option("1,2,4,8", "--loops", help="Loop counts to measure."),
    exit_threshold: str = typer.Option(
        "0.6,0.8,0.9", "--exit-threshold", help="Early-exit thresholds; '' = none."
    ),
    max_loops: int = typer.Option(
        None, "--max-loops", help="Loop limit under early exit (default: max --loops)."
    ),
    kv_strategy: str = typer.Option(
        "",
        "--kv-strategy",
        help="KV strategies to compare with full at each --loops, e.g. last,first: blocks decoded token by "
        "token (slow); '' = none.",
    ),
    block_size: int = typer.Option(
        None, "--block-size", help="Tokens per block (default: the run's, or 256)."
    ),
    max_blocks: int = typer.Option(64, "--max-blocks", help="Blocks evaluated at most."),
    batch_size: int = typer.Option(8, "--batch-size", help="Blocks per forward pass."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N."),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 autocast on GPUs) | fp32 | bf16."),
    json_out: Path = typer.Option(None, "--json", help="Also write the results to this JSON file."),
) -> None:
    """Evaluate a looped checkpoint: perplexity per loop count and what early exit saves and costs."""
    with guarded():
        from loopus_core.jsonio import dumps_strict
        from loopus_core.runtime import check_output_file, write_text_atomic
        from loopus_train.evaluate import evaluate_checkpoint

        if json_out is not None:  # before the evaluation, so that a bad path does not lose its results
            check_output_file(json_out, "--json")
        counts = number_list(loops, "--loops", int)
        thresholds = number_list(exit_threshold, "--exit-threshold", float)
        with RichProgress() as progress:
            result = evaluate_checkpoint(
                checkpoint,
                data=data,
                loops=counts,
                thresholds=thresholds,
                max_loops=max_loops,
                kv_strategies=tuple(name.strip() for name in kv_strategy.split(",") if name.strip()),
                block_size=block_size,
                max_blocks=max_blocks,
                batch_size=batch_size,
                device=device,
                precision=precision,
                progress=progress,
            )
        say(f"{result['checkpoint']}: {result['blocks']} blocks of {result['block_size']} tokens "
            f"from {result['data']}")
        table = Table("loops", "loss", "perplexity", "token accuracy")
        for k, row in result["loops"].items():
            table.add_row(k, f"{row['loss']:.4f}", f"{row['ppl']:.3f}", f"{row['accuracy']:.3f}")
        console.print(table)
        cal = result["calibration"]
        console.print(
            f"confidence head: ECE {cal['ece']:.3f}, Brier {cal['brier']:.3f} (mean confidence "
            f"{cal['mean_confidence']:.3f} vs mean correct {cal['mean_correct']:.3f})"
        )
        if result["early_exit"]:
            exits = Table("exit threshold", "mean loops", "perplexity", "change vs full")
            for key, row in result["early_exit"]["thresholds"].items():
                label = f"none ({result['early_exit']['max_loops']} loops)" if key == "full" else key
                exits.add_row(
                    label, f"{row['mean_loops']:.2f}", f"{row['ppl']:.3f}", f"{row['ppl_change']:+.2%}"
                )
            console.print(exits)
        if result["kv_strategies"]:
            console.print(_kv_table(result["kv_strategies"]))
        if json_out is not None:  # strict JSON: an infinite perplexity is null
            write_text_atomic(json_out, dumps_strict(result, indent=1), "--json")
            say(f"results: {json_out}")


def _kv_table(kv: dict) -> Table:
    """Perplexity, top-token agreement with full and cache bytes per KV strategy and loop count."""
    table = Table("KV cache", "loops", "perplexity", "top-1 = full", "bytes / sequence", "vs base")
    for name, per_k in kv["strategies"].items():
        for k, row in per_k.items():
            table.add_row(
                name,
                k,
                f"{row['ppl']:.3f}",
                f"{row['agreement']:.3f}",
                f"{row['cache_bytes']:,}",
                f"{row['vs_base']:.2f}x",
            )
    table.caption = (
        f"each block: a {kv['prompt_tokens']}-token prompt in one call, then one token per call "
        f"({kv['decoded_tokens']} predictions)"
    )
    return table

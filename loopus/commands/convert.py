"""``loopus convert``: a base model (or an official LoopUS checkpoint) -> a looped checkpoint directory."""

from __future__ import annotations

import typer

from loopus.app import RichProgress, app, guarded, say
from loopus_convert.configuration_loopus import DEFAULT_GATE_INIT, GATE_INIT_HELP


@app.command("convert")
def convert(
    model: str = typer.Argument(
        None,
        help="Base model: HF directory, .gguf file, hub id, or an official LoopUS "
        "checkpoint (model_type lds). Omitted: the embedded default model.",
    ),
    out: str = typer.Option(None, "--out", "-o", help="Output directory of the looped checkpoint."),
    split: str = typer.Option(None, "--split", help="A:B (loop layers A..B-1), or auto with --from."),
    analysis: str = typer.Option(
        None, "--from", help="Analysis directory or analysis.json (for --split auto)."
    ),
    loops: int = typer.Option(1, "--loops", help="Default number of loop passes saved in the config."),
    gate_init: str = typer.Option(
        DEFAULT_GATE_INIT,
        "--gate-init",
        help="; ".join(f"{name}: {what}" for name, what in GATE_INIT_HELP.items()) + ".",
    ),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory."),
) -> None:
    """Turn MODEL into an encoder / loop block / decoder checkpoint (one loop = the base model)."""
    from loopus_convert.convert import convert_model
    from loopus_core.errors import LoopusError

    with guarded():
        if not out:
            raise LoopusError("--out DIR is required: where to write the looped checkpoint")
        with RichProgress() as progress:
            result = convert_model(
                model,
                out,
                split=split,
                analysis=analysis,
                num_loops=loops,
                gate_init=gate_init,
                dtype=dtype,
                force=force,
                progress=progress,
            )
    kind = "imported official LoopUS checkpoint" if result.official else "looped checkpoint"
    say(
        f"{kind} written to {result.out} (split {result.split}: {result.split.describe()}; "
        f"{result.num_loops} loop(s) by default)"
    )

"""``loopus generate``: stream a continuation from a looped checkpoint and report the loops per token."""

from __future__ import annotations

import typer

from loopus.app import app, console, guarded


@app.command("generate")
def generate(
    checkpoint: str = typer.Argument(..., help="A looped checkpoint directory (from `loopus convert`)."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="The text to continue."),
    loops: int = typer.Option(None, "--loops", help="Loop passes per token (default: the checkpoint's)."),
    exit_strategy: str = typer.Option(
        None, "--exit-strategy", help="none, threshold, cdf (trained head), convergence, kl, argmax."
    ),
    exit_threshold: float = typer.Option(None, "--exit-threshold", help="tau in (0, 1); alone = threshold."),
    max_loops: int = typer.Option(None, "--max-loops", help="Most loop passes under early exit."),
    kl_threshold: float = typer.Option(
        None,
        "--kl-threshold",
        help="kl exit: stop once the KL between passes is below this, > 0 (default: the checkpoint's).",
    ),
    argmax_patience: int = typer.Option(
        None,
        "--argmax-patience",
        help="argmax exit: passes the top token must hold, >= 1 (default: the checkpoint's).",
    ),
    kv_strategy: str = typer.Option(
        None,
        "--kv-strategy",
        help="Loop-block KV cache: full (exact), last or first (the base model's memory; default: the "
        "checkpoint's).",
    ),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy; > 0 samples."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass in (0, 1]."),
    seed: int = typer.Option(0, "--seed", help="Random seed for sampling."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or auto."),
) -> None:
    """Generate text from a looped checkpoint, printing it as it comes and the loops each token used."""
    from loopus_convert.generate import generate_text

    started = []

    def show(text: str) -> None:
        if not started:  # the prompt only once generation really runs (errors come before it)
            started.append(True)
            console.print(prompt, end="", highlight=False, markup=False)
        console.print(text, end="", highlight=False, markup=False)

    with guarded():
        result = generate_text(
            checkpoint,
            prompt,
            num_loops=loops,
            exit_strategy=exit_strategy,
            exit_threshold=exit_threshold,
            max_loops=max_loops,
            kl_threshold=kl_threshold,
            argmax_patience=argmax_patience,
            kv_strategy=kv_strategy,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            dtype=dtype,
            device=device,
            on_text=show,
        )
    console.print()
    loops_used = result.loops_per_token
    mean = sum(loops_used) / len(loops_used) if loops_used else 0.0
    console.print(f"loops per token: {' '.join(map(str, loops_used))} (mean {mean:.2f})", highlight=False)
    if result.hit_context_limit:
        console.print(
            f"stopped at the model's context limit ({result.context_limit} tokens)", highlight=False
        )

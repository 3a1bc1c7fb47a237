"""Entry point of the ``loopus`` command: ``loopus analyze | convert | prepare-data | finetune | generate |
eval``."""

from __future__ import annotations

import typer

from loopus import __version__
from loopus.app import app, setup_logging
from loopus.commands import (  # noqa: F401  (each registers itself)
    analyze,
    convert,
    evaluate,
    finetune,
    generate,
    prepare_data,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"loopus {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Looped depth up-scaling of pretrained causal LMs."""
    setup_logging(verbose)


def main() -> None:
    """Run the ``loopus`` command line."""
    app()

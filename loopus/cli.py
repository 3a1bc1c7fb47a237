"""Entry point of the ``loopus`` command: ``loopus analyze | convert | prepare-data | finetune | generate |
eval``."""

from __future__ import annotations

import typer

from loopus import __version__
from loopus.app import app, fail, setup_logging
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


# click's base of usage errors (typer >= 0.2x vendors click as typer._click, older typer uses click itself):
# found from the public typer.BadParameter, whichever it is
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def main() -> None:
    """Run the ``loopus`` command line. A usage error (an unknown command or flag, a value of the wrong type)
    is one line on stderr and exit code 2, like every other bad input, instead of click's usage box."""
    try:
        result = app(standalone_mode=False)
    except _CLICK_ERROR as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # typer printed the help while raising it
            raise SystemExit(exc.exit_code) from None
        where = exc.ctx.command_path if getattr(exc, "ctx", None) else "loopus"
        fail(f"{exc.format_message()} (see '{where} --help')")
        raise SystemExit(exc.exit_code) from None
    except typer.Abort:  # end of input at a prompt
        raise SystemExit(1) from None
    # without standalone mode click returns the code of a typer.Exit (2: an error printed, 130: Ctrl-C ...)
    raise SystemExit(result if isinstance(result, int) else 0)

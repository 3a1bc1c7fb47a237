"""One module per command; each registers itself on ``loopus.app.app`` when imported."""

import importlib

COMMAND_MODULES = ("analyze", "convert", "finetune", "generate", "evaluate")


def register_all() -> None:
    """Import every command module that exists (each one adds its command to the app)."""
    for name in COMMAND_MODULES:
        try:
            importlib.import_module(f"loopus.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"loopus.commands.{name}":
                raise

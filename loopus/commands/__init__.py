"""One module per command; each registers itself on ``loopus.app.app`` when imported (``loopus.cli``)."""

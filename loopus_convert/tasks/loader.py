"""Dataset loader of the shipped offline tasks (``custom_dataset: !function loader.load`` in their YAML).

lm-evaluation-harness calls ``load(**metadata, **dataset_kwargs)``; ``data_file`` names a JSONL file in
``data/`` next to this file, so the tasks run from any working directory without the hub. The other
keyword arguments (task metadata, model arguments) are not needed here and are ignored.
"""

from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"


def load(data_file: str, **_ignored) -> dict:
    """``{"test": datasets.Dataset}`` of the JSON lines in ``data/<data_file>``."""
    import datasets  # lm-eval's own dependency: only imported when the harness runs a task

    return {"test": datasets.Dataset.from_json(str(DATA_DIR / data_file))}

"""Every causal-LM type transformers ships: built tiny from its config class, it loops exactly or is refused
with the reason the README's support table states (``docs/support.json``, written by
``python -m loopus_convert.support --write``).

For each supported type (:func:`loopus_convert.support.check_type`): one loop = the base logits with left
padding (fp32, 1e-4), two loops differ, cached greedy generation at K = 2 and 3 = the uncached
recomputation (``full``; ``first`` against its own uncached forward; ``last`` in one call = ``full``), and a
saved copy converted through ``convert_model`` (what ``loopus convert`` runs) loads to the same one-loop
logits.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest
import torch

from loopus_convert.modeling_loopus import decoder_layer_path as model_file_rule
from loopus_convert.support import DOCS, causal_lm_types, check_type, tiny_config
from loopus_core.models import decoder_layer_path as core_rule
from loopus_core.models import model_refusal

TABLE = {row["model_type"]: row for row in json.loads((DOCS / "support.json").read_text())}
TYPES = causal_lm_types()
MIN_SUPPORTED = 100


def test_the_table_covers_every_installed_type():
    """The committed table lists exactly the installed transformers' causal-LM types, >= 100 supported."""
    assert set(TABLE) == set(TYPES)
    assert sum(row["status"] == "supported" for row in TABLE.values()) >= MIN_SUPPORTED


@pytest.mark.families
@pytest.mark.parametrize("model_type", TYPES)
def test_type_loops_or_is_refused_as_the_table_says(model_type, tmp_path):
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    try:
        result = check_type(model_type, tmp_path)
    finally:
        logging.disable(logging.NOTSET)
    row = TABLE[model_type]
    assert result.status == row["status"], result.reason
    if result.status != "supported":  # refused (the reason the table states) or untested (idem)
        assert result.reason == row["reason"]
        return
    assert result.one_loop_diff <= 1e-4
    assert result.two_loop_diff > 1e-3
    assert result.cached_diff <= 1e-4


@pytest.mark.families
@pytest.mark.parametrize("model_type", [t for t in TYPES if TABLE.get(t, {}).get("status") == "supported"])
def test_model_file_and_analysis_find_the_same_layers(model_type):
    """The remote-code model file and loopus_core derive the decoder-layer list by the same rule."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config(model_type))
    assert model_refusal(model) is None
    layers = model.config.get_text_config().num_hidden_layers
    assert model_file_rule(model, layers) == core_rule(model, layers)


def test_support_table_in_readme_is_the_generated_one():
    """The README embeds docs/support.md's counts line."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    first_line = (DOCS / "support.md").read_text().splitlines()[0]
    assert first_line in readme

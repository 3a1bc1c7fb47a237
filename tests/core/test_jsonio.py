"""``read_json``: the one reader of the JSON files loopus is given; every reader's one-line error."""

from __future__ import annotations

import json
import re

import pytest

from loopus_convert.checkpoint import check_checkpoint
from loopus_convert.convert import read_analysis
from loopus_convert.official import _official_config
from loopus_core.errors import LoopusError
from loopus_core.jsonio import read_json
from loopus_core.models import read_config


def test_a_readable_file_is_its_value(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"split": "2:5"}))
    assert read_json(tmp_path / "a.json") == {"split": "2:5"}


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"{not json", "Expecting property name"), (b"\xff\xfe{}", "can't decode byte"), (b"[" * 100_000, "")],
)
def test_an_unreadable_file_is_one_line_naming_it(tmp_path, content, reason):
    file = tmp_path / "a.json"
    file.write_bytes(content)
    with pytest.raises(LoopusError) as info:
        read_json(file, "--from", "pass the analysis.json of `loopus analyze`")
    message = str(info.value)
    assert message.startswith(f"--from {file} is not readable JSON (")
    assert message.endswith("); pass the analysis.json of `loopus analyze`")
    assert reason in message and "\n" not in message
    with pytest.raises(LoopusError, match=r"^\S+a\.json is not readable JSON \(.*\)$"):
        read_json(file)
    with pytest.raises(LoopusError, match="is not readable JSON"):
        read_json(tmp_path)  # a directory


def test_the_readers_keep_their_wording(tmp_path):
    """The sentences of the four readers that were hand-written before read_json, unchanged."""
    (tmp_path / "config.json").write_text("{oops")
    (tmp_path / "model.safetensors").write_bytes(b"")
    file = re.escape(str(tmp_path / "config.json"))
    with pytest.raises(LoopusError, match=rf"^--from {file} is not readable JSON \(.+\); pass the analysis"):
        read_analysis(tmp_path / "config.json")
    with pytest.raises(LoopusError, match=rf"^{file} is not readable JSON \(.+\)$"):
        check_checkpoint(tmp_path)
    with pytest.raises(LoopusError, match=rf"^{file} is not readable JSON \(.+\); is this a model dir"):
        read_config(tmp_path)
    with pytest.raises(LoopusError, match=rf"^{file} is not readable JSON \(.+\)$"):
        _official_config(tmp_path, None, "residual")

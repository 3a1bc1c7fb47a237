import pytest

from loopus_core.errors import LoopusError
from loopus_core.split import LayerSplit


def test_parse_is_a_python_slice_of_the_layers():
    split = LayerSplit.parse("4:20", 24)
    layers = list(range(24))
    assert list(split.encoder) == layers[:4]
    assert list(split.loop) == layers[4:20]
    assert list(split.decoder) == layers[20:]
    assert str(split) == "4:20"
    assert split.loop_size == 16


def test_edges_are_allowed():
    assert list(LayerSplit.parse("0:24", 24).encoder) == []
    assert list(LayerSplit.parse("0:24", 24).decoder) == []


def test_layers_at_counts_applied_layers():
    split = LayerSplit.parse("4:20", 24)
    assert split.layers_at(1) == 24
    assert split.layers_at(3) == 4 + 3 * 16 + 4


@pytest.mark.parametrize("text,needle", [
    ("4-20", "malformed"), ("a:b", "malformed"), ("4:", "malformed"), ("", "malformed"),
    ("20:4", "smaller"), ("5:5", "smaller"), ("4:25", "24 layers"),
])
def test_bad_splits_are_one_line_errors(text, needle):
    with pytest.raises(LoopusError) as info:
        LayerSplit.parse(text, 24)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)

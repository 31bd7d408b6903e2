"""NetSpec: validation messages, JSON round trip, the layer walk."""

import json

import pytest

from models.presets import PRESETS
from models.spec import Conv, ConvBlock, Head, NetSpec, SpecError, Transition


def test_presets_round_trip_through_json_and_hash_equal():
    for spec in PRESETS.values():
        again = NetSpec.from_json(spec.to_json())
        assert again == spec
        assert hash(again) == hash(spec)


@pytest.mark.parametrize("make, message", [
    (lambda: Conv(0), "out_channels=0, must be an integer from 1 to 512"),
    (lambda: Conv(-3), "out_channels=-3"),
    (lambda: Conv(8, kernel=5), "kernel=5, must be one of the integers (1, 3)"),
    (lambda: Conv(8, kernel=1, padding=1), "padding=1 with kernel=1"),
    (lambda: ConvBlock(()), "0 convs, must have 1 to 3"),
    (lambda: ConvBlock((Conv(8),) * 4), "4 convs, must have 1 to 3"),
    (lambda: ConvBlock((Conv(8),), dropout=1.5), "dropout=1.5, must be a number in [0, 1)"),
    (lambda: Transition(0), "transition: out_channels=0"),
    (lambda: Head("flatten_linear"), "kind='flatten_linear'"),
    (lambda: NetSpec(()), "no blocks"),
    (lambda: NetSpec((Transition(8),)), "the first block is a transition"),
])
def test_invalid_parts_are_refused_naming_value_and_limit(make, message):
    with pytest.raises(SpecError) as info:
        make()
    assert message in str(info.value)


def test_map_shrinking_below_1x1_names_the_layer_and_size():
    blocks = tuple(ConvBlock((Conv(4), Conv(4)), pool=True) for _ in range(3))  # 28->24->12->8->4->0
    with pytest.raises(SpecError) as info:
        NetSpec(blocks)
    assert "b3.conv2: a 3x3 conv with padding 0 on a 2x2 map gives 0x0" in str(info.value)
    with pytest.raises(SpecError) as info:
        NetSpec((ConvBlock((Conv(4),) * 3), ConvBlock((Conv(4),) * 3), Transition(4, pool=True),
                 Transition(4, pool=True)))  # 28 -> 22 -> 11 -> 5 -> 2 -> 1 -> 0
    assert "t4.pool: a 2x2 max-pool on a 1x1 map" in str(info.value)


@pytest.mark.parametrize("text, message", [
    ("{not json", "spec is not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"blocks": [], "colour": 3}', "unknown field(s) 'colour'"),
    ('{"blocks": [{"type": "dense", "units": 10}]}', "type='dense'"),
    ('{"blocks": [{"type": "conv_block", "convs": [{"out_channels": 8, "stride": 2}]}]}', "conv: unknown field(s) 'stride'"),
    ('{"blocks": [{"type": "transition"}]}', "transition:"),
    ('{"head": {"kind": "conv_gap"}}', "missing field(s) 'blocks'"),
    # Wrong types: refused with the value, not crashed in nn.Conv2d, nor read as something else.
    ('{"blocks": [{"type": "conv_block", "convs": [{"out_channels": 8, "kernel": 3.0}]}]}',
     "conv: kernel=3.0, must be one of the integers (1, 3)"),
    ('{"blocks": [{"type": "conv_block", "convs": [{"out_channels": 8, "padding": true}]}]}',
     "conv: padding=True, must be one of the integers (0, 1)"),
    ('{"blocks": [{"type": "conv_block", "convs": [{"out_channels": true}]}]}', "conv: out_channels=True"),
    ('{"blocks": [{"type": "conv_block", "convs": [{"out_channels": 8}], "batchnorm": "false"}]}',
     "conv block: batchnorm='false', must be true or false"),
    ('{"blocks": [{"type": "conv_block", "convs": [{"out_channels": 8}], "pool": 1}]}',
     "conv block: pool=1, must be true or false"),
    ('{"blocks": [{"type": "conv_block", "convs": [{"out_channels": 8}], "dropout": false}]}',
     "dropout=False, must be a number in [0, 1)"),
    ('{"blocks": [{"type": "conv_block", "convs": [{"out_channels": 8}]}, {"type": "transition", "out_channels": 4, '
     '"batchnorm": null}]}', "transition: batchnorm=None, must be true or false"),
    # A missing field names itself.
    ('{"blocks": [{"type": "conv_block", "convs": [{"kernel": 3}]}]}', "conv: missing field(s) 'out_channels'"),
    ('{"blocks": [{"type": "conv_block"}]}', "conv_block: missing field(s) 'convs'"),
    ('{"blocks": [{"type": "transition"}]}', "transition: missing field(s) 'out_channels'"),
])
def test_malformed_json_is_a_spec_error(text, message):
    with pytest.raises(SpecError) as info:
        NetSpec.from_json(text)
    assert message in str(info.value)


def test_json_is_plain_and_editable():
    data = json.loads(PRESETS["baseline"].to_json())
    assert data["blocks"][0]["type"] == "conv_block"
    assert data["blocks"][1] == {"type": "transition", "out_channels": 16, "batchnorm": True, "pool": False}
    data["blocks"][1]["out_channels"] = 12
    assert NetSpec.from_dict(data).blocks[1] == Transition(12)

"""docs/spec.md cannot drift from models/spec.py: each documented field exists with its type and default, each field
of the dataclasses is documented, and the example is the micro preset."""

import dataclasses
import json
import re
from pathlib import Path

from models import spec as specs
from models.presets import PRESETS

DOC = (Path(__file__).resolve().parent.parent / "docs" / "spec.md").read_text()
SECTIONS = {"The network": specs.NetSpec, "A conv block": specs.ConvBlock, "A conv:": specs.Conv,
            "A transition": specs.Transition, "The head": specs.Head}
JSON_TYPES = {int: "integer", float: "number", bool: "boolean", str: "string"}


def documented(heading: str) -> dict[str, tuple[str, str]]:
    part = DOC.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| (\w+) \| ([^|]+) \|", part, re.M)
    return {name: (kind, default.strip()) for name, kind, default in rows}


def test_every_field_is_documented_with_its_type_and_default():
    for heading, cls in SECTIONS.items():
        rows = documented(heading)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        assert set(rows) == set(fields), (heading, set(rows) ^ set(fields))
        for name, (kind, default) in rows.items():
            field = fields[name]
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                assert default == "required", (heading, name)
                continue
            value = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            if dataclasses.is_dataclass(value):
                value = dataclasses.asdict(value)
            assert json.loads(default.strip("`")) == value, (heading, name, default, value)
            if type(value) in JSON_TYPES:
                assert kind == JSON_TYPES[type(value)], (heading, name, kind)


def test_the_allowed_values_are_those_the_validator_allows():
    assert f"{specs.KERNELS[1]} ({specs.KERNELS[1]}x{specs.KERNELS[1]}) or {specs.KERNELS[0]}" in DOC
    assert f"1 to {specs.MAX_CHANNELS}" in DOC and f"1 to {specs.MAX_CONVS_PER_BLOCK} convs" in DOC
    assert all(f'`"{kind}"`' in DOC for kind in specs.HEAD_KINDS)


def test_the_example_is_the_micro_preset():
    example = DOC.split("```json", 1)[1].split("```", 1)[0]
    assert specs.NetSpec.from_json(example) == PRESETS["micro"]

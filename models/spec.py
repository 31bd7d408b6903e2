"""A network described as data: frozen dataclasses for conv blocks, transitions and the head.

No torch here: a spec is validated, hashed, counted and serialised without building anything.
`NetSpec.layers()` walks the spec layer by layer (conv, pool, head) with the feature-map size at each
step; the validator, the budget counter and the builder all read that one walk.
"""

from __future__ import annotations

import json
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Union

KERNELS = (1, 3)  # pixels; 3x3 convs extract features, 1x1 convs mix channels
PADDINGS = (0, 1)  # pixels on each side
MAX_CONVS_PER_BLOCK = 3
MAX_CHANNELS = 512  # far above anything a 20k budget affords; catches typos such as 1600 for 16
# Bounds on a spec's size, checked before anything that grows with it (far above any net under a 20k budget: the
# presets have 3 to 5 blocks).
MAX_BLOCKS = 64
MAX_INPUT_SIZE = 1024  # pixels, the image side
MAX_SPEC_BYTES = 1_000_000  # a spec file; 64 blocks of 3 convs, indented, take about 25 KB
MAX_JSON_DEPTH = 32  # nesting of JSON objects and lists; a spec nests 5 deep, a certificate 5
# The largest network `check` and `certify` build to check again on the real module: the spec's count is arithmetic
# and needs no module, and a spec of 64 blocks of 512 channels would allocate 1.8 GB of weights to be refused.
MAX_BUILT_PARAMS = 1_000_000
HEAD_KINDS = ("conv_gap", "gap_conv")  # 1x1 conv to classes then GAP, or GAP then 1x1 conv


class SpecError(ValueError):
    """A spec that cannot describe a working network; the message names the value and the limit."""


_JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')  # a string (skipped whole) or a bracket


def _too_deep(text: str, max_depth: int) -> bool:
    """Whether JSON text nests objects and lists more than `max_depth` deep; a linear scan, no recursion, so that
    the parser (which recurses) never sees a deeper document."""
    depth = 0
    for match in _JSON_TOKEN.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            if depth > max_depth:
                return True
        elif token in "]}":
            depth -= 1
    return False


def parse_json(data: bytes | str, where: str, max_bytes: int, error: type[Exception] = SpecError,
               max_depth: int = MAX_JSON_DEPTH, kind: str = "a spec") -> Any:
    """JSON from bytes or text, refused with `error` (naming `where`, the value and the limit) when it is over
    `max_bytes`, not UTF-8, nested more than `max_depth` deep, or not JSON."""
    size = len(data)
    if size > max_bytes:
        raise error(f"{where}: {size:,} {'bytes' if isinstance(data, bytes) else 'characters'}, over the "
                    f"{max_bytes:,} allowed for {kind}")
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise error(f"{where}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                        f"{exc.start:,})") from None
    if _too_deep(data, max_depth):
        raise error(f"{where}: JSON nested more than {max_depth} deep, the most allowed for {kind} (refused before "
                    "parsing)")
    try:
        return json.loads(data)
    except json.JSONDecodeError as exc:
        raise error(f"{where} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    except (ValueError, RecursionError) as exc:  # an integer of more than 4,300 digits
        raise error(f"{where} is not usable JSON: {str(exc).splitlines()[0][:200]}") from None


def read_json_file(path: str | Path, where: str, max_bytes: int, error: type[Exception] = SpecError,
                   kind: str = "a spec") -> Any:
    """A JSON file read with `parse_json`'s bounds; no more than `max_bytes` + 1 bytes are read."""
    path = Path(path)
    try:
        if not path.is_file():
            raise error(f"{where}: no such file")
        with path.open("rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise error(f"{where}: cannot be read ({exc.strerror or exc})") from None
    if len(data) > max_bytes:
        raise error(f"{where}: {path.stat().st_size:,} bytes, over the {max_bytes:,} allowed for {kind}")
    return parse_json(data, where, max_bytes, error, kind=kind)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise SpecError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is no count, 3.0 no kernel size


def _check_flag(value: Any, where: str, name: str) -> None:
    _require(isinstance(value, bool), f"{where}: {name}={value!r}, must be true or false")


def _check_channels(value: Any, where: str) -> None:
    _require(
        isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_CHANNELS,
        f"{where}: out_channels={value!r}, must be an integer from 1 to {MAX_CHANNELS}",
    )


@dataclass(frozen=True)
class Conv:
    out_channels: int  # feature maps produced
    kernel: int = 3  # pixels, 3 or 1
    padding: int = 0  # pixels on each side, 0 or 1 (1 only with a 3x3 kernel)

    def __post_init__(self) -> None:
        _check_channels(self.out_channels, "conv")
        _require(_is_int(self.kernel) and self.kernel in KERNELS,
                 f"conv: kernel={self.kernel!r}, must be one of the integers {KERNELS}")
        _require(_is_int(self.padding) and self.padding in PADDINGS,
                 f"conv: padding={self.padding!r}, must be one of the integers {PADDINGS}")
        _require(
            not (self.kernel == 1 and self.padding == 1),
            "conv: padding=1 with kernel=1 only adds a border of zeros; use padding=0 for 1x1 convs",
        )


@dataclass(frozen=True)
class ConvBlock:
    convs: tuple[Conv, ...]  # 1 to 3 convolutions, each followed by BatchNorm (if on) and ReLU
    batchnorm: bool = True  # BatchNorm after every conv of the block
    dropout: float = 0.0  # probability, applied once at the end of the block (before the pool)
    pool: bool = True  # 2x2 max-pool, stride 2, at the end of the block

    def __post_init__(self) -> None:
        _require(isinstance(self.convs, (tuple, list)), "conv block: convs must be a list of convs")
        _require(
            1 <= len(self.convs) <= MAX_CONVS_PER_BLOCK,
            f"conv block: {len(self.convs):,} convs, must have 1 to {MAX_CONVS_PER_BLOCK}",
        )
        convs = tuple(Conv(**c) if isinstance(c, dict) else c for c in self.convs)
        object.__setattr__(self, "convs", convs)
        _require(all(isinstance(c, Conv) for c in convs), "conv block: convs must be Conv entries")
        _require(
            isinstance(self.dropout, (int, float)) and not isinstance(self.dropout, bool) and 0.0 <= self.dropout < 1.0,
            f"conv block: dropout={self.dropout!r}, must be a number in [0, 1)",
        )
        object.__setattr__(self, "dropout", float(self.dropout))
        _check_flag(self.batchnorm, "conv block", "batchnorm")
        _check_flag(self.pool, "conv block", "pool")


@dataclass(frozen=True)
class Transition:
    out_channels: int  # channels after the 1x1 squeeze
    batchnorm: bool = True  # BatchNorm after the 1x1 conv
    pool: bool = False  # 2x2 max-pool after the squeeze

    def __post_init__(self) -> None:
        _check_channels(self.out_channels, "transition")
        _check_flag(self.batchnorm, "transition", "batchnorm")
        _check_flag(self.pool, "transition", "pool")


Block = Union[ConvBlock, Transition]
_BLOCK_TYPES = {"conv_block": ConvBlock, "transition": Transition}


@dataclass(frozen=True)
class Head:
    kind: str = "conv_gap"  # "conv_gap": 1x1 conv to classes, then global average pooling;
    #                         "gap_conv": global average pooling, then a 1x1 conv to classes

    def __post_init__(self) -> None:
        _require(self.kind in HEAD_KINDS, f"head: kind={self.kind!r}, must be one of {HEAD_KINDS}")


@dataclass(frozen=True)
class Layer:
    """One primitive step of the walk: what it is and the map before and after, in pixels."""

    name: str  # "b1.conv2", "t2", "b1.pool", "head.conv"
    op: str  # "conv", "pool", "gap"
    in_channels: int
    out_channels: int
    kernel: int  # pixels; 2 for the pool, the input size for GAP
    stride: int
    padding: int
    bias: bool  # conv without a following BatchNorm keeps its bias
    batchnorm: bool
    size_in: int  # feature-map side before the layer, pixels
    size_out: int  # feature-map side after it, pixels


@dataclass(frozen=True)
class NetSpec:
    blocks: tuple[Block, ...]  # conv blocks and transitions, in order
    head: Head = field(default_factory=Head)
    in_channels: int = 1  # grey images
    input_size: int = 28  # pixels, square input
    num_classes: int = 10

    def __post_init__(self) -> None:
        _require(isinstance(self.blocks, (tuple, list)), "network: blocks must be a list")
        _require(len(self.blocks) <= MAX_BLOCKS, _too_many_blocks(len(self.blocks)))
        blocks = tuple(_block_from_dict(b) if isinstance(b, dict) else b for b in self.blocks)
        object.__setattr__(self, "blocks", blocks)
        if isinstance(self.head, dict):
            object.__setattr__(self, "head", Head(**self.head))
        _require(len(blocks) >= 1, "network: no blocks; at least one conv block is needed")
        _require(
            all(isinstance(b, (ConvBlock, Transition)) for b in blocks),
            "network: blocks must be ConvBlock or Transition entries",
        )
        _require(
            isinstance(blocks[0], ConvBlock),
            "network: the first block is a transition; a 1x1 squeeze of the raw image sees no pattern, start with a conv block",
        )
        for name, value, top in (("in_channels", self.in_channels, MAX_CHANNELS),
                                 ("input_size", self.input_size, MAX_INPUT_SIZE),
                                 ("num_classes", self.num_classes, MAX_CHANNELS)):
            _require(_is_int(value) and 1 <= value <= top, f"network: {name}={value!r}, must be an integer from 1 "
                                                           f"to {top:,}")
        for layer in self.layers():  # the walk itself refuses maps that shrink below 1x1
            pass

    def layers(self) -> Iterator[Layer]:
        """Every primitive layer in forward order, with the feature-map size before and after."""
        size, channels = self.input_size, self.in_channels
        for i, block in enumerate(self.blocks, start=1):
            if isinstance(block, ConvBlock):
                for j, conv in enumerate(block.convs, start=1):
                    out = size - conv.kernel + 2 * conv.padding + 1
                    name = f"b{i}.conv{j}"
                    _require(
                        out >= 1,
                        f"{name}: a {conv.kernel}x{conv.kernel} conv with padding {conv.padding} on a "
                        f"{size}x{size} map gives {out}x{out}; the map must stay at least 1x1",
                    )
                    yield Layer(name, "conv", channels, conv.out_channels, conv.kernel, 1, conv.padding,
                                not block.batchnorm, block.batchnorm, size, out)
                    size, channels = out, conv.out_channels
            else:
                name = f"t{i}"
                yield Layer(name, "conv", channels, block.out_channels, 1, 1, 0,
                            not block.batchnorm, block.batchnorm, size, size)
                channels = block.out_channels
            if block.pool:
                name = f"{'b' if isinstance(block, ConvBlock) else 't'}{i}.pool"
                _require(
                    size >= 2,
                    f"{name}: a 2x2 max-pool on a {size}x{size} map gives 0x0; the map must stay at least 1x1",
                )
                yield Layer(name, "pool", channels, channels, 2, 2, 0, False, False, size, size // 2)
                size //= 2
        conv_first = self.head.kind == "conv_gap"
        head_conv = Layer("head.conv", "conv", channels, self.num_classes, 1, 1, 0, True, False,
                          size if conv_first else 1, size if conv_first else 1)
        gap = Layer("head.gap", "gap", head_conv.out_channels if conv_first else channels,
                    head_conv.out_channels if conv_first else channels, size, 1, 0, False, False, size, 1)
        yield from ((head_conv, gap) if conv_first else (gap, head_conv))

    # ---- JSON -------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["blocks"] = [
            {"type": "conv_block" if isinstance(b, ConvBlock) else "transition", **asdict(b)} for b in self.blocks
        ]
        return out

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Any) -> "NetSpec":
        _require(isinstance(data, dict), f"spec: expected a JSON object, got {type(data).__name__}")
        _reject_unknown(data, cls, "spec")
        _require("blocks" in data, "spec: missing field 'blocks'")
        _require(isinstance(data["blocks"], list), "spec: 'blocks' must be a list")
        _require(len(data["blocks"]) <= MAX_BLOCKS, _too_many_blocks(len(data["blocks"])))
        kwargs = dict(data)
        kwargs["blocks"] = tuple(_block_from_dict(b) for b in data["blocks"])
        if "head" in data:
            _require(isinstance(data["head"], dict), "spec: 'head' must be an object")
            _reject_unknown(data["head"], Head, "head")
            kwargs["head"] = Head(**data["head"])
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "spec") -> "NetSpec":
        return cls.from_dict(parse_json(text, where, MAX_SPEC_BYTES))

    @classmethod
    def from_file(cls, path: str | Path) -> "NetSpec":
        """A spec file, refused (SpecError naming the file) when over MAX_SPEC_BYTES, not UTF-8, too deep or not a
        spec."""
        data = read_json_file(path, f"{path}: spec", MAX_SPEC_BYTES)
        try:
            return cls.from_dict(data)
        except SpecError as exc:
            raise SpecError(f"{path}: {exc}") from None


def _too_many_blocks(n: int) -> str:
    return f"network: {n:,} blocks, more than the {MAX_BLOCKS} allowed (refused before reading them)"


def _reject_unknown(data: dict, cls: type, where: str, extra: tuple[str, ...] = ()) -> None:
    """Unknown fields and missing required ones (those without a default), each named."""
    known = {f.name for f in fields(cls)} | set(extra)
    unknown = sorted(set(data) - known)
    _require(not unknown, f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(known))}")
    required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
    missing = [name for name in required if name not in data]
    _require(not missing, f"{where}: missing field(s) {', '.join(map(repr, missing))}")


def _block_from_dict(data: Any) -> Block:
    if isinstance(data, (ConvBlock, Transition)):
        return data
    _require(isinstance(data, dict), f"block: expected an object, got {type(data).__name__}")
    kind = data.get("type")
    _require(isinstance(kind, str) and kind in _BLOCK_TYPES,
             f"block: type={kind!r}, must be one of {tuple(_BLOCK_TYPES)}")
    cls = _BLOCK_TYPES[kind]
    _reject_unknown(data, cls, kind, extra=("type",))
    kwargs = {k: v for k, v in data.items() if k != "type"}
    if cls is ConvBlock:
        _require(isinstance(kwargs.get("convs"), list), "conv_block: 'convs' must be a list of convs")
        _require(1 <= len(kwargs["convs"]) <= MAX_CONVS_PER_BLOCK,
                 f"conv block: {len(kwargs['convs']):,} convs, must have 1 to {MAX_CONVS_PER_BLOCK}")
        for c in kwargs["convs"]:
            _require(isinstance(c, dict), "conv: each conv must be an object")
            _reject_unknown(c, Conv, "conv")
    try:
        if cls is ConvBlock:
            kwargs["convs"] = tuple(Conv(**c) for c in kwargs["convs"])
        return cls(**kwargs)
    except TypeError as exc:  # a missing required field
        raise SpecError(f"{kind}: {exc}") from None

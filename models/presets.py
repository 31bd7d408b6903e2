"""Named specs: the hand-made baseline of the 20k exercise and smaller layouts in the same style."""

from __future__ import annotations

from models.spec import Conv, ConvBlock, Head, NetSpec, Transition


def _block(*channels: int, dropout: float = 0.05, padding: int = 0, pool: bool = True) -> ConvBlock:
    """A conv block of 3x3 convs with BatchNorm, dropout at its end, then the 2x2 max-pool."""
    return ConvBlock(tuple(Conv(c, 3, padding) for c in channels), batchnorm=True, dropout=dropout, pool=pool)


def _two_block(c1: int, c2: int, squeeze: int) -> NetSpec:
    """Two conv blocks of two 3x3 convs, a 1x1 transition between them, 1x1 conv + GAP head.

    28 -> 26 -> 24 -> pool 12 -> squeeze -> 10 -> 8 -> pool 4 -> 1x1 conv to 10 classes -> GAP.
    """
    return NetSpec((_block(c1, c2), Transition(squeeze), _block(c2, c2)), Head("conv_gap"))


def _compact(c1: int, c2: int, squeeze: int) -> NetSpec:
    """The classic under-8k answer: one pooled block, a 1x1 squeeze, three unpadded convs, no second pool.

    28 -> 26 -> 24 -> pool 12 -> squeeze -> 10 -> 8 -> 6 -> 1x1 conv to 10 classes -> GAP; receptive field 18 px.
    """
    return NetSpec((_block(c1, c2), Transition(squeeze), _block(c2, c2, c2, pool=False)), Head("conv_gap"))


def _three_block(c1: int, c2: int, squeeze: int) -> NetSpec:
    """Three blocks, the last two padded: 28 -> 24 -> pool 12 -> squeeze -> 12 -> 12 -> pool 6 -> 6 -> 6 -> head.

    Receptive field 32 px, the whole digit, for half the baseline's parameters.
    """
    return NetSpec((_block(c1, c2), Transition(squeeze), _block(c2, c2, padding=1),
                    _block(c2, c2, padding=1, pool=False)), Head("conv_gap"))


def _micro() -> NetSpec:
    """The published sub-5k style: three padded blocks of three 3x3 convs of 4 to 8 channels, two max-pools, no
    transition; 28 -> pool 14 -> pool 7 -> 1x1 conv to 10 classes -> GAP. Receptive field 46 px."""
    return NetSpec((_block(4, 8, 8, padding=1), _block(8, 8, 8, padding=1),
                    _block(8, 8, 8, padding=1, pool=False)), Head("conv_gap"))


PRESETS: dict[str, NetSpec] = {
    # The hand-made answer's layout, sized just under the budget: 19,674 parameters.
    "baseline": _two_block(16, 32, 16),
    # The same layout, narrower: 7,860 parameters.
    "small": _two_block(10, 20, 10),
    # Narrower still: 5,106 parameters.
    "tiny": _two_block(8, 16, 8),
    # The classic under-8k layout: 7,442 parameters (its measured accuracy is in the README).
    "compact": _compact(8, 16, 8),
    # The whole digit in view (receptive field 32 px) for half the baseline's parameters: 9,778.
    "threeblock": _three_block(8, 16, 8),
    # The small end: 4,582 parameters (docs/search.md has its accuracy).
    "micro": _micro(),
}


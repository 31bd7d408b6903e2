"""Channel widths of a spec: read them, rewrite them (`map_widths`, the one rewriter), and fit them under a parameter
target (`fit_widths`, the one fitting algorithm), used by the search space, repair and the front descent.

A spec's widths are the output channels of its convs and transitions, in order; the head's 1x1 conv ends in the
classes and is not a width.
"""

from __future__ import annotations

from typing import Callable, Sequence

from models.budget import count_params
from models.spec import Conv, ConvBlock, NetSpec, Transition

GRID_STEP = 2  # the space's widths: even, as a pareto search draws them
NARROWEST = 2  # channels: the narrowest width the space fits to (smallest_params counts nets of this width)
_BISECTIONS = 30  # halvings of the scale factor's interval: far finer than one width step
_MAX_FACTOR = 64  # the widest scale tried: a 1-conv net of width 2 grows to 128 channels, past any budget here


def widths(spec: NetSpec) -> list[int]:
    """The spec's widths in order: every conv of every block, and every transition."""
    return [c.out_channels for b in spec.blocks for c in (b.convs if isinstance(b, ConvBlock) else (b,))]


def map_widths(spec: NetSpec, width: Callable[[int], int]) -> NetSpec:
    """The spec with each width `c` replaced by `width(c)`, called in the order of `widths(spec)`; all else kept."""
    blocks = tuple(ConvBlock(tuple(Conv(width(c.out_channels), c.kernel, c.padding) for c in b.convs), b.batchnorm,
                             b.dropout, b.pool) if isinstance(b, ConvBlock)
                   else Transition(width(b.out_channels), b.batchnorm, b.pool) for b in spec.blocks)
    return NetSpec(blocks, spec.head, spec.in_channels, spec.input_size, spec.num_classes)


def with_widths(spec: NetSpec, new: Sequence[int]) -> NetSpec:
    """The spec with the widths `new`, one per entry of `widths(spec)`."""
    if len(new) != len(widths(spec)):
        raise ValueError(f"{len(new)} widths given for a spec of {len(widths(spec))}")
    it = iter(new)
    return map_widths(spec, lambda _: next(it))


def fit_widths(spec: NetSpec, target: int, step: int = GRID_STEP, narrowest: int = NARROWEST,
               shrink_only: bool = False, figure: Callable[[NetSpec], int] = count_params,
               fits: Callable[[NetSpec], bool] | None = None) -> NetSpec:
    """The largest widths on the grid (multiples of `step`, at least `narrowest`) whose network has at most `target`
    parameters: every width scaled by one factor, found by bisection (parameters grow with it), then single layers
    widened by a step, first to last and again, while the count stays within `target` (one uniform step of 2 on
    widths of 4 to 8 moves the count by up to a third, which this gives back). A spec of exactly `target`
    parameters comes back as it is (even one outside `fits`: the caller's gates refuse it); when even the
    narrowest network is over, the narrowest. `shrink_only`: no width ends above the spec's own (a spec within
    `target` comes back as it is).
    `figure`: what `target` bounds instead of parameters (MACs, int8 bytes: search/budgets.py; each grows with the
    widths); `fits`: a further condition every fitted spec must meet (the search's other bounds, all at once)."""
    def within(candidate: NetSpec) -> bool:
        return figure(candidate) <= target and (fits is None or fits(candidate))

    if figure(spec) == target or (shrink_only and within(spec)):  # an enqueued spec, or one that fits already
        return spec

    def scaled(factor: float) -> NetSpec:
        return map_widths(spec, lambda c: max(narrowest, step * round(c * factor / step)))

    low, high = 0.0, 1.0
    while within(scaled(high)) and high < _MAX_FACTOR:
        low, high = high, high * 2
    for _ in range(_BISECTIONS):
        mid = (low + high) / 2
        low, high = (mid, high) if within(scaled(mid)) else (low, mid)
    return _filled(scaled(low), within, step, widths(spec) if shrink_only else None)


def _filled(spec: NetSpec, within: Callable[[NetSpec], bool], step: int, widest: list[int] | None) -> NetSpec:
    """Widen single layers by `step`, first to last and again, while the spec stays `within` its target (and each
    width within `widest`, where given)."""
    current = widths(spec)
    grew = True
    while grew:
        grew = False
        for i in range(len(current)):
            if widest is not None and current[i] + step > widest[i]:
                continue
            wider = current[:i] + [current[i] + step] + current[i + 1:]
            if within(with_widths(spec, wider)):
                current, grew = wider, True
    return with_widths(spec, current)

"""The budget checker: analytic counts against torch, receptive fields by hand, and the refusals."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from models.budget import analyze, check, check_module, count_params
from models.build import build
from models.presets import PRESETS
from models.spec import Conv, ConvBlock, Head, NetSpec, SpecError, Transition

conv_st = st.builds(Conv, out_channels=st.integers(1, 40), kernel=st.just(3), padding=st.sampled_from([0, 1])) | \
    st.builds(Conv, out_channels=st.integers(1, 40), kernel=st.just(1), padding=st.just(0))
block_st = st.builds(ConvBlock, convs=st.lists(conv_st, min_size=1, max_size=3).map(tuple),
                     batchnorm=st.booleans(), dropout=st.sampled_from([0.0, 0.1]), pool=st.booleans()) | \
    st.builds(Transition, out_channels=st.integers(1, 40), batchnorm=st.booleans(), pool=st.booleans())


@st.composite
def specs(draw):
    first = draw(block_st.filter(lambda b: isinstance(b, ConvBlock)))
    rest = draw(st.lists(block_st, max_size=4))
    head = draw(st.sampled_from([Head("conv_gap"), Head("gap_conv")]))
    try:
        return NetSpec((first, *rest), head)
    except SpecError:  # a layout that shrinks the map below 1x1
        return NetSpec((first,), head)


def torch_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs())
def test_analytic_count_equals_torch_for_random_specs(spec):
    module = build(spec)
    assert count_params(spec) == torch_count(module)
    out = module(torch.zeros(2, 1, 28, 28))
    assert out.shape == (2, 10)
    # the analytic output shapes match the real ones
    assert analyze(spec).layers[-1].out_shape == (10, 1, 1)


def test_preset_counts_are_exact():
    assert {name: count_params(s) for name, s in PRESETS.items()} == {
        "baseline": 19_674, "small": 7_860, "tiny": 5_106, "compact": 7_442, "threeblock": 9_778,
        "micro": 4_582}
    assert 19_000 <= count_params(PRESETS["baseline"]) < 20_000


def test_preset_receptive_fields_by_hand():
    # r += (k - 1) * jump for each layer; a 2x2 pool doubles the jump.
    # 3x3 (j=1): 1+2=3; 3x3: 5; pool: 5+1=6, j=2; 1x1: 6; 3x3: 6+2*2=10; 3x3: 14; pool: 14+1*2=16, j=4; 1x1: 16
    for name in ("baseline", "small", "tiny"):
        assert analyze(PRESETS[name]).receptive_field == 16
    # compact: ... 1x1: 6; 3x3 x3 (j=2): 10, 14, 18
    assert analyze(PRESETS["compact"]).receptive_field == 18
    # threeblock: ... 1x1: 6; padded 3x3 x2 (j=2): 10, 14; pool: 16, j=4; 3x3 x2: 24, 32
    assert analyze(PRESETS["threeblock"]).receptive_field == 32
    rows = {r.name: r for r in analyze(PRESETS["baseline"]).layers}
    assert (rows["b1.conv2"].receptive_field, rows["b1.pool"].jump, rows["b3.conv2"].receptive_field) == (5, 2, 14)
    padded = NetSpec((ConvBlock((Conv(8, 3, 1),) * 3, pool=True), ConvBlock((Conv(8, 3, 1),) * 3, pool=True)))
    assert analyze(padded).receptive_field == 1 + 2 + 2 + 2 + 1 + 4 + 4 + 4 + 2  # 22


def test_macs_of_a_single_conv():
    spec = NetSpec((ConvBlock((Conv(8),), pool=False),))
    rows = {r.name: r for r in analyze(spec).layers}
    assert rows["b1.conv1"].macs == 26 * 26 * 9 * 8
    assert rows["head.conv"].macs == 26 * 26 * 8 * 10


def test_exactly_20000_parameters_is_refused():
    spec = NetSpec((ConvBlock((Conv(14), Conv(38))), Transition(38), ConvBlock((Conv(38),))))
    assert count_params(spec) == torch_count(build(spec)) == 20_000
    verdict = check(spec)
    assert not verdict.ok
    assert verdict.reasons == ("20,000 parameters, at or over the 20,000 budget (the rule is fewer than 20,000)",)
    assert not check_module(build(spec)).ok
    assert check(spec, max_params=20_001).ok


def test_presets_pass_as_specs_and_as_modules():
    for spec in PRESETS.values():
        assert check(spec).ok
        assert check_module(build(spec)).ok, check_module(build(spec)).reasons


class WithLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, stride=3)
        self.classifier = nn.Linear(4 * 9 * 9, 10)

    def forward(self, x):
        return self.classifier(self.conv(x).flatten(1))


class FunctionalLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, stride=3)
        self.w = nn.Parameter(torch.zeros(10, 4 * 9 * 9))

    def forward(self, x):
        return F.linear(self.conv(x).flatten(1), self.w)


class MatmulOperator(FunctionalLinear):
    def forward(self, x):
        return self.conv(x).flatten(1) @ self.w.t()


class MatmulWithControlFlow(FunctionalLinear):
    """torch.fx cannot trace this (a branch on data); the check must still see the matmul."""

    def forward(self, x):
        h = self.conv(x).flatten(1)
        if h.sum() > 0:
            h = h * 2
        return torch.einsum("bi,oi->bo", h, self.w)


class LazyLinearNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, stride=3)
        self.head = nn.Sequential(nn.Flatten(), nn.LazyLinear(10))

    def forward(self, x):
        return self.head(self.conv(x))


def test_linear_layer_is_refused_naming_it():
    verdict = check_module(WithLinear())
    assert not verdict.ok
    assert "layer 'classifier' is a Linear, a fully connected layer" in verdict.reasons
    assert verdict.n_params == 4 * 9 + 4 + 324 * 10 + 10


def test_lazy_linear_subclass_is_refused():
    verdict = check_module(LazyLinearNet())
    assert "layer 'head.1' is a Linear, a fully connected layer" in verdict.reasons  # LazyLinear becomes Linear once sized


def test_functional_linear_is_refused_naming_the_operation():
    verdict = check_module(FunctionalLinear())
    assert not verdict.ok
    assert any(r.startswith("'linear' in forward") for r in verdict.reasons), verdict.reasons


def test_matmul_operator_is_refused_naming_the_operation():
    verdict = check_module(MatmulOperator())
    assert not verdict.ok
    assert any(r.startswith("'matmul' in forward") for r in verdict.reasons), verdict.reasons


def test_untraceable_forward_is_still_inspected():
    verdict = check_module(MatmulWithControlFlow())
    assert not verdict.ok
    assert any("in forward (seen running it)" in r for r in verdict.reasons), verdict.reasons


def test_forward_that_cannot_run_is_refused_not_passed():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)  # expects three channels

        def forward(self, x):
            if x.sum() > 0:
                return self.conv(x)
            return self.conv(x)

    verdict = check_module(Broken())
    assert not verdict.ok
    assert any("could not be traced" in r or "failed" in r for r in verdict.reasons)


# ---- fully connected layers without nn.Linear ---------------------------------------------------------------------

class WholeImageConv(nn.Module):
    """One 28x28 kernel over the 28x28 image: every output sees every pixel, a Linear layer by another name."""

    def __init__(self, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(1, 10, 28, padding=padding)

    def forward(self, x):
        return self.conv(x).mean((2, 3))


class WholeMapConvDeepInside(nn.Module):
    """Legit 3x3 convs down to a 7x7 map, then a 7x7 kernel over it."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4))
        self.span = nn.Conv2d(8, 10, 7)

    def forward(self, x):
        return self.span(self.features(x)).flatten(1)


class PositionsIntoChannels(nn.Module):
    """The map's positions reshaped into channels, a ReLU, then a 1x1 conv: a fully connected layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, stride=3)
        self.mix = nn.Conv2d(4 * 9 * 9, 10, 1)

    def forward(self, x):
        h = self.conv(x)
        h = torch.relu(h.reshape(h.shape[0], -1, 1, 1))
        return self.mix(h).flatten(1)


@pytest.mark.parametrize("net, words", [
    (WholeImageConv(), "28x28 kernel over its whole 28x28 input map"),
    (WholeImageConv(padding=1), "28x28 kernel over its whole 28x28 input map"),
    (WholeMapConvDeepInside(), "7x7 kernel over its whole 7x7 input map"),
    (PositionsIntoChannels(), "positions were reshaped into channels"),
])
def test_fully_connected_layers_in_conv_clothing_are_refused(net, words):
    verdict = check_module(net)
    assert not verdict.ok and verdict.n_params < 20_000
    assert any(words in r and "fully connected" in r for r in verdict.reasons), verdict.reasons


def test_a_spec_conv_over_its_whole_map_is_refused_and_the_gap_conv_head_is_not():
    # 28 -> 26 -> pool 13 -> 11 -> pool 5 -> 3 -> 1: the last 3x3 conv spans its whole 3x3 map.
    block = lambda *c: ConvBlock(tuple(Conv(x, 3, 0) for x in c), True, 0.0, True)  # noqa: E731
    spec = NetSpec((block(8), block(8), ConvBlock((Conv(8), Conv(8)), True, 0.0, False)), Head("conv_gap"))
    verdict = check(spec)
    assert not verdict.ok
    assert verdict.reasons == ("b3.conv2: a 3x3 kernel over its whole 3x3 input map, a fully connected layer",)
    module_verdict = check_module(build(spec))
    assert not module_verdict.ok and "3x3 kernel over its whole 3x3 input map" in module_verdict.reasons[0]
    # GAP then a 1x1 conv on the 1x1 map: one position has nothing to connect (and it equals 1x1 conv then GAP).
    gap_first = NetSpec(PRESETS["micro"].blocks, Head("gap_conv"))
    assert check(gap_first).ok and check_module(build(gap_first)).ok

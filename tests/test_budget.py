"""The budget checker: analytic counts against torch, receptive fields by hand, and the refusals.

The module verdict denies by default (models/verdict.py, docs/verdict.md): each refusal below is asserted word for
word, with the module and the source line it names."""

import inspect
import os
import sys
import warnings

import optuna
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from models.budget import analyze, check, check_module, count_params, whole_map_convs
from models.build import build
from models.presets import PRESETS
from models.spec import Conv, ConvBlock, Head, NetSpec, SpecError, Transition
from search.space import suggest

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


# ---- any nn.Module: the verdict denies by default ----------------------------------------------------------------

def at(obj, snippet: str) -> str:
    """'test_budget.py:<line>' for the one line of `obj`'s source that holds `snippet`: where a refusal points."""
    lines, start = inspect.getsourcelines(obj)
    hits = [start + i for i, line in enumerate(lines) if snippet in line]
    assert len(hits) == 1, (snippet, hits)
    return f"test_budget.py:{hits[0]}"


MATMUL = ("a matrix product on activations: each output sums every input feature with its own weight, a fully "
          "connected layer")
UNFOLD = ("not a known local operation: unfold copies each window's pixels into channels, so a 1x1 conv after it sees "
          "the whole window with a weight per pixel, a fully connected layer")
INDEXING = ("not a known local operation: indexing, slicing or striding activations can move any position anywhere, "
            "so weights after it can be weights per pixel, a fully connected layer")
MIXING = ("not a known local operation: it mixes positions or channels in ways the checker has not judged (a sort, a "
          "cumulative sum, a transform, attention, a norm over the map), so a fully connected layer cannot be ruled "
          "out")
MOVING = ("not a known local operation: it moves pixels into new positions or channels, so a kernel after it could "
          "span every pixel while looking smaller than its map, a fully connected layer in disguise")
PYTHON = ("reads activations back into Python: what is computed from the number escapes the checker, so a fully "
          "connected layer cannot be ruled out")
OUTPUT = ("the output is not computed from the input by operations the checker followed (it was made outside them, "
          "e.g. with .tolist() or .numpy()), so what computed it cannot be judged and a fully connected layer cannot "
          "be ruled out")


def into_channels(src: str, dst: str, side: int) -> str:
    return (f"reshapes activations of shape {src} to {dst}: the positions of the {side}x{side} map become channels, so "
            "every weight after it is a weight per position, a fully connected layer")


def whole_map(kernel: str, side: int, dilated: str = "", padded: str = "") -> str:
    return (f"a {kernel} kernel{dilated} over its whole {side}x{side} input map{padded}: every output sees every input "
            "position with its own weight, a fully connected layer")


def per_position(act: str, weight: str) -> str:
    return (f"combines activations of shape {act} with a tensor of shape {weight} that is not computed from the input "
            "and varies over positions: a weight per position, which is what a fully connected layer has (a scalar, a "
            "per-channel factor of shape (C, 1, 1) or a random dropout mask is allowed)")


def over_budget(n: int, extra: int, labels: str) -> str:
    return (f"{n:,} parameters, at or over the 20,000 budget (the rule is fewer than 20,000); {extra:,} of them in "
            "tensors the forward uses as weights that are not registered parameters (buffers, plain lists, closures): "
            f"{labels}")


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
    """A branch on data: the reading of a value back into Python is refused, and the matmul still seen."""

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
    line = at(WithLinear, "self.classifier(")
    assert verdict.reasons == (
        "layer 'classifier' is a Linear, a fully connected layer",
        f"aten.view in WithLinear, at {line}: " + into_channels("(2, 4, 9, 9)", "(2, 324)", 9),
        f"aten.addmm in 'classifier' (Linear), at {line}: {MATMUL}")
    assert verdict.n_params == 4 * 9 + 4 + 324 * 10 + 10


def test_lazy_linear_subclass_is_refused():
    verdict = check_module(LazyLinearNet())
    assert "layer 'head.1' is a Linear, a fully connected layer" in verdict.reasons  # LazyLinear becomes Linear once sized
    assert f"aten.addmm in 'head.1' (Linear), at {at(LazyLinearNet, 'return self.head')}: {MATMUL}" in verdict.reasons


def test_functional_linear_and_matmul_are_refused_naming_the_operation():
    line = at(FunctionalLinear, "F.linear")
    assert check_module(FunctionalLinear()).reasons == (
        f"aten.view in FunctionalLinear, at {line}: " + into_channels("(2, 4, 9, 9)", "(2, 324)", 9),
        f"aten.mm (matmul) in FunctionalLinear, at {line}: {MATMUL}")
    line = at(MatmulOperator, "@ self.w.t()")
    assert check_module(MatmulOperator()).reasons == (
        f"aten.view in MatmulOperator, at {line}: " + into_channels("(2, 4, 9, 9)", "(2, 324)", 9),
        f"aten.mm (matmul) in MatmulOperator, at {line}: {MATMUL}")


def test_a_branch_on_data_is_refused_and_the_matmul_still_seen():
    verdict = check_module(MatmulWithControlFlow())
    assert verdict.reasons == (
        f"aten.view in MatmulWithControlFlow, at {at(MatmulWithControlFlow, 'flatten(1)')}: "
        + into_channels("(2, 4, 9, 9)", "(2, 324)", 9),
        "aten._local_scalar_dense (.item() or a branch on a tensor) in MatmulWithControlFlow, at "
        f"{at(MatmulWithControlFlow, 'if h.sum()')}: {PYTHON}",
        f"aten.bmm in MatmulWithControlFlow, at {at(MatmulWithControlFlow, 'einsum')}: {MATMUL}")


def test_forward_that_cannot_run_is_refused_naming_its_exception():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)  # expects three channels

        def forward(self, x):
            return self.conv(x)

    verdict = check_module(Broken())
    assert verdict.reasons == (
        "forward raised RuntimeError in train mode on noise of shape (2, 1, 28, 28): Given groups=1, weight of size "
        "[4, 3, 3, 3], expected input[2, 1, 28, 28] to have 3 channels, but got 1 channels instead; a forward that "
        "does not run to its end cannot be judged",)


@pytest.mark.parametrize("leave, said", [(lambda: sys.exit(3), "sys.exit(3)"), (lambda: os._exit(0), "os._exit(0)")],
                         ids=["sys.exit", "os._exit"])
def test_forward_that_exits_is_refused_and_the_process_goes_on(leave, said):
    class Quits(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 10, 3)

        def forward(self, x):
            leave()
            return self.conv(x).mean((2, 3))

    verdict = check_module(Quits())
    assert verdict.reasons == (f"forward called {said} in train mode on noise of shape (2, 1, 28, 28); a forward that "
                               "does not run to its end cannot be judged",)


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


def test_fully_connected_layers_in_conv_clothing_are_refused():
    for padding in (0, 1):
        verdict = check_module(WholeImageConv(padding))
        assert verdict.reasons == (f"aten.convolution in 'conv' (Conv2d), at {at(WholeImageConv, 'self.conv(x)')}: "
                                   + whole_map("28x28", 28),)
        assert verdict.n_params == 28 * 28 * 10 + 10
    assert check_module(WholeMapConvDeepInside()).reasons == (
        f"aten.convolution in 'span' (Conv2d), at {at(WholeMapConvDeepInside, 'self.span(')}: " + whole_map("7x7", 7),)
    assert check_module(PositionsIntoChannels()).reasons == (
        f"aten.view in PositionsIntoChannels, at {at(PositionsIntoChannels, 'h.reshape')}: "
        + into_channels("(2, 4, 9, 9)", "(2, 324, 1, 1)", 9),)


def test_a_spec_conv_over_its_whole_map_is_refused_and_the_gap_conv_head_is_not():
    # 28 -> 26 -> pool 13 -> 11 -> pool 5 -> 3 -> 1: the last 3x3 conv spans its whole 3x3 map.
    block = lambda *c: ConvBlock(tuple(Conv(x, 3, 0) for x in c), True, 0.0, True)  # noqa: E731
    spec = NetSpec((block(8), block(8), ConvBlock((Conv(8), Conv(8)), True, 0.0, False)), Head("conv_gap"))
    verdict = check(spec)
    assert not verdict.ok
    assert verdict.reasons == ("b3.conv2: a 3x3 kernel over its whole 3x3 input map, a fully connected layer",)
    module_verdict = check_module(build(spec))
    assert module_verdict.reasons == ("aten.convolution in '5.0' (Conv2d): " + whole_map("3x3", 3),)
    # GAP then a 1x1 conv on the 1x1 map: one position has nothing to connect (and it equals 1x1 conv then GAP).
    gap_first = NetSpec(PRESETS["micro"].blocks, Head("gap_conv"))
    assert check(gap_first).ok and check_module(build(gap_first)).ok


# ---- the bypasses (#26): each passed the list-of-forbidden-forms checker ----------------------------------

class UnfoldThen1x1(nn.Module):
    """nn.Unfold(28), then the 784 pixels as channels of a 1x1 map, then a 1x1 conv: a linear classifier."""

    def __init__(self):
        super().__init__()
        self.unfold = nn.Unfold(28)
        self.mix = nn.Conv2d(784, 10, 1)

    def forward(self, x):
        h = self.unfold(x)
        return self.mix(h.view(x.shape[0], 784, 1, 1)).flatten(1)


class BroadcastProductSum(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(10, 784))

    def forward(self, x):
        x = x.flatten(1)
        return (x[:, None, :] * self.w).sum(-1)


class DirectAtenMM(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(784, 10))

    def forward(self, x):
        return torch.ops.aten.mm.default(x.flatten(1), self.w)


class ConvsInAPlainList(nn.Module):
    """2.36 M weights in convs that a plain list hides from module.parameters(); only the head (5,130) is seen."""

    def __init__(self):
        super().__init__()
        self.convs = [nn.Conv2d(1, 512, 3, stride=4), nn.Conv2d(512, 512, 3)]
        self.head = nn.Conv2d(512, 10, 1)

    def forward(self, x):
        for conv in self.convs:
            x = torch.relu(conv(x))
        return self.head(x).mean((2, 3))


class WeightsAsBuffers(nn.Module):
    """148,608 conv weights held as buffers; only the head's 1,290 parameters are parameters."""

    def __init__(self):
        super().__init__()
        self.register_buffer("w0", torch.randn(128, 1, 3, 3) * 0.1)
        self.register_buffer("w1", torch.randn(128, 128, 3, 3) * 0.01)
        self.head = nn.Conv2d(128, 10, 1)

    def forward(self, x):
        x = torch.relu(F.conv2d(x, self.w0, stride=2))
        x = torch.relu(F.conv2d(x, self.w1))
        return self.head(x).mean((2, 3))


def test_unfold_then_a_1x1_conv_is_refused():
    verdict = check_module(UnfoldThen1x1())
    assert verdict.reasons == (f"aten.im2col (unfold) in 'unfold' (Unfold), at {at(UnfoldThen1x1, 'self.unfold(x)')}: "
                               f"{UNFOLD}",)


def test_a_broadcast_product_and_sum_is_refused():
    assert check_module(BroadcastProductSum()).reasons == (
        f"aten.view in BroadcastProductSum, at {at(BroadcastProductSum, 'x.flatten(1)')}: "
        + into_channels("(2, 1, 28, 28)", "(2, 784)", 28),)


def test_aten_mm_called_directly_is_refused():
    line = at(DirectAtenMM, "torch.ops.aten.mm")
    assert check_module(DirectAtenMM()).reasons == (
        f"aten.view in DirectAtenMM, at {line}: " + into_channels("(2, 1, 28, 28)", "(2, 784)", 28),
        f"aten.mm (matmul) in DirectAtenMM, at {line}: {MATMUL}")


def test_convs_in_a_plain_list_are_counted():
    verdict = check_module(ConvsInAPlainList())
    hidden = 512 * 9 + 512 + 512 * 512 * 9 + 512
    assert verdict.n_params == 5_130 + hidden == 2_370_058
    labels = "a (512, 512, 3, 3) float32 tensor: 2,359,296, a (512, 1, 3, 3) float32 tensor: 4,608, a (512,) float32 " \
             "tensor: 512, 1 more"
    assert verdict.reasons == (over_budget(2_370_058, hidden, labels),)


def test_weights_held_as_buffers_are_counted_and_batchnorm_statistics_are_not():
    verdict = check_module(WeightsAsBuffers())
    assert verdict.n_params == 1_290 + 148_608
    assert verdict.reasons == (over_budget(149_898, 148_608, "buffer 'w1': 147,456, buffer 'w0': 1,152"),)
    bn = build(PRESETS["baseline"])  # 16 BatchNorm layers' running means and variances: buffers, not weights
    assert sum(b.numel() for b in bn.buffers()) > 0 and check_module(bn).n_params == 19_674


# ---- further forms, each refused with its reason -------------------------------------------------------------------

class Einsum(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(10, 1, 28, 28))

    def forward(self, x):
        return torch.einsum("bchw,ochw->bo", x, self.w)


class Bilinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3)
        self.w = nn.Parameter(torch.zeros(10, 8, 8))

    def forward(self, x):
        v = self.conv(x).mean((2, 3))
        return F.bilinear(v, v, self.w)


class PadThenWholeKernel(nn.Module):
    """A 29x29 kernel looks smaller than the 128x128 map F.pad makes; it spans all 28x28 pixels."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 10, 29)

    def forward(self, x):
        return self.conv(F.pad(x, (50, 50, 50, 50))).mean((2, 3))


class PaddingGrowsMap(nn.Module):
    """The same trick with a conv's own padding: a 1x1 conv with padding 50 grows the map to 128x128."""

    def __init__(self):
        super().__init__()
        self.grow = nn.Conv2d(1, 2, 1, padding=50)
        self.conv = nn.Conv2d(2, 10, 29)

    def forward(self, x):
        return self.conv(self.grow(x)).mean((2, 3))


class TensorUnfold(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix = nn.Conv2d(784, 10, 1)

    def forward(self, x):
        p = x.unfold(2, 28, 1).unfold(3, 28, 1)
        return self.mix(p.reshape(x.shape[0], 784, 1, 1)).flatten(1)


class Tensordot(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(10, 1, 28, 28))

    def forward(self, x):
        return torch.tensordot(x, self.w, dims=([1, 2, 3], [1, 2, 3]))


class AttentionOverPixels(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, stride=2)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Conv2d(16, 10, 1)

    def forward(self, x):
        seq = self.conv(x).flatten(2).transpose(1, 2)
        a, _ = self.attn(seq, seq, seq)
        return self.head(a.mean(1)[:, :, None, None]).flatten(1)


class PixelEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(16, 10)

    def forward(self, x):
        return self.table((x * 4).long().clamp(0, 15)).mean((1, 2, 3))


class GatherByLearnedIndex(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("idx", torch.randperm(28))
        self.conv = nn.Conv2d(1, 10, 3)

    def forward(self, x):
        return self.conv(x[:, :, self.idx]).mean((2, 3))


class PermuteIntoChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix = nn.Conv2d(28, 10, 1)

    def forward(self, x):
        return self.mix(x.permute(0, 3, 2, 1)).mean((2, 3))


class DepthwiseWholeMap(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 10, 3)
        self.dw = nn.Conv2d(10, 10, 26, groups=10)

    def forward(self, x):
        return self.dw(self.conv(x)).flatten(1)


class DilatedWholeMap(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 10, 2, dilation=27)

    def forward(self, x):
        return self.conv(x).mean((2, 3))


class ColumnKernel(nn.Module):
    def __init__(self):
        super().__init__()
        self.col = nn.Conv2d(1, 16, (28, 1))
        self.head = nn.Conv2d(16, 10, 1)

    def forward(self, x):
        return self.head(self.col(x)).mean((2, 3))


class LearnedGrid(nn.Module):
    def __init__(self):
        super().__init__()
        self.grid = nn.Parameter(torch.zeros(1, 28, 28, 2))
        self.head = nn.Conv2d(1, 10, 3)

    def forward(self, x):
        moved = F.grid_sample(x, self.grid.expand(x.shape[0], -1, -1, -1), align_corners=False)
        return self.head(moved).mean((2, 3))


class Cumsum(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(1, 10, 3)

    def forward(self, x):
        return self.head(x.cumsum(3)).mean((2, 3))


class Sorting(Cumsum):
    def forward(self, x):
        return self.head(x.sort(3).values).mean((2, 3))


class Fourier(Cumsum):
    def forward(self, x):
        return self.head(torch.fft.rfft2(x).abs()).mean((2, 3))


class UpsampleThenBigKernel(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 10, 29)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2)).mean((2, 3))


class Transposed(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(1, 4, 3)
        self.head = nn.Conv2d(4, 10, 3)

    def forward(self, x):
        return self.head(self.up(x)).mean((2, 3))


class Baddbmm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3)
        self.w = nn.Parameter(torch.zeros(8, 10))

    def forward(self, x):
        v = self.conv(x).mean((2, 3))
        return torch.addmm(torch.zeros(10), v, self.w)


class MM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        return a.mm(b)

    @staticmethod
    def backward(ctx, g):
        return None, None


class CustomFunctionMM(Baddbmm):
    def forward(self, x):
        return MM.apply(self.conv(x).mean((2, 3)), self.w)


class PerPositionWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1, 1, 28, 28))
        self.head = nn.Conv2d(1, 10, 1)

    def forward(self, x):
        return self.head(x * self.w).mean((2, 3))


class PerPositionBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.b = nn.Parameter(torch.zeros(28, 28))
        self.head = nn.Conv2d(1, 10, 3)

    def forward(self, x):
        return self.head(torch.relu(x + self.b)).mean((2, 3))


class CoordChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("coords", torch.linspace(-1, 1, 28).expand(1, 1, 28, 28).clone())
        self.head = nn.Conv2d(2, 10, 3)

    def forward(self, x):
        return self.head(torch.cat([x, self.coords.expand(x.shape[0], -1, -1, -1)], 1)).mean((2, 3))


class PixelsSlicedIntoChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix = nn.Conv2d(49, 10, 1)

    def forward(self, x):
        x = F.max_pool2d(x, 4)
        pixels = [x[:, :, i:i + 1, j:j + 1] for i in range(7) for j in range(7)]
        return self.mix(torch.cat(pixels, 1)).flatten(1)


class PositionsIntoBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(1, 10, 1)

    def forward(self, x):
        n = x.shape[0]
        return self.head(x.reshape(n * 784, 1, 1, 1)).view(n, 784, 10).mean(1)


class KernelFromInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(1, 10, 3)

    def forward(self, x):
        return self.head(F.conv2d(x, x, padding=14)[:, :1]).mean((2, 3))


class StateAcrossCalls(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("last", torch.zeros(2, 1, 28, 28))
        self.head = nn.Conv2d(1, 10, 3)

    def forward(self, x):
        self.last.copy_(x)
        return self.head(x).mean((2, 3))


class ThroughPython(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.zeros(784, 10)

    def forward(self, x):
        return torch.tensor(x.tolist()).flatten(1) @ self.w


class DisabledDispatchMode(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(784, 10))

    def forward(self, x):
        from torch.utils._python_dispatch import _disable_current_modes

        with _disable_current_modes():
            return x.flatten(1) @ self.w


class HiddenDispatch(torch.Tensor):
    """A tensor subclass whose own __torch_dispatch__ could run anything, unseen."""

    @staticmethod
    def __new__(cls, elem):
        return torch.Tensor._make_wrapper_subclass(cls, elem.shape, dtype=elem.dtype, device=elem.device)

    def __init__(self, elem):
        self.elem = elem

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        unwrap = lambda a: a.elem if isinstance(a, HiddenDispatch) else a  # noqa: E731
        return func(*[unwrap(a) for a in args], **{k: unwrap(v) for k, v in (kwargs or {}).items()})


class SubclassWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(1, 10, 3)
        self.s = HiddenDispatch(torch.ones(1))

    def forward(self, x):
        return self.head(x * self.s).mean((2, 3))


def closure_net() -> nn.Module:
    w = torch.randn(512, 1, 9, 9)  # 41,472 weights in a closure

    class InAClosure(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Conv2d(512, 10, 1)

        def forward(self, x):
            return self.head(torch.relu(F.conv2d(x, w))).mean((2, 3))

    return InAClosure()


class InADict(nn.Module):
    def __init__(self):
        super().__init__()
        self.store = {"w": torch.randn(256, 1, 9, 9)}
        self.head = nn.Conv2d(256, 10, 1)

    def forward(self, x):
        return self.head(torch.relu(F.conv2d(x, self.store["w"]))).mean((2, 3))


def refused_forms():
    """(module, the exact reasons) for every further form; the lines are found in this file's source."""
    C = "not computed from the input"  # noqa: N806
    return [
        (Einsum(), (f"aten.unsqueeze in Einsum, at {at(Einsum, 'einsum(')}: reshapes activations of shape (2, 1, 28, "
                    "28) to (2, 1, 28, 28, 1), a layout the checker does not follow (positions must stay positions and "
                    "channels channels), so a fully connected layer cannot be ruled out",
                    f"aten.bmm in Einsum, at {at(Einsum, 'einsum(')}: {MATMUL}")),
        (Bilinear(), (f"aten._trilinear (bilinear) in Bilinear, at {at(Bilinear, 'F.bilinear')}: {MATMUL}",)),
        (PadThenWholeKernel(), (f"aten.convolution in 'conv' (Conv2d), at {at(PadThenWholeKernel, 'conv(F.pad')}: "
                                + whole_map("29x29", 28, padded=" (padded to 128x128)"),)),
        (PaddingGrowsMap(), (f"aten.convolution in 'grow' (Conv2d), at {at(PaddingGrowsMap, 'self.grow(x)')}: its "
                             "output map, 128x128, is larger than the 28x28 map it is given: the added border holds no "
                             "pixel, so a later kernel could span every pixel while looking smaller than its map, a "
                             "fully connected layer in disguise",)),
        (TensorUnfold(), (f"aten.unfold (Tensor.unfold) in TensorUnfold, at {at(TensorUnfold, 'x.unfold')}: "
                          f"{UNFOLD}",)),
        (Tensordot(), (f"aten.sum in Tensordot, at {at(Tensordot, 'tensordot')}: reduces activations of shape (2, 1, "
                       "28, 28) over dims (1,): only a reduction over the whole map (dims 2 and 3: global pooling) is "
                       "a known local operation (over channels it is not judged), so a fully connected layer cannot be "
                       "ruled out",
                       f"aten.mm (matmul) in Tensordot, at {at(Tensordot, 'tensordot')}: {MATMUL}")),
        (PixelEmbedding(), (f"aten.embedding in 'table' (Embedding), at {at(PixelEmbedding, 'self.table(')}: "
                            f"{INDEXING}",)),
        (GatherByLearnedIndex(), (f"aten.index in GatherByLearnedIndex, at {at(GatherByLearnedIndex, 'self.idx')}: "
                                  f"{INDEXING}",)),
        (PermuteIntoChannels(), (f"aten.permute in PermuteIntoChannels, at {at(PermuteIntoChannels, 'permute')}: moves "
                                 "the dims of activations of shape (2, 1, 28, 28) to (2, 28, 28, 1) (order (0, 3, 2, "
                                 "1)): positions would become channels or batch, so a 1x1 conv after it weighs every "
                                 "position on its own, a fully connected layer",)),
        (DepthwiseWholeMap(), (f"aten.convolution in 'dw' (Conv2d), at {at(DepthwiseWholeMap, 'self.dw(')}: "
                               + whole_map("26x26", 26),)),
        (DilatedWholeMap(), (f"aten.convolution in 'conv' (Conv2d), at {at(DilatedWholeMap, 'self.conv(x)')}: "
                             + whole_map("2x2", 28, " (dilated to span 28x28)"),)),
        (ColumnKernel(), (f"aten.convolution in 'col' (Conv2d), at {at(ColumnKernel, 'self.col(x)')}: a 28x1 kernel "
                          "spans the whole height of its 28x28 input map: every output sees a whole column with a "
                          "weight per position, fully connected along it",)),
        (LearnedGrid(), (f"aten.grid_sampler_2d (grid_sample) in LearnedGrid, at {at(LearnedGrid, 'F.grid_sample')}: "
                         f"{INDEXING}",)),
        (Cumsum(), (f"aten.cumsum in Cumsum, at {at(Cumsum, 'cumsum')}: {MIXING}",)),
        (Sorting(), (f"aten.sort in Sorting, at {at(Sorting, 'sort(3)')}: {MIXING}",)),
        (Fourier(), (f"aten._fft_r2c (fft) in Fourier, at {at(Fourier, 'rfft2')}: {MIXING}",)),
        (UpsampleThenBigKernel(), (f"aten.upsample_nearest2d in UpsampleThenBigKernel, at "
                                   f"{at(UpsampleThenBigKernel, 'interpolate')}: {MOVING}",)),
        (Transposed(), (f"aten.convolution in 'up' (ConvTranspose2d), at {at(Transposed, 'self.up(x)')}: a transposed "
                        "conv spreads every position over a window and grows the map, so a later kernel could span "
                        "every pixel while looking smaller than its map; not a known local operation, so a fully "
                        "connected layer cannot be ruled out",)),
        (Baddbmm(), (f"aten.addmm in Baddbmm, at {at(Baddbmm, 'torch.addmm')}: {MATMUL}",)),
        (CustomFunctionMM(), (f"aten.mm (matmul) in CustomFunctionMM, at {at(MM, 'a.mm(b)')}: {MATMUL}",)),
        (PerPositionWeight(), (f"aten.mul in PerPositionWeight, at {at(PerPositionWeight, 'x * self.w')}: "
                               + per_position("(2, 1, 28, 28)", "(1, 1, 28, 28)"),)),
        (PerPositionBias(), (f"aten.add in PerPositionBias, at {at(PerPositionBias, 'x + self.b')}: "
                             + per_position("(2, 1, 28, 28)", "(28, 28)"),)),
        (CoordChannels(), (f"aten.cat in CoordChannels, at {at(CoordChannels, 'torch.cat')}: concatenates activations "
                           f"with a tensor of shape (2, 1, 28, 28) that is {C} (a fixed or learned map, such as "
                           "coordinate channels): it can tell a later weight where each position is, so a fully "
                           "connected layer cannot be ruled out",)),
        (PixelsSlicedIntoChannels(), (f"aten.slice in PixelsSlicedIntoChannels, at "
                                      f"{at(PixelsSlicedIntoChannels, 'pixels = ')}: slices activations of shape (2, "
                                      "1, 7, 7) to (2, 1, 1, 7) along dim 2, not channels: pixels cut out one by one "
                                      "and concatenated into channels would let a 1x1 conv weigh each pixel on its "
                                      "own, a fully connected layer",)),
        (PositionsIntoBatch(), (f"aten.view in PositionsIntoBatch, at {at(PositionsIntoBatch, 'x.reshape')}: reshapes "
                                "activations of shape (2, 1, 28, 28) to (1568, 1, 1, 1), a layout the checker does not "
                                "follow (positions must stay positions and channels channels), so a fully connected "
                                "layer cannot be ruled out",)),
        (KernelFromInput(), (f"aten.convolution in KernelFromInput, at {at(KernelFromInput, 'F.conv2d')}: its kernel "
                             "is computed from the input, not a fixed weight: what it connects cannot be bounded, so a "
                             "fully connected layer cannot be ruled out",)),
        (StateAcrossCalls(), (f"aten.copy_ in StateAcrossCalls, at {at(StateAcrossCalls, 'copy_')}: writes into a "
                              "tensor in place in a way the checker does not follow, so a fully connected layer cannot "
                              "be ruled out",)),
        (ThroughPython(), (OUTPUT,)),
        (DisabledDispatchMode(), (OUTPUT,)),
        (SubclassWeight(), (f"aten.mul in SubclassWeight, at {at(SubclassWeight, 'x * self.s')}: a tensor subclass "
                            "(HiddenDispatch) with its own __torch_dispatch__: the operations it runs are hidden from "
                            "the checker, so a fully connected layer cannot be ruled out",)),
    ]


def test_further_fully_connected_forms_are_refused_each_with_its_reason():
    cases = refused_forms()
    assert len(cases) >= 10
    found = {type(module).__name__: (check_module(module).reasons, reasons) for module, reasons in cases}
    assert {name: got for name, (got, expected) in found.items() if got != expected} == {}


def test_attention_over_pixels_is_refused():
    reasons = check_module(AttentionOverPixels()).reasons
    line = at(AttentionOverPixels, "self.attn(")
    assert reasons[:3] == (
        "layer 'attn.out_proj' is a NonDynamicallyQuantizableLinear, a fully connected layer",
        f"aten.view in AttentionOverPixels, at {at(AttentionOverPixels, 'flatten(2)')}: "
        + into_channels("(2, 16, 13, 13)", "(2, 16, 169)", 13),
        f"aten.mm (matmul) in 'attn' (MultiheadAttention), at {line}: {MATMUL} (in train mode only)")
    assert (f"aten._native_multi_head_attention in 'attn' (MultiheadAttention), at {line}: {MIXING} (in eval mode "
            "only)") in reasons


def test_weights_in_a_closure_or_a_dict_are_counted():
    verdict = check_module(closure_net())
    assert verdict.n_params == 5_130 + 41_472
    assert verdict.reasons == (over_budget(46_602, 41_472, "a (512, 1, 9, 9) float32 tensor: 41,472"),)
    verdict = check_module(InADict())
    assert verdict.n_params == 2_570 + 20_736
    assert verdict.reasons == (over_budget(23_306, 20_736, "a (256, 1, 9, 9) float32 tensor: 20,736"),)


# ---- what passes: local operations, counted as they should be ----------------------------------------------------

class ManyLocalOps(nn.Module):
    """Squeeze-and-excite, both poolings, reflect padding, a residual, channel dropout, concatenation, a channel slice,
    a per-channel scale held in a plain list, a 0-dim constant, a tensor of zeros, channels_last, log-softmax: every
    one a known local operation."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1, padding_mode="reflect")
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.se = nn.Conv2d(8, 8, 1)
        self.drop = nn.Dropout2d(0.1)
        self.head = nn.Conv2d(16, 10, 1)
        self.scale = [torch.ones(8, 1, 1)]  # 8 weights outside the parameters: counted

    def forward(self, x):
        h = F.relu(self.c1(x))
        h = F.relu(self.bn(self.c2(h)) + h) * self.scale[0] * torch.tensor(0.5) + torch.zeros_like(h)
        h = h * torch.sigmoid(self.se(F.adaptive_avg_pool2d(h, 1)))
        h = self.drop(F.max_pool2d(h, 2) + F.avg_pool2d(h, 2))
        h = torch.cat([h, F.silu(h)], 1)[:, :16].contiguous(memory_format=torch.channels_last)
        v = torch.flatten(F.adaptive_avg_pool2d(h, (1, 1)), 1)
        return F.log_softmax(self.head(v.view(v.shape[0], -1, 1, 1)).view(v.shape[0], 10), 1)


def test_local_operations_pass_and_every_weight_counts():
    module = ManyLocalOps()
    verdict = check_module(module)
    assert verdict.ok, verdict.reasons
    assert verdict.n_params == sum(p.numel() for p in module.parameters()) + 8


def test_a_parametrized_weight_counts_as_its_parameters():
    import torch.nn.utils.parametrize as parametrize

    class Double(nn.Module):
        def forward(self, w):
            return w * 2

    module = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 10, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    parametrize.register_parametrization(module[0], "weight", Double())
    verdict = check_module(module)
    assert verdict.ok and verdict.n_params == 8 * 9 + 8 + 8 * 10 + 10


def test_the_check_leaves_the_module_and_the_random_state_as_it_found_them():
    module = build(PRESETS["micro"]).eval()
    state = {k: v.clone() for k, v in module.state_dict().items()}
    rng = torch.get_rng_state()
    assert check_module(module).ok
    assert not module.training and torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(state[k], v) for k, v in module.state_dict().items())  # BatchNorm's statistics unmoved


def test_presets_pass_in_channels_last_bf16_autocast_and_inference_mode():
    for name in ("baseline", "micro"):
        assert check_module(build(PRESETS[name]).to(memory_format=torch.channels_last)).ok
        assert check_module(build(PRESETS[name]).to(torch.bfloat16)).ok
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert check_module(build(PRESETS[name])).n_params == count_params(PRESETS[name])
        with torch.inference_mode():
            assert check_module(build(PRESETS[name])).ok


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_every_network_of_the_search_space_passes_and_counts_exactly():
    """Random draws of `suggest` (both kinds of search): the module verdict agrees with the spec's, with the budget
    out of the way, and counts exactly the module's parameters."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    judged = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k in range(120):
            try:
                spec, _ = suggest(study.ask(), param_target=bool(k % 2))
            except SpecError:
                continue
            module = build(spec)
            verdict = check_module(module, max_params=10 ** 9, num_classes=spec.num_classes)
            assert verdict.ok == (not whole_map_convs(spec)), (spec.to_json(indent=None), verdict.reasons)
            assert verdict.n_params == sum(p.numel() for p in module.parameters()) == count_params(spec)
            judged += 1
    assert judged >= 100

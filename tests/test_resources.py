"""int8 resource figures (models/resources.py): peak activation memory, int8 tensor payload and MACs, from a spec
by hand, measured from a module, agreed with an int8 ONNX file, and printed by `check`."""

import math
import textwrap

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli import app
from models.build import build
from models.presets import PRESETS
from models.resources import module_resources, spec_resources
from test_certify import OWN_NET

runner = CliRunner()

# micro: conv 4, 8, 8 (padded), pool, conv 8, 8, 8 (padded), pool, conv 8, 8, 8 (padded), 1x1 head + GAP.
# Activation bytes = input map + output map, int8, batch 1; int8 bytes = weights + 8 per output channel (an int32
# bias and a float32 scale).
MICRO = [  # (layer, activation bytes, int8 bytes)
    ("b1.conv1", 784 + 4 * 784, 1 * 4 * 9 + 8 * 4),  # the 28x28 image in (784), 4x28x28 out: 3,920; 36 + 32 = 68
    ("b1.conv2", 4 * 784 + 8 * 784, 4 * 8 * 9 + 8 * 8),  # 3,136 + 6,272 = 9,408; 288 + 64 = 352
    ("b1.conv3", 8 * 784 + 8 * 784, 8 * 8 * 9 + 8 * 8),  # 6,272 + 6,272 = 12,544, the peak; 576 + 64 = 640
    ("b1.pool", 8 * 784 + 8 * 196, 0),  # 6,272 + 1,568 = 7,840
    ("b2.conv1", 2 * 8 * 196, 640), ("b2.conv2", 2 * 8 * 196, 640), ("b2.conv3", 2 * 8 * 196, 640),  # 3,136 each
    ("b2.pool", 8 * 196 + 8 * 49, 0),  # 1,568 + 392 = 1,960
    ("b3.conv1", 2 * 8 * 49, 640), ("b3.conv2", 2 * 8 * 49, 640), ("b3.conv3", 2 * 8 * 49, 640),  # 784 each
    ("head.conv", 8 * 49 + 10 * 49, 8 * 10 + 8 * 10),  # 392 + 490 = 882; 80 + 80 = 160
    ("head.gap", 10 * 49 + 10, 0),  # 490 + the 10 logits = 500
]
MICRO_PEAK = 12_544
MICRO_INT8 = 68 + 352 + 7 * 640 + 160  # 5,060 = 4,436 weights + 78 output channels x 8
# MACs: weights x output pixels: 36x784 + 288x784 + 576x784 + 3 x 576x196 + 3 x 576x49 + 80x49
MICRO_MACS = 28_224 + 225_792 + 451_584 + 3 * 112_896 + 3 * 28_224 + 3_920  # 1,132,880

# tiny: conv 8, 16, pool, 1x1 to 8, conv 16, 16, pool, 1x1 head + GAP; 28 -> 26 -> 24 -> 12 -> 12 -> 10 -> 8 -> 4.
TINY = [
    ("b1.conv1", 784 + 8 * 676, 72 + 64),  # 784 + 5,408 = 6,192; 136
    ("b1.conv2", 8 * 676 + 16 * 576, 8 * 16 * 9 + 128),  # 5,408 + 9,216 = 14,624, the peak; 1,152 + 128 = 1,280
    ("b1.pool", 16 * 576 + 16 * 144, 0),  # 9,216 + 2,304 = 11,520
    ("t2", 16 * 144 + 8 * 144, 16 * 8 + 64),  # 2,304 + 1,152 = 3,456; 128 + 64 = 192
    ("b3.conv1", 8 * 144 + 16 * 100, 8 * 16 * 9 + 128),  # 1,152 + 1,600 = 2,752; 1,280
    ("b3.conv2", 16 * 100 + 16 * 64, 16 * 16 * 9 + 128),  # 1,600 + 1,024 = 2,624; 2,304 + 128 = 2,432
    ("b3.pool", 16 * 64 + 16 * 16, 0),  # 1,024 + 256 = 1,280
    ("head.conv", 16 * 16 + 10 * 16, 160 + 80),  # 256 + 160 = 416; 240
    ("head.gap", 10 * 16 + 10, 0),  # 170
]
TINY_PEAK, TINY_INT8 = 14_624, 136 + 1_280 + 192 + 1_280 + 2_432 + 240  # 5,560
TINY_MACS = 72 * 676 + 1_152 * 576 + 128 * 144 + 1_152 * 100 + 2_304 * 64 + 160 * 16  # 995,872

SKIP = textwrap.dedent("""
    import torch.nn.functional as F

    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(1, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 8, 3, padding=1)
            self.head = nn.Conv2d(8, 10, 1)

        def forward(self, x):
            x = F.relu(self.a(x))
            x = x + self.b(x)
            return self.head(x).mean((2, 3))
""")


@pytest.mark.parametrize("name, layers, peak, int8, macs", [("micro", MICRO, MICRO_PEAK, MICRO_INT8, MICRO_MACS),
                                                            ("tiny", TINY, TINY_PEAK, TINY_INT8, TINY_MACS)])
def test_spec_figures_are_those_computed_by_hand(name, layers, peak, int8, macs):
    found = spec_resources(PRESETS[name])
    assert [(c.name, c.activation_bytes, c.int8_bytes) for c in found.layers] == layers
    assert (found.peak_activation_bytes, found.int8_bytes, found.macs) == (peak, int8, macs)
    assert found.unmeasured == ()
    # measured from the module the spec builds, with hooks: the same three figures
    built = module_resources(build(PRESETS[name]))
    assert (built.peak_activation_bytes, built.int8_bytes, built.macs, built.unmeasured) == (peak, int8, macs, ())


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    path = tmp_path_factory.mktemp("nets") / "nets.py"
    path.write_text(OWN_NET + SKIP)  # test_certify's Small (a chain of modules) and a net with a skip
    return path


def test_a_chain_of_modules_is_measured_and_a_forward_with_functional_ops_says_what_it_cannot(nets):
    from models.load import load_target

    chain = module_resources(load_target(f"{nets}:Small"))
    # conv 1->8, padded: 784 + 6,272 = 7,056; pool: 6,272 + 8x14x14 = 7,840 (the peak); conv 8->16, padded: 1,568 +
    # 3,136 = 4,704; pool: 3,136 + 784 = 3,920; 1x1 conv 16->10: 784 + 490 = 1,274; average: 490 + 10 = 500.
    # int8 (BatchNorm folded, so each conv has a bias): 72 + 64 = 136, 1,152 + 128 = 1,280, 160 + 80 = 240.
    assert [c.activation_bytes for c in chain.layers if c.activation_bytes] == [7_056, 7_840, 4_704, 3_920, 1_274, 500]
    macs = 72 * 784 + 1_152 * 196 + 160 * 49  # weights x output pixels
    assert (chain.peak_activation_bytes, chain.int8_bytes, chain.macs) == (7_840, 136 + 1_280 + 240, macs)
    skip = module_resources(load_target(f"{nets}:Skip"))
    assert skip.peak_activation_bytes is None and skip.int8_bytes == 136 + 640 + 160  # the payload is still known
    assert skip.macs is None  # work between the modules would not be counted
    why = "layer 'b' reads a tensor the layer before it did not write (functional ops, branches or skips between modules)"
    assert skip.unmeasured == (f"peak activation memory: {why}", f"MACs: {why}")


def _int8_file(tmp_path):
    """micro with random weights and BatchNorm statistics (so that every folded bias is non-zero), folded, exported
    to ONNX and quantised on 64 random images: no training needed to agree sizes."""
    from search.export import _write_onnx, fold_batchnorm
    from search.quantise import quantise

    torch.manual_seed(0)
    module = build(PRESETS["micro"]).eval()
    for bn in (m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.normal_()
        bn.bias.data.normal_()
    float_path, int8_path = tmp_path / "model.onnx", tmp_path / "model.int8.onnx"
    (tmp_path / "model.onnx.data").write_bytes(b"left by an earlier export")
    _write_onnx(fold_batchnorm(module), float_path, {})
    images = np.random.default_rng(0).standard_normal((64, 1, 28, 28)).astype(np.float32)
    quantise(float_path, int8_path, images)
    return float_path, int8_path, images


def test_spec_figures_agree_with_the_int8_onnx_file(tmp_path):
    import onnx
    from onnx import numpy_helper, shape_inference

    from search.quantise import activation_pairs, payload

    float_path, int8_path, images = _int8_file(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.int8.onnx", "model.onnx"]  # no .data left
    proto = shape_inference.infer_shapes(onnx.load(str(int8_path)))
    graph = proto.graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    made_by = {out: n for n in graph.node for out in n.output}
    # The int8 payload: each Conv's weight and bias come through a DequantizeLinear from an initializer: the int8
    # weights with their float32 per-channel scales, and the int32 bias.
    convs = [n for n in graph.node if n.op_type == "Conv"]
    weights = [made_by[c.input[1]] for c in convs]
    biases = [made_by[c.input[2]] for c in convs]
    assert {str(inits[w.input[0]].dtype) for w in weights} == {"int8"}
    assert {str(inits[b.input[0]].dtype) for b in biases} == {"int32"}
    total = sum(inits[w.input[0]].nbytes + inits[w.input[1]].nbytes for w in weights)
    total += sum(inits[b.input[0]].nbytes for b in biases)
    spec = spec_resources(PRESETS["micro"])
    assert total == spec.int8_bytes == MICRO_INT8 == payload(proto)["int8_payload_bytes"]
    # Peak activation: for each op between a DequantizeLinear and a QuantizeLinear, its int8 map in and out, sized
    # by shape inference at batch 1 (the batch dimension is symbolic).
    shapes = {v.name: [d.dim_value or 1 for d in v.type.tensor_type.shape.dim]
              for v in [*graph.value_info, *graph.input, *graph.output]}
    quantised = {n.input[0]: n.output[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    pairs = [math.prod(shapes[made_by[n.input[0]].input[0]]) + math.prod(shapes[quantised[n.output[0]]])
             for n in graph.node if n.op_type in ("Conv", "MaxPool", "GlobalAveragePool")]
    assert pairs == [c.activation_bytes for c in spec.layers] == [bytes_ for _, bytes_, _ in MICRO]  # layer by layer
    assert max(pairs) == spec.peak_activation_bytes == max(b for _, b in activation_pairs(int8_path, images))


def test_check_prints_the_int8_totals_and_says_what_it_cannot_measure(nets):
    out = runner.invoke(app, ["check", "micro"], env={"COLUMNS": "200"})  # wide enough for whole headers
    text = " ".join(out.output.split())
    assert out.exit_code == 0
    assert "peak activation memory 12,544 bytes (int8), int8 model size 5,060 bytes, MACs 1,132,880 per image" in text
    assert "┃ MACs ┃ activation bytes ┃ int8 bytes ┃" in text  # the two new columns
    assert "│ b1.conv3 │ conv │ 8x28x28 │ 576 │ 7 │ 451,584 │ 12,544 │ 640 │" in text
    assert "│ total │ │ │ 4,582 │ 46 │ 1,132,880 │ 12,544 │ 5,060 │" in text
    out = runner.invoke(app, ["check", f"{nets}:Skip"])
    text = " ".join(out.output.split())
    assert out.exit_code == 0
    assert "peak activation memory not measured, int8 model size 936 bytes, MACs not measured" in text
    assert "not measured: peak activation memory: layer 'b' reads a tensor" in text
    assert "not measured: MACs: layer 'b' reads a tensor" in text  # work between the leaves would go uncounted


def test_check_refuses_a_network_over_a_microcontroller_bound_and_one_it_cannot_measure(nets):
    # micro: 12,544 bytes of peak activation, 5,060 bytes of int8 model, 1,132,880 MACs (above).
    out = runner.invoke(app, ["check", "micro", "--max-activation-bytes", "2500", "--max-model-bytes", "6000"])
    text = " ".join(out.output.split())
    assert out.exit_code == 1, text
    assert "REFUSED by the microcontroller bounds" in text
    assert "peak activation memory 12,544 bytes, at or over --max-activation-bytes 2,500" in text
    assert "--max-model-bytes" not in text.split("REFUSED by")[1]  # 5,060 is under 6,000: no reason for it
    # A figure equal to its bound is over it, as in the search; under every bound it passes.
    assert runner.invoke(app, ["check", "micro", "--max-macs", "1132880"]).exit_code == 1
    ok = runner.invoke(app, ["check", "micro", "--max-macs", "1132881", "--max-activation-bytes", "12545",
                             "--max-model-bytes", "5061"])
    assert ok.exit_code == 0 and "REFUSED" not in ok.output
    # A module whose peak activation memory cannot be measured is not taken to fit: refused, saying why.
    out = runner.invoke(app, ["check", f"{nets}:Skip", "--max-activation-bytes", "100000", "--max-macs", "10000000"])
    text = " ".join(out.output.split())
    assert out.exit_code == 1
    assert "peak activation memory not measured, so --max-activation-bytes 100,000 cannot be judged" in text
    assert "MACs not measured, so --max-macs 10,000,000 cannot be judged" in text
    bad = runner.invoke(app, ["check", "micro", "--max-model-bytes", "0"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output


def test_an_int8_drop_over_a_tenth_of_a_point_is_said_plainly():
    from search.quantise import drop_text, drop_warning

    assert drop_warning(0.9861, 0.9854) is None  # 0.07 points: said in the figures, no warning
    assert drop_warning(0.9861, 0.9851) is None  # 0.10 points: at the bound, not over it
    assert drop_warning(0.9861, 0.9840) == ("the int8 model's test accuracy 98.40% is 0.21 points below the float "
                                            "model's 98.61% (more than 0.1)")
    assert drop_text(0.0007) == "0.07 points drop" and drop_text(-0.0008) == "0.08 points better"

"""`export --int8`: the folded float ONNX model quantised to int8 with onnxruntime's static quantisation, and the
figures a microcontroller user needs read back from the int8 file itself.

- Format: QDQ (each float op between DequantizeLinear and QuantizeLinear nodes, which onnxruntime fuses into int8
  kernels when it loads the file). On this 2-core x86 CPU, for `micro` calibrated after one epoch: 89-110 us per
  image at batch 1 against QOperator's 270-320 us (onnxruntime's QLinearConv with int8 activations is slow on x64,
  as its quantiser warns), for the same accuracy (98.54%) and the same int8 payload. The QDQ file is the larger
  (25.4 KB against 18.6 KB, both without torch's per-node debug metadata, which is stripped here): it keeps a
  DequantizeLinear node per weight and bias, and a scale and a zero point per bias channel. Weights and
  activations are int8, weights per output channel (symmetric), activations per tensor; calibration is MinMax.
- Calibration: CALIBRATION_IMAGES training images (never test images), drawn with a fixed seed from all 60,000;
  for that `micro`, 100, 1,000 and 5,000 images gave 98.56%, 98.54% and 98.53% int8 test accuracy: 1,000 is
  well past where the MinMax ranges settle, and calibrating costs time in proportion.
- The global average pooling that torch exports as ReduceMean is written as GlobalAveragePool (the same function
  for a mean over both spatial axes, kept dims) before quantising: onnxruntime quantises GlobalAveragePool, not
  ReduceMean, so the head's average stays int8 and the logits are the last int8 tensor (10 bytes), as
  models/resources.py counts them.
- Peak activation memory is measured by running the file: each op (not the Quantize/DequantizeLinear nodes, not
  reshapes, which are views) reads an int8 map (through a DequantizeLinear) and writes one (through a
  QuantizeLinear) and holds both; the largest such pair, batch 1.
- The int8 tensor payload is read from the file's initializers: every Conv's int8 weights, their float32
  per-channel scales, and its int32 bias (models/resources.py's convention); zero points, the bias's scale (the
  input's scale times the weight's, derived) and activation scales are counted apart, in all the initializers.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

INT8_NAME = "model.int8.onnx"
INT8_DROP_WARNING = 0.001  # accuracy, as a fraction: an int8 model more than 0.1 points below the float one is said
CALIBRATION_IMAGES = 1_000  # MinMax ranges settle within a few hundred images; 1,000 cost about a second
CALIBRATION_BATCH = 100  # images per calibration run
CALIBRATION_SEED = 29  # which training images calibrate: fixed, so an export is reproducible
LATENCY_RUNS = 200  # timed runs at batch 1; the median is reported
LATENCY_WARMUP = 50  # untimed runs first: allocations, caches
LATENCY_THREADS = 1  # a microcontroller has one core; and one thread is the steadiest figure on a shared CPU
_VIEWS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity")  # no map of their own
_ENDS = ("QuantizeLinear", "DequantizeLinear")  # float in, int8 out or back: the int8 graph's boundary


def onnx_accuracy(path: Path, x: torch.Tensor, y: torch.Tensor) -> float:
    """Test accuracy of an ONNX file through onnxruntime, in batches of 1,000 (the batch size is dynamic)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    correct = 0
    for i in range(0, len(y), 1000):
        logits = session.run(None, {"image": x[i:i + 1000].numpy()})[0]
        correct += int((torch.from_numpy(logits).argmax(1) == y[i:i + 1000]).sum())
    return correct / len(y)


def calibration_images(images: torch.Tensor, n: int = CALIBRATION_IMAGES) -> np.ndarray:
    """`n` of the given (normalised, training) images, drawn with CALIBRATION_SEED, as float32 (n, 1, 28, 28)."""
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(CALIBRATION_SEED))[:n]
    return images[order].numpy().astype(np.float32)


def _reader(images: np.ndarray):
    from onnxruntime.quantization import CalibrationDataReader

    class TrainingImages(CalibrationDataReader):
        """The calibration images in batches of CALIBRATION_BATCH."""

        def __init__(self):
            self.batches = iter(range(0, len(images), CALIBRATION_BATCH))

        def get_next(self):
            start = next(self.batches, None)
            return None if start is None else {"image": images[start:start + CALIBRATION_BATCH]}

    return TrainingImages()


def mean_as_global_pool(proto) -> int:
    """Rewrite, in place, every ReduceMean over the two spatial axes with kept dims as GlobalAveragePool (the same
    function), dropping its axes initializer; returns how many were rewritten."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    rewritten = 0
    for index, node in enumerate(list(graph.node)):
        keep = next((a.i for a in node.attribute if a.name == "keepdims"), 1)
        axes = inits.get(node.input[1]) if node.op_type == "ReduceMean" and len(node.input) == 2 else None
        if axes is None or keep != 1 or sorted(int(a) % 4 for a in numpy_helper.to_array(axes)) != [2, 3]:
            continue
        graph.node.remove(node)
        graph.node.insert(index, helper.make_node("GlobalAveragePool", [node.input[0]], list(node.output), node.name))
        if not any(axes.name in n.input for n in graph.node):
            graph.initializer.remove(axes)
        rewritten += 1
    return rewritten


def quantise(float_path: Path, int8_path: Path, images: np.ndarray) -> None:
    """The float ONNX file quantised (QDQ, per channel, int8 weights and activations, MinMax over `images`) into one
    self-contained file at `int8_path`."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    proto = onnx.load(str(float_path))
    mean_as_global_pool(proto)
    root = logging.getLogger()
    level = root.level
    with tempfile.TemporaryDirectory(dir=int8_path.parent) as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        onnx.save(proto, str(prepared))
        root.setLevel(logging.ERROR)  # the quantiser's advice lines (pre-processing, QDQ on x64) go to the root logger
        try:
            quantize_static(str(prepared), str(Path(scratch) / "int8.onnx"), _reader(images),
                            quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8,
                            activation_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
        finally:
            root.setLevel(level)
        quantised = onnx.load(str(Path(scratch) / "int8.onnx"))
    for node in quantised.graph.node:  # torch's stack traces and scopes, copied onto every node: size a runtime never reads
        del node.metadata_props[:]
    onnx.save(quantised, str(int8_path), save_as_external_data=False)  # one file, no external data


def _producers(proto) -> dict:
    return {out: node for node in proto.graph.node for out in node.output}


def payload(proto) -> dict:
    """Bytes of the file's initializers: the int8 payload (every Conv's int8 weights, their float32 scales and its
    int32 bias, each the input of the DequantizeLinear feeding the Conv) and all initializers together."""
    from onnx import numpy_helper

    sizes = {i.name: numpy_helper.to_array(i).nbytes for i in proto.graph.initializer}
    producers = _producers(proto)
    counted = set()
    for conv in (n for n in proto.graph.node if n.op_type == "Conv"):
        weight, bias = (producers.get(name) for name in (list(conv.input) + [""])[1:3])
        counted |= set(weight.input[:2]) if weight is not None and weight.op_type == "DequantizeLinear" else set()
        counted |= {bias.input[0]} if bias is not None and bias.op_type == "DequantizeLinear" else set()
    return {"int8_payload_bytes": sum(sizes.get(name, 0) for name in counted),
            "initializer_bytes": sum(sizes.values())}


def int8_pairs(proto, int8_tensor) -> list[tuple[str, str, str]]:
    """[(node, int8 map read, int8 map written)] of every op of a QDQ graph: its first input's DequantizeLinear
    reads the one, the QuantizeLinear after it writes the other. `int8_tensor(name)` says whether a tensor is an
    int8 activation (not an initializer)."""
    producers = _producers(proto)
    quantised = {n.input[0]: n.output[0] for n in proto.graph.node if n.op_type == "QuantizeLinear"}
    pairs = []
    for node in proto.graph.node:
        if node.op_type in _ENDS + _VIEWS or not node.input:
            continue
        source = producers.get(node.input[0])
        read = source.input[0] if source is not None and source.op_type == "DequantizeLinear" else None
        written = quantised.get(node.output[0])
        if read and written and int8_tensor(read) and int8_tensor(written):
            pairs.append((node.name or node.op_type, read, written))
    return pairs


def activation_pairs(int8_path: Path, image: np.ndarray) -> list[tuple[str, int]]:
    """[(node, bytes)] for every op that reads an int8 map and writes one, measured by running the file at batch 1
    with every intermediate tensor exposed as an output."""
    import onnx
    import onnxruntime

    proto = onnx.load(str(int8_path))
    names = {o for n in proto.graph.node for o in n.output} - {o.name for o in proto.graph.output}
    exposed = onnx.ModelProto()
    exposed.CopyFrom(proto)
    exposed.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in sorted(names))
    session = onnxruntime.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()]
    values = dict(zip(outputs, session.run(outputs, {"image": image[:1]})))

    def int8_tensor(name: str) -> bool:
        return name in values and values[name].dtype == np.int8

    return [(node, int(values[read].nbytes + values[written].nbytes))
            for node, read, written in int8_pairs(proto, int8_tensor)]


def latency_us(path: Path, image: np.ndarray, runs: int = LATENCY_RUNS) -> float:
    """Median microseconds per image through onnxruntime on this CPU: batch 1, LATENCY_THREADS thread(s),
    sequential execution, after LATENCY_WARMUP untimed runs."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = LATENCY_THREADS
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"image": image[:1]}
    for _ in range(LATENCY_WARMUP):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def int8_figures(int8_path: Path, float_path: Path, image: np.ndarray) -> dict:
    """What MODEL.md and export.json say of the int8 file: sizes, payload, peak activation, latency of both files."""
    import onnx

    pairs = activation_pairs(int8_path, image)
    return {"file_bytes": int8_path.stat().st_size, **payload(onnx.load(str(int8_path))),
            "peak_activation_bytes": max(b for _, b in pairs), "activation_pairs": pairs,
            "latency_us": {"int8": latency_us(int8_path, image), "float": latency_us(float_path, image)},
            "latency_threads": LATENCY_THREADS, "latency_runs": LATENCY_RUNS,
            "calibration_images": CALIBRATION_IMAGES}


def write_int8(int8_path: Path, onnx_path: Path, record: dict, data_dir: str | None, test: tuple, accuracy: dict,
               log) -> dict:
    """The int8 file, calibrated on training images of the certificate's set (`record`: name, mean, std; never test
    images), run on the test images into `accuracy["int8"]`, and its figures; a drop of more than
    INT8_DROP_WARNING below the float ONNX model is said in `figures["warning"]` (a warning, not a failure)."""
    from search.data import load_data
    from search.engine.steps import to_device

    train = load_data(data_dir, dataset=record["name"], full_train=True).train
    images = calibration_images(to_device(train, torch.device("cpu"), (record["mean"], record["std"]))[0])
    quantise(onnx_path, int8_path, images)
    accuracy["int8"] = onnx_accuracy(int8_path, *test)
    figures = int8_figures(int8_path, onnx_path, images)
    drop = accuracy["onnx"] - accuracy["int8"]
    figures["drop_points"] = drop * 100
    figures["warning"] = drop_warning(accuracy["onnx"], accuracy["int8"])
    log(f"int8: {int8_path.name}, {figures['file_bytes']:,} bytes, calibrated on {len(images):,} training images; "
        f"test accuracy {accuracy['int8']:.2%}, the float model's {accuracy['onnx']:.2%} ({drop_text(drop)})")
    return figures


def drop_warning(float_acc: float, int8_acc: float) -> str | None:
    """The warning line for an int8 model more than INT8_DROP_WARNING below the float one (fractions), else None."""
    drop = round(float_acc - int8_acc, 9)  # 0.9861 - 0.9851 is 0.0010000000000000009 in floats: 10 images, not over
    if drop <= INT8_DROP_WARNING:
        return None
    return (f"the int8 model's test accuracy {int8_acc:.2%} is {drop * 100:.2f} points below the float model's "
            f"{float_acc:.2%} (more than {INT8_DROP_WARNING * 100:.1f})")


def drop_text(drop: float) -> str:
    """An accuracy drop (a fraction; negative when int8 does better) in points, in words."""
    return f"{drop * 100:.2f} points drop" if drop >= 0 else f"{-drop * 100:.2f} points better"


def int8_expected(folded, spec) -> dict:
    """MACs per image of the folded module, and models/resources.py's figures (from the spec when there is one,
    else measured from the module), to set beside the file's own."""
    from models.budget import module_table
    from models.resources import module_resources, spec_resources

    expected = spec_resources(spec) if spec is not None else module_resources(folded)
    return {"macs": sum(r.macs for r in module_table(folded)[0]),
            "expected": {"peak_activation_bytes": expected.peak_activation_bytes,
                         "int8_payload_bytes": expected.int8_bytes, "unmeasured": list(expected.unmeasured)}}


def _or_unknown(value) -> str:
    return "not measured" if value is None else f"{value:,}"


def int8_card(figures: dict, accuracy: dict) -> list[str]:
    """MODEL.md's int8 section."""
    expected, lat = figures["expected"], figures["latency_us"]
    rows = [("file size", f"{figures['file_bytes']:,} bytes"),
            ("int8 tensor payload: int8 weights, int32 biases, float32 per-channel weight scales (the file's "
             "initializers; zero points and activation scales not counted)",
             f"{figures['int8_payload_bytes']:,} bytes (models/resources.py: "
             f"{_or_unknown(expected['int8_payload_bytes'])})"),
            ("all initializers, with zero points and activation scales", f"{figures['initializer_bytes']:,} bytes"),
            ("peak activation memory, int8, batch 1: the largest map read plus map written by one node, measured "
             "by running the file", f"{figures['peak_activation_bytes']:,} bytes (models/resources.py: "
                                    f"{_or_unknown(expected['peak_activation_bytes'])})"),
            ("MACs per image", f"{figures['macs']:,}"),
            (f"latency per image, onnxruntime on this CPU, batch 1, {figures['latency_threads']} thread, median of "
             f"{figures['latency_runs']} runs after {LATENCY_WARMUP} warm-up runs",
             f"int8 {lat['int8']:.0f} us, float {lat['float']:.0f} us"),
            ("test accuracy, 10,000 test images", f"int8 {accuracy['int8']:.2%}, float ONNX {accuracy['onnx']:.2%}: "
                                                   f"{drop_text(figures['drop_points'] / 100)}"),
            ("calibration", f"{figures['calibration_images']:,} training images (never test images), MinMax; "
                            "QDQ, weights per channel")]
    lines = ["## int8 (model.int8.onnx)", ""]
    lines += [f"**Warning: {figures['warning']}.**", ""] if figures["warning"] else []
    return lines + ["| figure | value |", "| --- | ---: |"] + [f"| {k} | {v} |" for k, v in rows] + [""]

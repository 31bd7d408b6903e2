"""What a network costs on a microcontroller once quantised to int8: peak activation memory (RAM), the int8 tensor
payload (flash) and MACs per image; from a spec (arithmetic, no torch) or measured from a module's forward.

The conventions, the same ones `export --int8` gives in its int8 ONNX graph (QOperator format; search/quantise.py
reads them back from the file, and tests/test_resources.py agrees the two):

- Activation memory is counted at 1 byte per element (int8), batch 1. A layer that moves data (a conv, a pool,
  global average pooling) holds the map it reads and the map it writes at once: its activation bytes are
  (input elements + output elements). The peak activation memory is the largest of these over the layers, for a
  sequential net in which no earlier map is kept alive. The 28x28 input image is the first layer's input (784
  bytes: the int8 image that the quantiser's first QuantizeLinear writes); the logits are the last layer's output
  (10 bytes, before the final DequantizeLinear). Layers that run in place add no map: ReLU (fused into the conv's
  int8 output range), BatchNorm (folded into the conv before export), dropout (the identity at inference) and
  reshapes such as the head's flatten (a view).
- The int8 model size is the tensor payload, not a file's size (no graph, names or format overhead): every conv's
  weights at 1 byte each, its bias at int32 (4 bytes per output channel; after BatchNorm folding every conv has
  one), and its per-channel weight scales at float32 (4 bytes per output channel). Zero points do not count: int8
  weights are quantised symmetrically, so theirs are all 0 and int8 kernels (CMSIS-NN, TFLite Micro) store none;
  the per-tensor activation scale and zero point (one pair per map, 5 bytes) are not counted either.
- MACs per image are models.budget.analyze's (convs only; pools and the average cost no multiply-accumulates).
"""

from __future__ import annotations

from dataclasses import dataclass

from models.budget import analyze
from models.spec import Layer, NetSpec

INT8_BYTES = 1  # a weight or an activation element
BIAS_BYTES = 4  # int32 bias, per output channel
SCALE_BYTES = 4  # float32 weight scale, per output channel (per-channel quantisation)


@dataclass(frozen=True)
class LayerCost:
    name: str  # the layer's name in models.budget's table ("b1.conv1", "b1.pool", "head.gap")
    op: str  # "conv", "pool", "gap", or a module class name
    read_bytes: int  # int8 bytes of the map the layer reads, batch 1
    write_bytes: int  # int8 bytes of the map it writes
    int8_bytes: int  # int8 tensor payload of its weights, bias and scales; 0 for a layer without weights
    macs: int  # multiply-accumulates per image
    measured: bool = True  # False for a module's layer with no int8 convention: its bytes are unknown, not 0

    @property
    def activation_bytes(self) -> int:
        """Bytes of activations held while the layer runs: its input and output maps."""
        return self.read_bytes + self.write_bytes


@dataclass(frozen=True)
class Resources:
    layers: tuple[LayerCost, ...]
    peak_activation_bytes: int | None  # int8, batch 1; None where it could not be measured
    int8_bytes: int | None  # the int8 tensor payload; None where it could not be measured
    macs: int | None  # per image
    unmeasured: tuple[str, ...] = ()  # why a figure is None, one line each

    def summary(self) -> str:
        """The line `check` prints under its table."""
        return (f"peak activation memory {_figure(self.peak_activation_bytes, ' bytes (int8)')}, int8 model size "
                f"{_figure(self.int8_bytes, ' bytes')}, MACs {_figure(self.macs, ' per image')}")


def _figure(value: int | None, unit: str) -> str:
    return "not measured" if value is None else f"{value:,}{unit}"


def conv_int8_bytes(in_channels: int, out_channels: int, kernel: int) -> int:
    """int8 weights, an int32 bias and a float32 scale per output channel: the payload of one folded conv."""
    weights = in_channels * out_channels * kernel * kernel
    return weights * INT8_BYTES + out_channels * (BIAS_BYTES + SCALE_BYTES)


def map_bytes(channels: int, side: int) -> int:
    """int8 bytes of a square feature map, batch 1."""
    return channels * side * side * INT8_BYTES


def layer_cost(layer: Layer) -> LayerCost:
    """One layer of a spec's walk: the maps it reads and writes and its int8 payload; MACs filled by the caller."""
    read, write = map_bytes(layer.in_channels, layer.size_in), map_bytes(layer.out_channels, layer.size_out)
    payload = conv_int8_bytes(layer.in_channels, layer.out_channels, layer.kernel) if layer.op == "conv" else 0
    return LayerCost(layer.name, layer.op, read, write, payload, 0)


def spec_resources(spec: NetSpec) -> Resources:
    """Per layer and in total, from the spec alone (no torch): see the module docstring for the conventions."""
    macs = {row.name: row.macs for row in analyze(spec).layers}
    layers = tuple(LayerCost(c.name, c.op, c.read_bytes, c.write_bytes, c.int8_bytes, macs.get(c.name, 0))
                   for c in map(layer_cost, spec.layers()))
    return totals(layers)


def totals(layers: tuple[LayerCost, ...]) -> Resources:
    """The peak over the layers and the sums, for a sequential net."""
    return Resources(layers, max((c.activation_bytes for c in layers), default=0),
                     sum(c.int8_bytes for c in layers), sum(c.macs for c in layers))


# ---- measured from a module's forward ---------------------------------------------------------------------------
# Leaf modules by what they do to the map, at inference after export: those that read one map and write another,
# and those that run in place or are views (no map of their own).
_MOVING = ("Conv2d", "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "AdaptiveMaxPool2d")
_IN_PLACE = ("ReLU", "ReLU6", "BatchNorm2d", "Dropout", "Dropout2d", "Identity", "Flatten")


def _leaf_cost(name: str, mod, x, y, after_conv: bool) -> tuple[LayerCost, str | None]:
    """One leaf call's cost, and why its int8 payload cannot be counted (None when it can)."""
    kind = type(mod).__name__
    known = next((k for k in _MOVING + _IN_PLACE if any(c.__name__ == k for c in type(mod).__mro__)), None)
    if known is None:
        return LayerCost(name, kind, 0, 0, 0, 0, False), f"layer '{name}' ({kind}): no int8 convention for it"
    if known in _IN_PLACE:
        weighted = known == "BatchNorm2d" and not after_conv  # nothing to fold it into
        return LayerCost(name, known, 0, 0, 0, 0), (f"layer '{name}' (BatchNorm2d) does not follow a conv, so it "
                                                    "is not folded" if weighted else None)
    payload, macs = 0, 0
    if known == "Conv2d":
        payload = mod.weight.numel() * INT8_BYTES + mod.out_channels * (BIAS_BYTES + SCALE_BYTES)
        macs = int(mod.weight.numel() * y.shape[-1] * y.shape[-2])
    return LayerCost(name, known, x[0].numel() * INT8_BYTES, y[0].numel() * INT8_BYTES, payload, macs), None


def _record_calls(module, input_shape) -> tuple[list, object, object]:
    """[(name, module, input, output)] for every leaf module call of one eval forward, the input and the output."""
    import torch

    calls: list = []

    def hook(name):
        def record(mod, inputs, output):
            calls.append((name, mod, inputs[0] if inputs else None, output))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in module.named_modules() if not list(m.children())]
    was_training = module.training
    first = next((t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()), None)
    image = torch.zeros(input_shape, **({"dtype": first.dtype, "device": first.device} if first is not None else {}))
    try:
        with torch.no_grad():
            output = module.eval()(image)
    finally:
        module.train(was_training)
        for h in handles:
            h.remove()
    return calls, image, output


def _chain_break(calls: list, image, output) -> str | None:
    """Why the forward is not one chain of modules (each reading what the one before it wrote), or None."""
    import torch

    def ptr(t):
        return t.data_ptr() if isinstance(t, torch.Tensor) else None

    names = [c[0] for c in calls]
    if not calls or len(set(names)) != len(names):
        return "the forward calls no module, or one module twice"
    before = ptr(image)
    for name, _, x, y in calls:
        if ptr(x) != before or not isinstance(y, torch.Tensor):
            return (f"layer '{name}' reads a tensor the layer before it did not write (functional ops, branches or "
                    "skips between modules)")
        before = ptr(y)
    return None if ptr(output) == before else "the output is not the last module's output"


def module_resources(module, input_shape=(1, 1, 28, 28), extra_weights: int = 0) -> Resources:
    """The same figures measured from one eval forward with hooks (batch 1), for a module whose forward is a chain
    of leaf modules; a figure that cannot be measured is None with the reason in `unmeasured`, never guessed."""
    calls, image, output = _record_calls(module, (1, *input_shape[1:]))
    layers, why = [], []
    previous = None  # the last layer that changes values: a BatchNorm folds only into a conv right before it
    for name, mod, x, y in calls:
        cost, reason = _leaf_cost(name, mod, x, y, previous == "Conv2d")
        layers.append(cost)
        why += [reason] if reason else []
        previous = previous if cost.op in ("Dropout", "Dropout2d", "Identity", "Flatten") else cost.op
    if extra_weights:
        why.append(f"{extra_weights:,} weights the forward uses are not registered parameters")
    unknown = [c.name for c in layers if not c.measured]
    chain = (f"layer '{unknown[0]}' has no int8 convention" if unknown else None) or _chain_break(calls, image, output)
    peak = None if chain else max((c.activation_bytes for c in layers), default=0)
    payload = None if why else sum(c.int8_bytes for c in layers)
    # MACs are counted in leaf modules only: work done between them (a functional conv, unregistered weights) would
    # go uncounted, so where the forward is no plain chain or uses such weights they are not measured either.
    macs_gap = chain or (why[-1] if extra_weights else None)
    notes = ([f"peak activation memory: {chain}"] if chain else []) + [f"int8 model size: {w}" for w in why]
    notes += [f"MACs: {macs_gap}"] if macs_gap else []
    return Resources(tuple(layers), peak, payload, None if macs_gap else sum(c.macs for c in layers), tuple(notes))


def resources_of(net, verdict) -> Resources:
    """`check`'s figures for a spec or a module (models.budget's verdict on it given): from the spec, or measured
    from the module's forward when the verdict ran it to the end (a forward that failed is not run again)."""
    from models.load import ExitCalled, exits_refused

    if isinstance(net, NetSpec):
        return spec_resources(net)
    if not verdict.analysis or not verdict.analysis.layers:
        return Resources((), None, None, None, ("the forward did not run to the end",))
    extra = verdict.n_params - sum(p.numel() for p in net.parameters())  # weights the verdict found unregistered
    try:
        with exits_refused():
            return module_resources(net, extra_weights=extra)
    except (Exception, SystemExit, ExitCalled) as exc:  # a forward that exits is refused, not obeyed
        return Resources((), None, None, None, (f"the forward failed: {type(exc).__name__}: {exc}",))

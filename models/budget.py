"""The budget checker: parameters, receptive field and cost of a network, and the verdict on the rules.

Two ways in:
- `analyze(spec)` / `check(spec)`: arithmetic on a `NetSpec`, no torch, so a candidate is judged before anything
  is built or trained;
- `check_module(module)`: any `torch.nn.Module`, ours or a user's. Parameters come from the module itself, Linear
  layers from its submodules, and fully connected operations done functionally in `forward` (`F.linear`,
  `x @ w`, `torch.mm`, `einsum`, ...) from a trace of the forward pass: torch.fx's symbolic trace, or, for a
  forward with data-dependent control flow, the ATen ops recorded while running it.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

from models.rules import RULES
from models.spec import NetSpec


@dataclass(frozen=True)
class LayerRow:
    name: str
    op: str  # "conv", "bn", "pool", "gap", or a module class name for user modules
    out_shape: tuple[int, ...]  # (channels, height, width) per image
    n_params: int
    receptive_field: int | None  # pixels of the input that one output pixel sees; None where unknown
    jump: int | None  # pixels of the input between neighbouring output pixels
    macs: int  # multiply-accumulates per image


@dataclass(frozen=True)
class Analysis:
    layers: tuple[LayerRow, ...]
    n_params: int
    receptive_field: int | None  # of the last spatial layer before global pooling, pixels
    macs: int  # per image


@dataclass(frozen=True)
class Verdict:
    ok: bool
    n_params: int
    max_params: int
    reasons: tuple[str, ...] = ()  # why it is refused; empty when ok
    receptive_field: int | None = None
    macs: int | None = None
    analysis: Analysis | None = field(default=None, compare=False)

    def summary(self) -> str:
        if self.ok:
            return (f"PASS: {self.n_params:,} parameters, under the {self.max_params:,} budget; no fully connected "
                    "layer (Linear, matmul, or a conv over a whole map)")
        return "REFUSED: " + "; ".join(self.reasons)


def analyze(spec: NetSpec) -> Analysis:
    """Per-layer output shape, parameters, receptive field, jump and MACs, from the spec alone."""
    rows: list[LayerRow] = []
    rf, jump = 1, 1
    final_rf = 1
    for layer in spec.layers():
        if layer.op == "conv":
            weights = layer.in_channels * layer.out_channels * layer.kernel * layer.kernel
            n_params = weights + (layer.out_channels if layer.bias else 0)
            rf += (layer.kernel - 1) * jump
            macs = weights * layer.size_out * layer.size_out
            rows.append(LayerRow(layer.name, "conv", (layer.out_channels, layer.size_out, layer.size_out),
                                 n_params, rf, jump, macs))
            if layer.batchnorm:  # a learned scale and shift per channel; running stats are buffers
                rows.append(LayerRow(layer.name + ".bn", "bn", (layer.out_channels, layer.size_out, layer.size_out),
                                     2 * layer.out_channels, rf, jump, 0))
        elif layer.op == "pool":
            rf += (layer.kernel - 1) * jump
            jump *= layer.stride
            rows.append(LayerRow(layer.name, "pool", (layer.out_channels, layer.size_out, layer.size_out), 0, rf, jump, 0))
        else:  # global average pooling sees the whole map: report the field of what it averages
            final_rf = rf
            rows.append(LayerRow(layer.name, "gap", (layer.out_channels, 1, 1), 0, None, None, 0))
    return Analysis(tuple(rows), sum(r.n_params for r in rows), final_rf, sum(r.macs for r in rows))


def count_params(spec: NetSpec) -> int:
    return analyze(spec).n_params


def _budget_reason(n_params: int, max_params: int) -> str | None:
    if n_params >= max_params:
        return f"{n_params:,} parameters, at or over the {max_params:,} budget (the rule is fewer than {max_params:,})"
    return None


def whole_map_convs(spec: NetSpec) -> list[str]:
    """Convs of a spec whose kernel spans their whole input map of more than one position: each output then sees
    every input position with its own weight, which is a fully connected layer (a 3x3 conv on a 3x3 map, say).
    A 1x1 conv on a 1x1 map (the gap_conv head) is not one of them: a single position has nothing to connect, and
    GAP then 1x1 conv computes exactly what the accepted 1x1 conv then GAP computes."""
    return [f"{layer.name}: a {layer.kernel}x{layer.kernel} kernel over its whole {layer.size_in}x{layer.size_in} "
            "input map, a fully connected layer" for layer in spec.layers()
            if layer.op == "conv" and layer.size_in > 1 and layer.kernel >= layer.size_in]


def check(spec: NetSpec, max_params: int = RULES.max_params) -> Verdict:
    """Judge a spec before anything is built: its budget, and convs that span their whole map (specs hold no
    Linear layer)."""
    analysis = analyze(spec)
    budget = _budget_reason(analysis.n_params, max_params)
    reasons = ([budget] if budget else []) + whole_map_convs(spec)
    return Verdict(not reasons, analysis.n_params, max_params, tuple(reasons), analysis.receptive_field,
                   analysis.macs, analysis)


# ---- any nn.Module ----------------------------------------------------------------------------

def _functional_fc_targets() -> tuple[set, set]:
    import torch
    import torch.nn.functional as F

    functions = {F.linear, F.bilinear, torch.matmul, torch.mm, torch.bmm, torch.addmm, torch.addbmm,
                 torch.baddbmm, torch.addmv, torch.mv, torch.einsum, torch.tensordot, torch.inner,
                 torch.chain_matmul, torch.linalg.matmul, torch.linalg.multi_dot, operator.matmul,
                 operator.imatmul}
    methods = {"matmul", "mm", "bmm", "addmm", "addmm_", "baddbmm", "addbmm", "addmv", "mv", "__matmul__",
               "__rmatmul__", "inner"}
    return functions, methods


# ATen ops that a fully connected layer lowers to (convolutions lower to aten.convolution, never to these).
_ATEN_FC = {"linear", "mm", "bmm", "addmm", "matmul", "baddbmm", "addbmm", "addmv", "mv", "einsum", "bilinear",
            "_trilinear", "tensordot", "inner"}


def _fx_fc_ops(module) -> list[str]:
    """Fully connected operations applied to data in forward, found with torch.fx; raises if untraceable."""
    import torch.fx

    graph = torch.fx.symbolic_trace(module).graph
    functions, methods = _functional_fc_targets()
    data_nodes: set = set()  # nodes whose value depends on the input
    found = []
    for node in graph.nodes:
        if node.op == "placeholder":
            data_nodes.add(node)
            continue
        inputs = set(node.all_input_nodes)
        if inputs & data_nodes:
            data_nodes.add(node)
            is_fc = (node.op == "call_function" and node.target in functions) or (
                node.op == "call_method" and node.target in methods)
            if is_fc:
                name = getattr(node.target, "__name__", str(node.target))
                found.append(f"'{name}' in forward (node {node.name}), a fully connected operation on activations")
    return found


def _spatial_extent(t) -> int:
    """Positions in a 4-D (N, C, H, W) activation's map; 1 for anything that has none left."""
    return int(t.shape[-2] * t.shape[-1]) if t.dim() == 4 else 1


def _dispatch_scan(module, example) -> tuple[list[str], list[str]]:
    """Run forward once, recording its ATen ops on activations (works through data-dependent control flow).

    Returns (fully connected ops such as mm/linear, convs that are fully connected layers in disguise): a conv
    whose kernel spans its whole input map (more than one position), and a conv on a map whose positions were
    reshaped into channels (view/reshape/flatten to a 1x1 map or to no map, nothing reduced).
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    linear_ops: list[str] = []
    disguised: list[str] = []
    data: dict[int, torch.Tensor] = {id(example): example}  # activations: tensors computed from the input
    flattened: set[int] = set()  # activations whose positions went into channels, and what was computed from them
    convs = 0

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            nonlocal convs
            out = func(*args, **(kwargs or {}))
            inputs = [a for a in tree_flatten((args, kwargs or {}))[0] if isinstance(a, torch.Tensor)]
            data_inputs = [a for a in inputs if id(a) in data]
            if not data_inputs:
                return out
            name = getattr(getattr(func, "_overloadpacket", None), "__name__", "")
            if name in _ATEN_FC and name not in linear_ops:
                linear_ops.append(name)
            if name == "convolution":
                convs += 1
                x, weight = args[0], args[1]
                dilation = args[5] if len(args) > 5 else (1, 1)
                span = [d * (k - 1) + 1 for d, k in zip(dilation, weight.shape[-2:])]
                if id(x) in flattened:
                    disguised.append(f"conv {convs} (a {weight.shape[-2]}x{weight.shape[-1]} conv on "
                                     f"{x.shape[1]:,} channels) runs on a map whose positions were reshaped into "
                                     "channels: a fully connected layer")
                elif _spatial_extent(x) > 1 and span[0] >= x.shape[-2] and span[1] >= x.shape[-1]:
                    disguised.append(f"conv {convs} has a {weight.shape[-2]}x{weight.shape[-1]} kernel over its whole "
                                     f"{x.shape[-2]}x{x.shape[-1]} input map: every output sees every input "
                                     "position, a fully connected layer")
            outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
            moved_positions = name in ("view", "_unsafe_view", "reshape", "flatten", "pixel_unshuffle") and any(
                _spatial_extent(a) > 1 and all(_spatial_extent(o) == 1 and o.numel() == a.numel() for o in outs)
                for a in data_inputs)
            for o in outs:
                data[id(o)] = o  # kept alive, so that an id is never reused for another tensor during the pass
                if moved_positions or any(id(a) in flattened for a in data_inputs):
                    flattened.add(id(o))
            return out

    was_training = module.training
    try:
        module.eval()
        with torch.no_grad(), Recorder():
            module(example)
    finally:
        module.train(was_training)
    return ([f"'{name}' in forward (seen running it), a fully connected operation on activations"
             for name in linear_ops], disguised)


def module_table(module, input_shape=(1, 1, 28, 28)) -> tuple[list[LayerRow], tuple[int, ...]]:
    """Per-leaf-module output shape, parameters and conv MACs from one forward pass with hooks."""
    import torch
    from torch import nn

    rows: list[LayerRow] = []

    def hook(name):
        def record(mod, inputs, output):
            if not isinstance(output, torch.Tensor):
                return
            shape = tuple(output.shape[1:])
            n_params = sum(p.numel() for p in mod.parameters(recurse=False))
            macs = 0
            if isinstance(mod, nn.Conv2d):
                macs = int(mod.weight.numel() * output.shape[-1] * output.shape[-2])
            elif isinstance(mod, (nn.Linear, nn.Bilinear)):
                macs = int(mod.weight.numel())
            rows.append(LayerRow(name, type(mod).__name__, shape, n_params, None, None, macs))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in module.named_modules() if not list(m.children())]
    was_training = module.training
    try:
        module.eval()
        with torch.no_grad():
            out = module(torch.zeros(input_shape))
    finally:
        module.train(was_training)
        for h in handles:
            h.remove()
    return rows, tuple(out.shape) if isinstance(out, torch.Tensor) else ()


def check_module(module, input_shape=(1, 1, 28, 28), max_params: int = RULES.max_params,
                 num_classes: int | None = 10) -> Verdict:
    """Judge any nn.Module: budget, Linear-family submodules, functional FC ops in forward, output shape."""
    import torch
    from torch import nn

    reasons: list[str] = []
    from torch.nn.parameter import is_lazy

    if any(is_lazy(p) for p in module.parameters()):  # LazyLinear & co. only have a size after a first forward
        try:
            with torch.no_grad():
                module.eval()(torch.zeros(input_shape))
        except Exception as exc:
            return Verdict(False, 0, max_params, (f"lazy parameters could not be initialised by a forward pass: {exc}",))
    n_params = sum(p.numel() for p in module.parameters())
    budget = _budget_reason(n_params, max_params)
    if budget:
        reasons.append(budget)
    for name, sub in module.named_modules():
        if isinstance(sub, (nn.Linear, nn.Bilinear)):  # LazyLinear and quantizable variants subclass Linear
            reasons.append(f"layer '{name or type(module).__name__}' is a {type(sub).__name__}, a fully connected layer")

    try:
        seen_linear, disguised = _dispatch_scan(module, torch.zeros(input_shape))
    except Exception as exc:
        seen_linear, disguised = [], []
        reasons.append("forward could not be run, so fully connected operations cannot be ruled out: "
                       f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
    try:
        fc_ops = _fx_fc_ops(module)  # names the forward's node; sees branches a zero input does not take
    except Exception:  # data-dependent control flow and the like: the ops of the real forward pass instead
        fc_ops = seen_linear
    reasons.extend(fc_ops)
    reasons.extend(disguised)

    rows: list[LayerRow] = []
    macs = None
    try:
        rows, out_shape = module_table(module, input_shape)
        macs = sum(r.macs for r in rows)
        if num_classes is not None and out_shape != (input_shape[0], num_classes):
            reasons.append(f"output shape {out_shape}, expected ({input_shape[0]}, {num_classes}) logits")
    except Exception as exc:
        reasons.append(f"forward on an input of shape {tuple(input_shape)} failed: {type(exc).__name__}: {exc}")
    analysis = Analysis(tuple(rows), n_params, None, macs or 0)
    return Verdict(not reasons, n_params, max_params, tuple(reasons), None, macs, analysis)

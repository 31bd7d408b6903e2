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
            return f"PASS: {self.n_params:,} parameters, under the {self.max_params:,} budget; no Linear layer"
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


def check(spec: NetSpec, max_params: int = RULES.max_params) -> Verdict:
    """Judge a spec before anything is built: specs cannot hold a Linear layer, so only the budget can fail."""
    analysis = analyze(spec)
    reason = _budget_reason(analysis.n_params, max_params)
    return Verdict(reason is None, analysis.n_params, max_params, (reason,) if reason else (),
                   analysis.receptive_field, analysis.macs, analysis)


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


def _dispatch_fc_ops(module, example) -> list[str]:
    """Fully connected ATen ops seen while actually running forward: works through data-dependent control flow."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    found: list[str] = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = getattr(getattr(func, "_overloadpacket", None), "__name__", "")
            if name in _ATEN_FC and name not in found:
                found.append(name)
            return func(*args, **(kwargs or {}))

    was_training = module.training
    try:
        module.eval()
        with torch.no_grad(), Recorder():
            module(example)
    finally:
        module.train(was_training)
    return [f"'{name}' in forward (seen running it), a fully connected operation on activations" for name in found]


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
        fc_ops = _fx_fc_ops(module)
    except Exception:  # data-dependent control flow and the like: record the ops of a real forward pass instead
        try:
            fc_ops = _dispatch_fc_ops(module, torch.zeros(input_shape))
        except Exception as exc:
            fc_ops = []
            reasons.append("forward could not be traced, so functional fully connected operations cannot be ruled "
                           f"out: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
    reasons.extend(fc_ops)

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

"""The budget checker: parameters, receptive field and cost of a network, and the verdict on the rules.

Two ways in:
- `analyze(spec)` / `check(spec)`: arithmetic on a `NetSpec`, no torch, so a candidate is judged before anything
  is built or trained;
- `check_module(module)`: any `torch.nn.Module`, ours or a user's, judged by what its forward computes: every aten
  op it applies to activations must be one the checker knows to be local, anything else is refused (deny by default,
  models/verdict.py and docs/verdict.md); every tensor the forward uses as a weight counts, registered or not.
"""

from __future__ import annotations

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
                    "layer (every operation on activations is a known local one: docs/verdict.md)")
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
# What its forward computes is judged op by op in models/verdict.py (deny by default; docs/verdict.md).


def module_table(module, input_shape=(1, 1, 28, 28)) -> tuple[list[LayerRow], object]:
    """Per-leaf-module output shape, parameters and conv MACs from one forward pass with hooks; and what the forward
    returned (a tensor of logits, or whatever else a module's own forward returns)."""
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
    first = next((t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()), None)
    like = {"device": first.device, "dtype": first.dtype} if first is not None else {}
    try:
        module.eval()
        with torch.no_grad():
            out = module(torch.zeros(input_shape, **like))
    finally:
        module.train(was_training)
        for h in handles:
            h.remove()
    return rows, out


def output_problem(out, expected: tuple[int, ...]) -> str | None:
    """Why a forward's output is not one tensor of logits of shape `expected` (for an input of `expected[0]`
    images), naming what it is instead; None when it is."""
    import torch

    wanted = f"expected one (N, {expected[1]}) tensor of logits"
    if isinstance(out, torch.Tensor):
        return None if tuple(out.shape) == expected else f"output shape {tuple(out.shape)}, expected {expected} logits"
    if isinstance(out, (tuple, list)):
        kinds = {type(item).__name__ for item in out}
        items = (f"{len(out)} tensor{'s' if len(out) != 1 else ''}" if kinds == {"Tensor"} else
                 f"{len(out)} item{'s' if len(out) != 1 else ''} ({', '.join(sorted(kinds))})")
        return f"output is a {type(out).__name__} of {items}, {wanted}"
    if isinstance(out, dict):
        keys = ", ".join(repr(k) for k in list(out)[:5]) + (", ..." if len(out) > 5 else "")
        return f"output is a dict with {len(out)} key{'s' if len(out) != 1 else ''} ({keys}), {wanted}"
    if out is None:
        return f"output is None (does forward return its result?), {wanted}"
    return f"output is a {type(out).__name__}, not a tensor, {wanted}"


def check_module(module, input_shape=(1, 1, 28, 28), max_params: int = RULES.max_params,
                 num_classes: int | None = 10) -> Verdict:
    """Judge any nn.Module: every op its forward applies to activations must be a known local one (models/verdict.py,
    deny by default), every weight the forward uses counts (parameters, and buffers, lists or closures used as
    weights), Linear-family submodules are named, and the output must be `num_classes` logits."""
    import torch
    from torch.nn.parameter import is_lazy

    from models.load import ExitCalled, exits_refused

    if any(is_lazy(p) for p in module.parameters()):  # LazyLinear & co. only have a size after a first forward
        try:
            with torch.no_grad(), exits_refused():
                module.eval()(torch.zeros(input_shape))
        except (Exception, SystemExit, ExitCalled) as exc:
            return Verdict(False, 0, max_params, (f"lazy parameters could not be initialised by a forward pass: {exc}",))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest, and on a loaded CPU many times faster
    try:
        return _check_module(module, input_shape, max_params, num_classes)
    finally:
        torch.set_num_threads(threads)


def _check_module(module, input_shape, max_params: int, num_classes: int | None) -> Verdict:
    from torch import nn

    from models.load import ExitCalled, exits_refused
    from models.verdict import judge_forward

    reasons: list[str] = []
    judgement = judge_forward(module, input_shape)
    n_params = sum(p.numel() for p in module.parameters()) + judgement.extra
    budget = _budget_reason(n_params, max_params)
    if budget:
        if judgement.extra:
            shown = judgement.extra_labels[:3] + ([f"{len(judgement.extra_labels) - 3} more"]
                                                  if len(judgement.extra_labels) > 3 else [])
            budget += (f"; {judgement.extra:,} of them in tensors the forward uses as weights that are not registered "
                       f"parameters (buffers, plain lists, closures): {', '.join(shown)}")
        reasons.append(budget)
    for name, sub in module.named_modules():
        if isinstance(sub, (nn.Linear, nn.Bilinear)):  # LazyLinear and quantizable variants subclass Linear
            reasons.append(f"layer '{name or type(module).__name__}' is a {type(sub).__name__}, a fully connected layer")
    reasons.extend(judgement.reasons)

    rows: list[LayerRow] = []
    macs = None
    try:
        if not judgement.raised:  # else said once already, by the judgement: no second run of a failing forward
            with exits_refused():
                rows, out = module_table(module, input_shape)
            macs = sum(r.macs for r in rows)
            problem = output_problem(out, (input_shape[0], num_classes)) if num_classes is not None else None
            if problem:
                reasons.append(problem)
    except (Exception, SystemExit, ExitCalled) as exc:  # a forward that exits is refused, not obeyed
        reasons.append(f"forward on an input of shape {tuple(input_shape)} failed: {type(exc).__name__}: {exc}")
    analysis = Analysis(tuple(rows), n_params, None, macs or 0)
    return Verdict(not reasons, n_params, max_params, tuple(reasons), None, macs, analysis)

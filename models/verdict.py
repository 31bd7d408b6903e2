"""What a module's forward computes, judged op by op at the level torch dispatches (aten): deny by default.

`judge_forward(module, input_shape)` runs the forward in train and in eval mode, on noise and on two synthetic
digits, under a `TorchDispatchMode` that sees every aten op. A tensor computed from the input is an activation; any
other tensor is a constant (a weight, a buffer, a random mask, a number made in forward). Every op that touches an
activation must be one of the few whose judgement the checker knows (convs whose kernel is smaller than their
map, BatchNorm, pointwise functions, pooling, global average pooling, dropout, adding or concatenating activations,
scaling by a scalar or per-channel factor, reshapes that keep positions as positions, softmax over channels); any
other op is REFUSED, naming the op, the module and the source line. Every constant that an op combines with
activations is a weight and counts, wherever it is kept (a parameter, a buffer, a plain list, a closure), except
BatchNorm's running statistics, 0-dim numbers and random masks. docs/verdict.md is the reasoning, op by op.

The allow-list and the reasons are in models/verdict_ops.py, the dispatch mode in models/verdict_mode.py (imported,
with torch, only when a module is judged) and the judgement of each op family in models/verdict_families.py.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field

from models.load import ExitCalled, exits_refused
from models.verdict_ops import shape_text, storage_key, storage_size

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # the normalisation the search uses, so that the digits look like its input
MAX_REASONS = 6  # distinct refusals listed; the rest are counted


@dataclass
class _Leaf:
    ref: object  # weakref to the tensor: alive after the passes means it is kept by the module (counted once)
    size: int  # elements of its storage
    counts: bool  # floating and more than a 0-dim number
    label: str


@dataclass
class Judgement:
    reasons: list[str] = field(default_factory=list)
    extra: int = 0  # elements of weights the forward uses that module.parameters() does not hold
    extra_labels: list[str] = field(default_factory=list)
    raised: bool = False  # the forward raised: it could not be judged


class _Judge:
    """What all the passes found: the refusals (with the passes that met them) and the tensors used as weights."""

    def __init__(self):
        self.reasons: dict[str, set[str]] = {}
        self.current = ""
        self.leaves: dict = {}

    def reason(self, text: str):
        self.reasons.setdefault(text, set()).add(self.current)

    def leaf(self, key, t):
        if key not in self.leaves:
            counts = (t.is_floating_point() or t.is_complex()) and not (t.dim() == 0 and storage_size(t) <= 1)
            self.leaves[key] = _Leaf(weakref.ref(t), storage_size(t), counts,
                                     f"a {shape_text(t)} {str(t.dtype).removeprefix('torch.')} tensor")


def _digits(n: int, c: int, h: int, w: int):
    """Synthetic digits, a 0 and a 7 in turn, normalised like MNIST: image-like input without reading a file."""
    import torch

    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    ring = ((((xx - 0.5) / 0.26) ** 2 + ((yy - 0.5) / 0.36) ** 2 - 1).abs() < 0.3).float()
    seven = (((yy - 0.2).abs() < 0.05) & (xx > 0.25) & (xx < 0.75)).float()
    seven = torch.maximum(seven, ((xx - (0.75 - 0.45 * (yy - 0.2) / 0.65)).abs() < 0.06).float() * (yy > 0.2).float()
                          * (yy < 0.85).float())
    images = torch.stack([ring if k % 2 == 0 else seven for k in range(n)])[:, None].expand(n, c, h, w)
    return ((images - MNIST_MEAN) / MNIST_STD).contiguous()


def judge_forward(module, input_shape) -> Judgement:
    """Run `module` in train and eval mode on noise and on synthetic digits and judge every op on activations.

    The module is left as found: its mode, its buffers (the passes run on copies, so BatchNorm's running statistics
    do not move), torch's random state and that of any torch.Generator it holds. The caller's autocast is off for the
    passes (its cache of cast weights would outlive a pass) and inference mode too (under it torch dispatches ops
    undecomposed)."""
    import torch

    judge, result = _Judge(), Judgement()
    tensors = [*module.parameters(), *module.buffers()]
    first = next((t for t in tensors if t.is_floating_point()), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None else torch.float32
    n = max(2, int(input_shape[0]))  # two images at least: BatchNorm trains on more than one value per channel
    shape = (n, *(int(s) for s in input_shape[1:]))
    with _left_as_found(module, device), _module_path(module) as path:
        probes = _probes(shape)
        passes = [(mode, what, x.to(device=device, dtype=dtype)) for mode in ("train", "eval") for what, x in probes]
        param_keys = {storage_key(p) for p in module.parameters()}  # after the swap: the copies are what runs
        buffer_names = {}
        for name, b in module.named_buffers():
            buffer_names.setdefault(storage_key(b), name)
        per_pass = _run_passes(module, passes, judge, result, path)
        _count_weights(result, judge, per_pass, param_keys, buffer_names)
    result.reasons = _listed_reasons(judge, result.raised)
    return result


def _probes(shape):
    """The inputs of the passes: noise, and synthetic digits where the input is an image."""
    import torch

    probes = [("noise", torch.randn(shape, generator=torch.Generator().manual_seed(0)))]
    if len(shape) == 4:
        probes.append(("digits", _digits(*shape)))
    return probes


@contextlib.contextmanager
def _left_as_found(module, device):
    """The passes' settings (torch's random state forked, inference mode and autocast off) and copies of the
    module's buffers; on leaving, its buffers, parameters, generators' states and mode are put back."""
    import torch

    generators = [(g, g.get_state()) for m in module.modules() for g in vars(m).values()
                  if isinstance(g, torch.Generator)]
    was_training = module.training
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    swapped: list = []
    try:
        with contextlib.ExitStack() as scope:
            scope.enter_context(torch.random.fork_rng(devices=rng_devices))
            scope.enter_context(torch.inference_mode(False))
            scope.enter_context(torch.autocast("cpu", enabled=False))
            if device.type == "cuda":
                scope.enter_context(torch.autocast("cuda", enabled=False))
            _swap_in_copies(module, swapped)
            yield
    finally:
        for table, k, b in swapped:
            table[k] = b
        for g, state in generators:
            g.set_state(state)
        module.train(was_training)


def _swap_in_copies(module, swapped: list) -> None:
    """Put copies in the module's place of its buffers and of its parameters made in inference mode (inference
    tensors, which autograd will not save for backward); `swapped` gets each original, to be put back."""
    import torch

    with torch.no_grad():  # the passes run on copies of the buffers (and of parameters made in inference mode)
        for m in module.modules():
            for k, b in list(m._buffers.items()):
                if b is not None:
                    swapped.append((m._buffers, k, b))
                    m._buffers[k] = b.detach().clone()
            for k, p in list(m._parameters.items()):
                if p is not None and p.is_inference():
                    swapped.append((m._parameters, k, p))
                    m._parameters[k] = torch.nn.Parameter(p.clone(), requires_grad=p.requires_grad)


@contextlib.contextmanager
def _module_path(module):
    """The stack of (name, class) of the modules whose forward is running, kept by hooks: where an op was met."""
    stack: list = []
    names = {id(m): (name, type(m).__name__) for name, m in module.named_modules()}

    def enter(mod, inputs):
        stack.append(names[id(mod)])

    def leave(mod, inputs, output):
        if stack:
            stack.pop()

    hooks: list = []
    try:
        for m in module.modules():
            hooks.append(m.register_forward_pre_hook(enter))
            hooks.append(m.register_forward_hook(leave, always_call=True))
        yield stack
    finally:
        for h in hooks:
            h.remove()


def _run_passes(module, passes, judge: _Judge, result: Judgement, path: list) -> list[tuple[set, dict]]:
    """Each pass under its own recorder; (leaf keys used as weights, weights made in forward) of each pass that ran.
    A forward that raises ends the passes: it cannot be judged."""
    import torch

    from models.verdict_mode import Recorder

    per_pass: list[tuple[set, dict]] = []
    for mode, what, x in passes:
        judge.current = f"{mode} mode"
        module.train(mode == "train")
        recorder = Recorder(judge, x)
        recorder.path = path
        path.clear()
        try:
            with (torch.enable_grad() if mode == "train" else torch.no_grad()), recorder, exits_refused():
                out = module(x)
        except (Exception, SystemExit, ExitCalled) as exc:  # a forward that exits is refused, not obeyed
            message = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            judge.current = ""
            did = {SystemExit: f"called sys.exit({message})", ExitCalled: f"called os._exit({message})"}.get(
                type(exc), f"raised {type(exc).__name__}")
            judge.reason(f"forward {did} in {mode} mode on {what} of shape {tuple(x.shape)}"
                         + (f": {message}" if did.startswith("raised") else "")
                         + "; a forward that does not run to its end cannot be judged")
            result.raised = True
            break
        if isinstance(out, torch.Tensor) and not recorder.computed_from_input(out):
            judge.reason("the output is not computed from the input by operations the checker followed "
                         "(it was made outside them, e.g. with .tolist() or .numpy()), so what computed "
                         "it cannot be judged and a fully connected layer cannot be ruled out")
        per_pass.append((recorder.charged, recorder.fresh))
        del recorder, out  # the pass's tensors go: those still alive after the passes are kept by the module
    return per_pass


def _listed_reasons(judge: _Judge, raised: bool) -> list[str]:
    """Each refusal once, with the mode it was met in where not both; past MAX_REASONS, the rest are counted."""
    all_modes = {"train mode", "eval mode"}
    reasons = []
    for text, modes in judge.reasons.items():
        seen = {m for m in modes if m}
        only = f" (in {' and '.join(sorted(seen))} only)" if seen and seen != all_modes and not raised else ""
        reasons.append(text + only)
    if len(reasons) > MAX_REASONS:
        more = len(reasons) - MAX_REASONS
        reasons = reasons[:MAX_REASONS] + [f"and {more} more refused operation{'s' * (more > 1)}"]
    return reasons


def _count_weights(result: Judgement, judge: _Judge, per_pass, param_keys, buffer_names) -> None:
    """Weights kept by the module (alive after the passes: a buffer, a list, a closure) count once; tensors made
    afresh in each pass (torch.tensor([...]) in forward) count for the pass that makes the most of them."""
    kept: dict = {}
    fresh_most, fresh_labels = 0, []
    for charged, fresh in per_pass:
        made = dict(fresh)
        for key in charged - param_keys:
            leaf = judge.leaves.get(key)
            if leaf is None or not leaf.counts:
                continue
            if leaf.ref() is not None:
                kept[key] = (leaf.size, f"buffer '{buffer_names[key]}'" if key in buffer_names else leaf.label)
            else:
                made[key] = (leaf.size, leaf.label + " made in forward")
        if sum(size for size, _ in made.values()) > fresh_most:
            fresh_most = sum(size for size, _ in made.values())
            fresh_labels = [label for _, label in made.values()]
    result.extra = sum(size for size, _ in kept.values()) + fresh_most
    result.extra_labels = [f"{label}: {size:,}" for size, label in sorted(kept.values(), key=lambda s: -s[0])]
    result.extra_labels += sorted(set(fresh_labels))

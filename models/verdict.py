"""What a module's forward computes, judged op by op at the level torch dispatches (aten): deny by default.

`judge_forward(module, input_shape)` runs the forward in train and in eval mode, on noise and on two synthetic
digits, under a `TorchDispatchMode` that sees every aten op. A tensor computed from the input is an activation; any
other tensor is a constant (a weight, a buffer, a random mask, a number made in forward). Every op that touches an
activation must be one of the few below whose judgement the checker knows (convs whose kernel is smaller than their
map, BatchNorm, pointwise functions, pooling, global average pooling, dropout, adding or concatenating activations,
scaling by a scalar or per-channel factor, reshapes that keep positions as positions, softmax over channels); any
other op is REFUSED, naming the op, the module and the source line. Every constant that an op combines with
activations is a weight and counts, wherever it is kept (a parameter, a buffer, a plain list, a closure), except
BatchNorm's running statistics, 0-dim numbers and random masks. docs/verdict.md is the reasoning, op by op.
"""

from __future__ import annotations

import contextlib
import os
import sys
import sysconfig
import weakref
from dataclasses import dataclass, field

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # the normalisation the search uses, so that the digits look like its input
MAX_REASONS = 6  # distinct refusals listed; the rest are counted

# ---- the allow-list: aten op names (overload packets) and what the checker knows of each -------------------------

NEUTRAL = {"clone", "_to_copy", "detach", "alias", "lift_fresh", "lift_fresh_copy", "_conj", "resolve_conj",
           "resolve_neg"}  # copies, dtype/device/memory-format changes: the same values at the same positions
UNARY = {"relu", "relu_", "gelu", "gelu_", "silu", "silu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "hardtanh",
         "hardtanh_", "leaky_relu", "leaky_relu_", "elu", "elu_", "celu", "celu_", "selu", "selu_", "clamp",
         "clamp_", "clamp_min", "clamp_min_", "clamp_max", "clamp_max_", "hardswish", "hardswish_", "hardsigmoid",
         "hardsigmoid_", "mish", "mish_", "softplus", "threshold", "threshold_", "abs", "abs_", "neg", "neg_", "exp",
         "exp_", "log", "log_", "sqrt", "sqrt_", "rsqrt", "rsqrt_", "square", "pow", "pow_", "reciprocal",
         "reciprocal_", "sign", "erf", "logical_not"}
BINARY = {"add", "add_", "sub", "sub_", "rsub", "mul", "mul_", "div", "div_", "maximum", "minimum", "where", "lerp",
          "lerp_", "addcmul", "addcmul_", "addcdiv", "addcdiv_", "gt", "ge", "lt", "le", "eq", "ne", "logical_and",
          "logical_or", "masked_fill", "masked_fill_"}
POINTWISE = UNARY | BINARY  # one position at a time; constants must be scalars, per channel, or random masks
VIEWS = {"view", "_unsafe_view", "reshape", "squeeze", "squeeze_", "unsqueeze", "unsqueeze_", "flatten",
         "unflatten"}
PERMUTES = {"permute", "transpose", "transpose_", "t", "t_"}
CONVS = {"convolution", "_convolution"}
NORMS = {"native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
         "_native_batch_norm_legit_functional", "cudnn_batch_norm", "miopen_batch_norm", "native_group_norm"}
POOLS = {"max_pool2d_with_indices", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "_adaptive_avg_pool2d",
         "adaptive_max_pool2d", "mkldnn_max_pool2d"}
REDUCTIONS = {"mean", "sum", "amax", "amin"}  # only over the whole map: global pooling
SOFTMAX = {"_log_softmax", "_softmax"}
DROPOUT = {"native_dropout"}
PADS = {"constant_pad_nd", "reflection_pad2d", "replication_pad2d"}
KNOWN = NEUTRAL | POINTWISE | VIEWS | PERMUTES | CONVS | NORMS | POOLS | REDUCTIONS | SOFTMAX | DROPOUT | PADS | {
    "slice", "cat"}
RESTRIDES = {"as_strided", "as_strided_"}  # allowed only where the result holds the same values at the same places
# Ops that only read an activation's shape, dtype and device: what they make is a constant, not an activation.
SHAPE_ONLY = {"empty_like", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like", "randint_like",
              "new_empty", "new_zeros", "new_ones", "new_full", "new_empty_strided"}
UNIFORM = {"zeros_like", "ones_like", "full_like", "new_zeros", "new_ones", "new_full", "zeros", "ones", "full",
           "scalar_tensor", "fill_", "zero_"}  # make one value everywhere: a scalar in effect
_KEEPS_UNIFORM = NEUTRAL | POINTWISE | VIEWS | PERMUTES | {"expand", "slice", "select", "repeat"}
RANDOM = {"bernoulli", "bernoulli_", "random_", "uniform_", "normal_", "normal", "exponential_", "geometric_",
          "cauchy_", "log_normal_", "rand", "randn", "randint", "randperm", "rand_like", "randn_like",
          "randint_like", "multinomial", "poisson"}

# Why the ops most often met outside the allow-list are refused (anything else gets the general sentence).
_MATRIX = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "mv", "addmv", "dot", "vdot", "matmul", "linear", "_trilinear",
           "bilinear", "einsum", "tensordot", "inner", "outer", "ger", "addr", "_addmm_activation", "chain_matmul",
           "linalg_multi_dot", "_int_mm", "_scaled_mm", "mkldnn_linear", "_mkldnn_linear"}
_INDEXING = {"embedding", "embedding_bag", "_embedding_bag", "gather", "index_select", "index", "_unsafe_index",
             "take", "take_along_dim", "scatter", "scatter_", "scatter_add", "scatter_add_", "scatter_reduce",
             "index_put", "index_put_", "_index_put_impl_", "index_add", "index_add_", "index_copy", "masked_select",
             "masked_scatter", "nonzero", "grid_sampler_2d", "grid_sampler", "cudnn_grid_sampler", "select",
             "as_strided", "as_strided_", "expand", "repeat", "roll", "flip", "rot90", "narrow", "split",
             "split_with_sizes", "unbind", "chunk", "stack", "diagonal", "tril", "triu"}
_MIXING = {"sort", "argsort", "topk", "kthvalue", "median", "nanmedian", "mode", "cumsum", "cumsum_", "cumprod",
           "cummax", "cummin", "logcumsumexp", "_fft_r2c", "_fft_c2c", "_fft_c2r", "max", "min", "std", "var",
           "var_mean", "std_mean", "logsumexp", "prod", "norm", "linalg_vector_norm", "native_layer_norm",
           "_native_multi_head_attention", "_scaled_dot_product_flash_attention_for_cpu",
           "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
           "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_attention_math", "_prelu_kernel"}
_GROWING = {"upsample_nearest2d", "upsample_bilinear2d", "upsample_bicubic2d", "_upsample_nearest_exact2d",
            "_upsample_bilinear2d_aa", "pixel_shuffle", "pixel_unshuffle", "col2im", "fold"}
_NOTE = {"im2col": "unfold", "unfold": "Tensor.unfold", "mm": "matmul", "_trilinear": "bilinear",
         "_local_scalar_dense": ".item() or a branch on a tensor", "grid_sampler_2d": "grid_sample",
         "_fft_r2c": "fft", "_fft_c2c": "fft", "constant_pad_nd": "F.pad", "native_layer_norm": "layer_norm"}
_WHY_UNKNOWN = ("not a known local operation (docs/verdict.md lists the ones the checker has judged), so a fully "
                "connected layer cannot be ruled out")


def _why_refused(name: str) -> str:
    if name in ("im2col", "unfold"):
        return ("not a known local operation: unfold copies each window's pixels into channels, so a 1x1 conv after "
                "it sees the whole window with a weight per pixel, a fully connected layer")
    if name in _MATRIX:
        return "a matrix product on activations: each output sums every input feature with its own weight, a fully " \
               "connected layer"
    if name in _INDEXING:
        return ("not a known local operation: indexing, slicing or striding activations can move any position "
                "anywhere, so weights after it can be weights per pixel, a fully connected layer")
    if name in _MIXING:
        return ("not a known local operation: it mixes positions or channels in ways the checker has not judged "
                "(a sort, a cumulative sum, a transform, attention, a norm over the map), so a fully connected layer "
                "cannot be ruled out")
    if name in _GROWING:
        return ("not a known local operation: it moves pixels into new positions or channels, so a kernel after it "
                "could span every pixel while looking smaller than its map, a fully connected layer in disguise")
    if name == "_local_scalar_dense":
        return ("reads activations back into Python: what is computed from the number escapes the checker, so a "
                "fully connected layer cannot be ruled out")
    if name in ("copy_", "fill_", "zero_", "set_", "resize_", "resize_as_"):
        return ("writes into a tensor in place in a way the checker does not follow, so a fully connected layer "
                "cannot be ruled out")
    return _WHY_UNKNOWN


# ---- what the checker knows of each tensor ---------------------------------------------------------------------

class _Act:
    """An activation: computed from the input. `real`: for a 4-D map, the (height, width) that holds pixels (less
    than its shape after an explicit pad); `state`: "ok", "aux" (a by-product: batch statistics, pool indices, a
    dropout mask) or "tainted" (computed by a refused op; judged no further)."""

    __slots__ = ("real", "state")

    def __init__(self, real=None, state="ok"):
        self.real, self.state = real, state


class _Const:
    """Not computed from the input. `sources`: keys of the tensors from outside the forward it is computed from
    (parameters, buffers, tensors in lists or closures); `random`: made by a random op (a mask); `uniform`: one value
    everywhere (zeros, ones, full): a scalar in effect."""

    __slots__ = ("sources", "random", "uniform")

    def __init__(self, sources=frozenset(), random=False, uniform=False):
        self.sources, self.random, self.uniform = sources, random, uniform


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


def _storage_key(t):
    try:
        ptr = t.untyped_storage().data_ptr()
    except Exception:  # no storage (a wrapper, a sparse tensor)
        ptr = 0
    return (t.device.type, t.device.index, ptr) if ptr else ("id", id(t))


def _storage_size(t) -> int:
    try:
        return t.untyped_storage().nbytes() // max(t.element_size(), 1)
    except Exception:
        return t.numel()


def _shape(t) -> str:
    return "(" + ", ".join(str(int(s)) for s in t.shape) + ("," if t.dim() == 1 else "") + ")"


_SKIP_DIRS: tuple[str, ...] = ()


def _user_line() -> str | None:
    """file:line of the innermost frame outside torch, this file and the standard library: the forward's line."""
    global _SKIP_DIRS
    if not _SKIP_DIRS:
        import torch

        _SKIP_DIRS = (os.path.dirname(torch.__file__) + os.sep, sysconfig.get_paths()["stdlib"] + os.sep, "<frozen")
    here = __file__
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename == here:  # the recorder's own frames
        frame = frame.f_back
    while frame is not None:
        name = frame.f_code.co_filename
        if name == here:  # back at judge_forward: the op came from torch's own modules, no line of the user's
            return None
        if not name.startswith(_SKIP_DIRS):
            return f"{os.path.basename(name)}:{frame.f_lineno}"
        frame = frame.f_back
    return None


def _recorder_class():
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    _PLAIN_DISPATCH = torch.Tensor.__torch_dispatch__  # what Tensor and Parameter have: no dispatch of their own

    class Recorder(TorchDispatchMode):
        """One forward pass: follows activations through every aten op and judges each op that touches one."""

        @classmethod
        def _should_skip_dynamo(cls) -> bool:
            return False  # else torch wraps __torch_dispatch__ in a dynamo guard, whose import costs about a second

        def __init__(self, judge: "_Judge", x):
            super().__init__()
            self.judge, self.n = judge, int(x.shape[0])
            self.info: dict[int, tuple] = {}  # id -> (tensor, _Act | _Const); keeps every tensor alive for the pass
            self.act_storage: set = set()
            self.fresh: dict = {}  # made in this forward from nothing and used as weights: key -> (size, label)
            self.charged: set = set()  # leaf keys used as weights in this pass
            self.path: list[tuple[str, str]] = []  # the module stack, from hooks
            self._set(x, _Act(tuple(x.shape[2:]) if x.dim() == 4 else None))

        # -- bookkeeping
        def _set(self, t, info):
            self.info[id(t)] = (t, info)
            if isinstance(info, _Act) and t.numel():
                self.act_storage.add(_storage_key(t))

        def lookup(self, t):
            entry = self.info.get(id(t))
            if entry is not None and entry[0] is t:
                return entry[1]
            key = _storage_key(t)
            if key in self.act_storage:  # an alias made outside the dispatcher (.data): the activation itself
                info = _Act(tuple(t.shape[2:]) if t.dim() == 4 else None)
            else:  # from outside the forward: a parameter, a buffer, a tensor in a list, a closure, a number
                info = _Const(frozenset([key]))
                self.judge.leaf(key, t)
            self._set(t, info)
            return info

        def charge(self, t, info: _Const, role: str):
            """`t`, not computed from the input, is combined with activations: a weight, counted."""
            if info.random and not info.sources:
                return  # a random mask
            if info.sources:
                self.charged.update(info.sources)
            elif t.dim() > 0 and t.is_floating_point():
                self.fresh[_storage_key(t)] = (t.numel(), f"a {_shape(t)} tensor made in forward ({role})")

        def where(self) -> str:
            parts = []
            if self.path:
                name, cls = self.path[-1]
                parts.append(f"in '{name}' ({cls})" if name else f"in {cls}")
            line = _user_line()
            if line:
                parts.append(f"at {line}")
            return " " + ", ".join(parts) if parts else ""

        def refuse(self, name, why):
            note = f" ({_NOTE[name]})" if name in _NOTE else ""
            self.judge.reason(f"aten.{name}{note}{self.where()}: {why}")

        # -- the dispatcher's entry
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
            infos = [self.lookup(t) for t in tensors]
            name = getattr(getattr(func, "_overloadpacket", None), "__name__", str(func))
            before = None
            if name in RESTRIDES and infos and isinstance(infos[0], _Act) and tensors[0] is args[0]:
                before = args[0].clone()  # (not recorded: the mode is off inside its own handler)
            out = func(*args, **kwargs)
            outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
            if before is not None and len(outs) == 1 and outs[0].shape == before.shape and \
                    torch.equal(outs[0], before) and infos[0].state == "ok":
                self._set(outs[0], _Act(infos[0].real))  # a new memory layout (channels_last), the same values
                return out
            hiding = [t for t in types if getattr(t, "__torch_dispatch__", None) is not _PLAIN_DISPATCH]
            if hiding:  # a tensor subclass with its own __torch_dispatch__ runs ops this mode never sees
                self.refuse(name, f"a tensor subclass ({', '.join(t.__name__ for t in hiding)}) with its own "
                                  "__torch_dispatch__: the operations it runs are hidden from the checker, so a fully "
                                  "connected layer cannot be ruled out")
                for o in outs:
                    self._set(o, _Act(None, "tainted"))
                return out
            acts = [i for i in infos if isinstance(i, _Act)]
            if not acts or name in SHAPE_ONLY:
                self._constant(name, [] if name in SHAPE_ONLY else infos, outs)
                return out
            if any(i.state == "tainted" for i in acts) and (name in KNOWN or name in RESTRIDES):
                result = None  # already refused upstream: not judged again
            else:
                try:
                    result = self._judge_op(func, name, args, kwargs, tensors, infos, out, outs)
                except Exception as exc:  # the checker's own failure is a refusal, not a pass
                    result = f"the checker could not judge it ({type(exc).__name__}: {exc}), so a fully connected " \
                             "layer cannot be ruled out"
                if isinstance(result, str):
                    self.refuse(name, result)
                    result = None
            for k, o in enumerate(outs):
                self._set(o, result[k] if result is not None and k < len(result) else _Act(None, "tainted"))
            return out

        def _constant(self, name, infos, outs):
            sources = frozenset().union(*(i.sources for i in infos)) if infos else frozenset()
            random = name in RANDOM or any(i.random for i in infos)
            uniform = name in UNIFORM or (bool(infos) and all(i.uniform for i in infos) and name in _KEEPS_UNIFORM)
            for o in outs:
                self._set(o, _Const(sources, random, uniform))

        # -- the judgements
        def _layout(self, t, info) -> str | None:
            if info.state == "aux":
                return ("uses a by-product of an earlier op (batch statistics, pool indices or a dropout mask), not an "
                        "activation the checker follows, so a fully connected layer cannot be ruled out")
            if t.dim() not in (2, 4) or t.shape[0] != self.n:
                return (f"activations of shape {_shape(t)}, neither a (N, C, H, W) map nor a (N, C) vector of "
                        "pooled channels: the checker cannot tell positions from channels, so a fully connected layer "
                        "cannot be ruled out")
            return None

        def _real(self, t, info):
            if t.dim() != 4:
                return None
            return info.real if info.real is not None else tuple(int(s) for s in t.shape[2:])

        def _judge_op(self, func, name, args, kwargs, tensors, infos, out, outs):
            if name not in KNOWN:
                return _why_refused(name)
            if name in POINTWISE:
                return self._pointwise(name, tensors, infos, outs)
            if name == "cat":
                return self._cat(args, kwargs, outs)
            if name in CONVS:
                return self._conv(args, kwargs, outs[0])
            if name in NORMS:
                return self._norm(func, args, kwargs, outs)
            act_pairs = [(t, i) for t, i in zip(tensors, infos) if isinstance(i, _Act)]
            if len(act_pairs) != 1 or not args or act_pairs[0][0] is not args[0]:
                return _WHY_UNKNOWN
            x, xi = act_pairs[0]
            if name in NEUTRAL:
                if tuple(outs[0].shape) != tuple(x.shape) or len(outs) != 1:
                    return _WHY_UNKNOWN
                return [_Act(xi.real, xi.state)]
            if name in VIEWS:
                return self._view(func, name, x, xi, outs[0])
            bad = self._layout(x, xi)
            if bad:
                return bad
            if name in PERMUTES:
                return self._permute(name, args, x, xi, outs[0])
            if name == "slice":  # channels may be picked; positions (or images) may not
                dim = int(args[1] if len(args) > 1 else kwargs.get("dim", 0)) % x.dim()
                if tuple(outs[0].shape) == tuple(x.shape) or dim == 1:
                    return [_Act(xi.real)]
                return (f"slices activations of shape {_shape(x)} to {_shape(outs[0])} along dim {dim}, not channels: "
                        "pixels cut out one by one and concatenated into channels would let a 1x1 conv weigh each "
                        "pixel on its own, a fully connected layer")
            if name in REDUCTIONS:
                return self._reduce(func, args, kwargs, x, outs[0])
            if name in SOFTMAX:
                dim = args[1] if len(args) > 1 else kwargs.get("dim")
                if int(dim) % x.dim() != 1:
                    return (f"a softmax over dim {dim} of activations of shape {_shape(x)}, not over channels (dim 1): "
                            "it weighs positions against each other, which the checker has not judged, so a fully "
                            "connected layer cannot be ruled out")
                return [_Act(xi.real)]
            if name in DROPOUT:
                return [_Act(xi.real)] + [_Act(None, "aux")] * (len(outs) - 1)
            if x.dim() != 4:  # pools and pads work on maps
                return _WHY_UNKNOWN
            o = outs[0]
            if name in PADS:
                real = self._real(x, xi)
                return [_Act((min(real[0], int(o.shape[2])), min(real[1], int(o.shape[3]))))]
            grown = self._grows(x, xi, o)  # POOLS
            if grown:
                return grown
            return [_Act(tuple(int(s) for s in o.shape[2:]))] + [_Act(None, "aux")] * (len(outs) - 1)

        def _grows(self, x, xi, o) -> str | None:
            real = self._real(x, xi)
            oh, ow = int(o.shape[2]), int(o.shape[3])
            if oh > real[0] or ow > real[1]:
                padded = "" if real == tuple(x.shape[2:]) else f" (padded to {x.shape[2]}x{x.shape[3]})"
                return (f"its output map, {oh}x{ow}, is larger than the {real[0]}x{real[1]} map it is given{padded}: "
                        "the added border holds no pixel, so a later kernel could span every pixel while looking "
                        "smaller than its map, a fully connected layer in disguise")
            return None

        def _pointwise(self, name, tensors, infos, outs):
            o = outs[0]
            shape, r = tuple(o.shape), o.dim()
            main = None
            for t, i in zip(tensors, infos):
                if isinstance(i, _Act):
                    bad = self._layout(t, i)
                    if bad:
                        return bad
                    if t.dim() != r:
                        return _WHY_UNKNOWN
                    if tuple(t.shape) == shape and main is None:
                        main = (t, i)
            if main is None or self._layout(o, _Act()):
                acts = ", ".join(_shape(t) for t, i in zip(tensors, infos) if isinstance(i, _Act))
                return (f"broadcasts activations of shape {acts} to {_shape(o)}: every output combines values that no "
                        "input position held together, as a product of every position with a weight per output "
                        "(a fully connected layer) does")
            for t, i in zip(tensors, infos):
                if isinstance(i, _Act) or t.dim() == 0:
                    if isinstance(i, _Const):
                        self.charge(t, i, f"aten.{name}")  # a 0-dim view of a kept tensor counts its storage
                    continue
                if (i.random and not i.sources) or i.uniform:
                    continue  # a dropout mask (random, not learned; it may vary over positions), or a scalar in effect
                f = (1,) * (r - t.dim()) + tuple(int(s) for s in t.shape)
                if len(f) > r:
                    return _WHY_UNKNOWN
                self.charge(t, i, f"aten.{name}")  # counted, whatever the verdict
                if f[0] != 1:
                    return (f"combines activations of shape {_shape(main[0])} with a tensor of shape {_shape(t)} that "
                            "varies over the batch but is not computed from the input by operations the checker "
                            "followed (made outside them: .tolist(), .numpy(), a disabled dispatch mode), so what "
                            "computed it cannot be judged, and it may be a fully connected layer")
                if any(f[d] != 1 for d in range(2, r)):
                    return (f"combines activations of shape {_shape(main[0])} with a tensor of shape {_shape(t)} that "
                            "is not computed from the input and varies over positions: a weight per position, which "
                            "is what a fully connected layer has (a scalar, a per-channel factor of shape (C, 1, 1) or "
                            "a random dropout mask is allowed)")
            real = main[1].real
            return [_Act(real) for _ in outs]

        def _view(self, func, name, x, xi, o):
            if getattr(func, "_overloadname", "") == "dtype" or o.dtype != x.dtype:
                return ("reinterprets the bits of activations as another dtype, which the checker does not follow, "
                        "so a fully connected layer cannot be ruled out")
            s, so = tuple(int(v) for v in x.shape), tuple(int(v) for v in o.shape)
            if so == s:
                return [_Act(xi.real)]
            no_positions = x.dim() == 2 or (x.dim() == 4 and s[2:] == (1, 1))
            if xi.state == "ok" and x.dim() in (2, 4) and s[0] == self.n and no_positions:
                if so == (self.n, s[1]):
                    return [_Act(None)]
                if so == (self.n, s[1], 1, 1):
                    return [_Act((1, 1))]
            if x.dim() == 4 and s[2] * s[3] > 1 and s[0] == self.n and so[0] == self.n and (
                    len(so) in (2, 3) or (len(so) == 4 and so[2] * so[3] < s[2] * s[3])):
                return (f"reshapes activations of shape {_shape(x)} to {_shape(o)}: the positions of the "
                        f"{s[2]}x{s[3]} map become channels, so every weight after it is a weight per position, a "
                        "fully connected layer")
            return (f"reshapes activations of shape {_shape(x)} to {_shape(o)}, a layout the checker does not follow "
                    "(positions must stay positions and channels channels), so a fully connected layer cannot be ruled "
                    "out")

        def _permute(self, name, args, x, xi, o):
            r = x.dim()
            if name in ("permute",):
                perm = [int(d) % r for d in args[1]]
            elif name in ("transpose", "transpose_"):
                perm = list(range(r))
                a, b = int(args[1]) % r, int(args[2]) % r
                perm[a], perm[b] = perm[b], perm[a]
            else:
                perm = list(range(r))[::-1]
            if perm == list(range(r)):
                return [_Act(xi.real)]
            if r == 4 and perm[:2] == [0, 1]:  # height and width swapped: positions stay positions
                real = self._real(x, xi)
                return [_Act((real[perm[2] - 2], real[perm[3] - 2]))]
            return (f"moves the dims of activations of shape {_shape(x)} to {_shape(o)} (order {tuple(perm)}): "
                    "positions would become channels or batch, so a 1x1 conv after it weighs every position on its "
                    "own, a fully connected layer")

        def _cat(self, args, kwargs, outs):
            parts = args[0]
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            o = outs[0]
            reals = []
            for t in parts:
                i = self.lookup(t)
                if not isinstance(i, _Act):
                    return (f"concatenates activations with a tensor of shape {_shape(t)} that is not computed from "
                            "the input (a fixed or learned map, such as coordinate channels): it can tell a later "
                            "weight where each position is, so a fully connected layer cannot be ruled out")
                bad = self._layout(t, i)
                if bad:
                    return bad
                if t.dim() == 4:
                    reals.append(self._real(t, i))
            if dim % o.dim() != 1:
                return (f"concatenates activations along dim {dim}, not channels (dim 1): maps stitched side by side "
                        "(or images of a batch together) let a kernel span more than one map, so a fully connected "
                        "layer cannot be ruled out")
            real = (max(r[0] for r in reals), max(r[1] for r in reals)) if reals else None
            return [_Act(real)]

        def _conv(self, args, kwargs, o):
            names = ("input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding",
                     "groups")
            bound = dict(zip(names, args))
            bound.update(kwargs)
            x, weight, bias = bound["input"], bound["weight"], bound.get("bias")
            xi = self.lookup(x)
            for role, t in (("kernel", weight), ("bias", bias)):
                if isinstance(t, torch.Tensor) and isinstance(self.lookup(t), _Act):
                    return (f"its {role} is computed from the input, not a fixed weight: what it connects cannot be "
                            "bounded, so a fully connected layer cannot be ruled out")
            if not isinstance(xi, _Act):
                return _WHY_UNKNOWN
            bad = self._layout(x, xi)
            if bad or weight.dim() != 4:
                return bad or _WHY_UNKNOWN
            if bound.get("transposed"):
                return ("a transposed conv spreads every position over a window and grows the map, so a later kernel "
                        "could span every pixel while looking smaller than its map; not a known local operation, so "
                        "a fully connected layer cannot be ruled out")
            for t, role in ((weight, "conv kernel"), (bias, "conv bias")):  # counted, whatever the verdict
                if isinstance(t, torch.Tensor):
                    self.charge(t, self.lookup(t), role)
            kh, kw = int(weight.shape[2]), int(weight.shape[3])
            dilation = list(bound.get("dilation") or (1, 1))
            dilation = dilation * 2 if len(dilation) == 1 else dilation
            span = (int(dilation[0]) * (kh - 1) + 1, int(dilation[1]) * (kw - 1) + 1)
            real = self._real(x, xi)
            padded = "" if real == tuple(x.shape[2:]) else f" (padded to {x.shape[2]}x{x.shape[3]})"
            dilated = "" if span == (kh, kw) else f" (dilated to span {span[0]}x{span[1]})"
            whole = [real[d] > 1 and span[d] >= real[d] for d in (0, 1)]
            if any(whole):
                if all(whole) or (real[0] == 1 or real[1] == 1):
                    return (f"a {kh}x{kw} kernel{dilated} over its whole {real[0]}x{real[1]} input map{padded}: every "
                            "output sees every input position with its own weight, a fully connected layer")
                side, line = ("height", "column") if whole[0] else ("width", "row")
                return (f"a {kh}x{kw} kernel{dilated} spans the whole {side} of its {real[0]}x{real[1]} input "
                        f"map{padded}: every output sees a whole {line} with a weight per position, fully connected "
                        "along it")
            return self._grows(x, xi, o) or [_Act(tuple(int(s) for s in o.shape[2:]))]

        def _norm(self, func, args, kwargs, outs):
            bound = {a.name: v for a, v in zip(func._schema.arguments, args)}
            bound.update(kwargs)
            first = func._schema.arguments[0].name
            x = bound.get(first)
            xi = self.lookup(x) if isinstance(x, torch.Tensor) else None
            if not isinstance(xi, _Act):
                return _WHY_UNKNOWN
            bad = self._layout(x, xi)
            if bad:
                return bad
            for arg, value in bound.items():
                if arg == first or not isinstance(value, torch.Tensor):
                    continue
                info = self.lookup(value)
                if isinstance(info, _Act):
                    return (f"its {arg} is computed from the input, which the checker does not follow, so a fully "
                            "connected layer cannot be ruled out")
                if arg in ("weight", "bias"):  # the learned scale and shift, one per channel
                    self.charge(value, info, f"norm {arg}")
                # running_mean / running_var: statistics, not weights (as BatchNorm's buffers are never counted)
            return [_Act(xi.real)] + [_Act(None, "aux")] * (len(outs) - 1)

        def _reduce(self, func, args, kwargs, x, o):
            bound = {a.name: v for a, v in zip(func._schema.arguments, args)}
            bound.update(kwargs)
            dims = bound.get("dim")
            if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
                dims = list(range(x.dim()))
            dims = [dims] if isinstance(dims, int) else list(dims)
            norm = sorted({int(d) % x.dim() for d in dims})
            if x.dim() == 4 and norm == [2, 3]:
                return [_Act((1, 1) if o.dim() == 4 else None)]
            what = ("over the batch it mixes images" if 0 in norm else "over channels it is not judged" if norm == [1]
                    else "over part of a map it is not global pooling")
            return (f"reduces activations of shape {_shape(x)} over dims {tuple(norm)}: only a reduction over the "
                    f"whole map (dims 2 and 3: global pooling) is a known local operation ({what}), so a fully "
                    "connected layer cannot be ruled out")

    return Recorder


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
            counts = (t.is_floating_point() or t.is_complex()) and not (t.dim() == 0 and _storage_size(t) <= 1)
            self.leaves[key] = _Leaf(weakref.ref(t), _storage_size(t), counts,
                                     f"a {_shape(t)} {str(t.dtype).removeprefix('torch.')} tensor")


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

    Recorder = _recorder_class()
    judge = _Judge()
    tensors = [*module.parameters(), *module.buffers()]
    first = next((t for t in tensors if t.is_floating_point()), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None else torch.float32
    n = max(2, int(input_shape[0]))  # two images at least: BatchNorm trains on more than one value per channel
    shape = (n, *(int(s) for s in input_shape[1:]))

    stack: list = []
    names = {id(m): (name, type(m).__name__) for name, m in module.named_modules()}

    def enter(mod, inputs):
        stack.append(names[id(mod)])

    def leave(mod, inputs, output):
        if stack:
            stack.pop()

    result = Judgement()
    per_pass: list[tuple[set, dict]] = []  # (leaf keys used as weights, weights made in forward) of each pass
    swapped: list = []
    hooks: list = []
    generators = [(g, g.get_state()) for m in module.modules() for g in vars(m).values()
                  if isinstance(g, torch.Generator)]
    was_training = module.training
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with contextlib.ExitStack() as scope:
            scope.enter_context(torch.random.fork_rng(devices=rng_devices))
            scope.enter_context(torch.inference_mode(False))
            scope.enter_context(torch.autocast("cpu", enabled=False))
            if device.type == "cuda":
                scope.enter_context(torch.autocast("cuda", enabled=False))
            probes = [("noise", torch.randn(shape, generator=torch.Generator().manual_seed(0)))]
            if len(shape) == 4:
                probes.append(("digits", _digits(*shape)))
            passes = [(mode, what, x.to(device=device, dtype=dtype))
                      for mode in ("train", "eval") for what, x in probes]
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
            param_keys = {_storage_key(p) for p in module.parameters()}
            buffer_names = {}
            for name, b in module.named_buffers():
                buffer_names.setdefault(_storage_key(b), name)
            for m in module.modules():
                hooks.append(m.register_forward_pre_hook(enter))
                hooks.append(m.register_forward_hook(leave, always_call=True))
            for mode, what, x in passes:
                judge.current = f"{mode} mode"
                module.train(mode == "train")
                recorder = Recorder(judge, x)
                recorder.path = stack
                stack.clear()
                try:
                    with (torch.enable_grad() if mode == "train" else torch.no_grad()), recorder:
                        out = module(x)
                except Exception as exc:
                    message = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
                    judge.current = ""
                    judge.reason(f"forward raised {type(exc).__name__} in {mode} mode on {what} of shape "
                                 f"{tuple(shape)}: {message}; a forward that does not run cannot be judged")
                    result.raised = True
                    break
                if isinstance(out, torch.Tensor):
                    entry = recorder.info.get(id(out))
                    info = entry[1] if entry is not None and entry[0] is out else None
                    if info is None and _storage_key(out) in recorder.act_storage:
                        info = _Act()
                    if not isinstance(info, _Act):
                        judge.reason("the output is not computed from the input by operations the checker followed "
                                     "(it was made outside them, e.g. with .tolist() or .numpy()), so what computed "
                                     "it cannot be judged and a fully connected layer cannot be ruled out")
                per_pass.append((recorder.charged, recorder.fresh))
                del recorder, out
            _count_weights(result, judge, per_pass, param_keys, buffer_names)
    finally:
        for h in hooks:
            h.remove()
        for table, k, b in swapped:
            table[k] = b
        for g, state in generators:
            g.set_state(state)
        module.train(was_training)

    all_modes = {"train mode", "eval mode"}
    for text, modes in judge.reasons.items():
        seen = {m for m in modes if m}
        only = f" (in {' and '.join(sorted(seen))} only)" if seen and seen != all_modes and not result.raised else ""
        result.reasons.append(text + only)
    if len(result.reasons) > MAX_REASONS:
        more = len(result.reasons) - MAX_REASONS
        result.reasons = result.reasons[:MAX_REASONS] + [f"and {more} more refused operation{'s' * (more > 1)}"]
    return result


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

"""How the verdict judges one op of each family in its allow-list (models/verdict_ops.py) on activations: the
records of its outputs, or why it is refused. docs/verdict.md gives the reasoning, family by family.
"""

from __future__ import annotations

import torch

from models.verdict_ops import (CONVS, DROPOUT, KNOWN, NEUTRAL, NORMS, PADS, PERMUTES, POINTWISE, REDUCTIONS,
                                SOFTMAX, VIEWS, WHY_UNKNOWN, Act, Const, shape_text, why_refused)


class FamilyJudge:
    """The judgements of models/verdict_mode.py's Recorder, which it inherits: each returns the records of the op's
    outputs (a list of Act) or why the op is refused (a string). They use the Recorder's `n` (images in the batch),
    `lookup` (what it knows of a tensor) and `charge` (a constant used as a weight counts)."""

    def _layout(self, t, info) -> str | None:
        if info.state == "aux":
            return ("uses a by-product of an earlier op (batch statistics, pool indices or a dropout mask), not an "
                    "activation the checker follows, so a fully connected layer cannot be ruled out")
        if t.dim() not in (2, 4) or t.shape[0] != self.n:
            return (f"activations of shape {shape_text(t)}, neither a (N, C, H, W) map nor a (N, C) vector of "
                    "pooled channels: the checker cannot tell positions from channels, so a fully connected layer "
                    "cannot be ruled out")
        return None

    def _real(self, t, info):
        if t.dim() != 4:
            return None
        return info.real if info.real is not None else tuple(int(s) for s in t.shape[2:])

    def judge_op(self, func, name, args, kwargs, tensors, infos, outs):
        """The records of the op's outputs (a list of Act), or why it is refused (a string)."""
        if name not in KNOWN:
            return why_refused(name)
        if name in POINTWISE:
            return self._pointwise(name, tensors, infos, outs)
        if name == "cat":
            return self._cat(args, kwargs, outs)
        if name in CONVS:
            return self._conv(args, kwargs, outs[0])
        if name in NORMS:
            return self._norm(func, args, kwargs, outs)
        act_pairs = [(t, i) for t, i in zip(tensors, infos) if isinstance(i, Act)]
        if len(act_pairs) != 1 or not args or act_pairs[0][0] is not args[0]:
            return WHY_UNKNOWN
        x, xi = act_pairs[0]
        return self._one_activation(func, name, args, kwargs, x, xi, outs)

    def _one_activation(self, func, name, args, kwargs, x, xi, outs):
        """The families that take one activation, `x`, as their first argument (the rest of `args` are constants)."""
        if name in NEUTRAL:
            if tuple(outs[0].shape) != tuple(x.shape) or len(outs) != 1:
                return WHY_UNKNOWN
            return [Act(xi.real, xi.state)]
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
                return [Act(xi.real)]
            return (f"slices activations of shape {shape_text(x)} to {shape_text(outs[0])} along dim {dim}, "
                    "not channels: pixels cut out one by one and concatenated into channels would let a 1x1 conv "
                    "weigh each pixel on its own, a fully connected layer")
        if name in REDUCTIONS:
            return self._reduce(func, args, kwargs, x, outs[0])
        if name in SOFTMAX:
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            if int(dim) % x.dim() != 1:
                return (f"a softmax over dim {dim} of activations of shape {shape_text(x)}, not over channels (dim 1): "
                        "it weighs positions against each other, which the checker has not judged, so a fully "
                        "connected layer cannot be ruled out")
            return [Act(xi.real)]
        if name in DROPOUT:
            return [Act(xi.real)] + [Act(None, "aux")] * (len(outs) - 1)
        if x.dim() != 4:  # pools and pads work on maps
            return WHY_UNKNOWN
        o = outs[0]
        if name in PADS:
            real = self._real(x, xi)
            return [Act((min(real[0], int(o.shape[2])), min(real[1], int(o.shape[3]))))]
        grown = self._grows(x, xi, o)  # POOLS
        if grown:
            return grown
        return [Act(tuple(int(s) for s in o.shape[2:]))] + [Act(None, "aux")] * (len(outs) - 1)

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
            if isinstance(i, Act):
                bad = self._layout(t, i)
                if bad:
                    return bad
                if t.dim() != r:
                    return WHY_UNKNOWN
                if tuple(t.shape) == shape and main is None:
                    main = (t, i)
        if main is None or self._layout(o, Act()):
            acts = ", ".join(shape_text(t) for t, i in zip(tensors, infos) if isinstance(i, Act))
            return (f"broadcasts activations of shape {acts} to {shape_text(o)}: every output combines values that no "
                    "input position held together, as a product of every position with a weight per output "
                    "(a fully connected layer) does")
        for t, i in zip(tensors, infos):
            if isinstance(i, Act) or t.dim() == 0:
                if isinstance(i, Const):
                    self.charge(t, i, f"aten.{name}")  # a 0-dim view of a kept tensor counts its storage
                continue
            if (i.random and not i.sources) or i.uniform:
                continue  # a dropout mask (random, not learned; it may vary over positions), or a scalar in effect
            f = (1,) * (r - t.dim()) + tuple(int(s) for s in t.shape)
            if len(f) > r:
                return WHY_UNKNOWN
            self.charge(t, i, f"aten.{name}")  # counted, whatever the verdict
            if f[0] != 1:
                return (f"combines activations of shape {shape_text(main[0])} with a tensor of shape "
                        f"{shape_text(t)} that varies over the batch but is not computed from the input by "
                        "operations the checker followed (made outside them: .tolist(), .numpy(), a disabled "
                        "dispatch mode), so what computed it cannot be judged, and it may be a fully connected layer")
            if any(f[d] != 1 for d in range(2, r)):
                return (f"combines activations of shape {shape_text(main[0])} with a tensor of shape "
                        f"{shape_text(t)} that is not computed from the input and varies over positions: a weight per "
                        "position, which is what a fully connected layer has (a scalar, a per-channel factor of shape "
                        "(C, 1, 1) or a random dropout mask is allowed)")
        real = main[1].real
        return [Act(real) for _ in outs]

    def _view(self, func, name, x, xi, o):
        if getattr(func, "_overloadname", "") == "dtype" or o.dtype != x.dtype:
            return ("reinterprets the bits of activations as another dtype, which the checker does not follow, "
                    "so a fully connected layer cannot be ruled out")
        s, so = tuple(int(v) for v in x.shape), tuple(int(v) for v in o.shape)
        if so == s:
            return [Act(xi.real)]
        no_positions = x.dim() == 2 or (x.dim() == 4 and s[2:] == (1, 1))
        if xi.state == "ok" and x.dim() in (2, 4) and s[0] == self.n and no_positions:
            if so == (self.n, s[1]):
                return [Act(None)]
            if so == (self.n, s[1], 1, 1):
                return [Act((1, 1))]
        if x.dim() == 4 and s[2] * s[3] > 1 and s[0] == self.n and so[0] == self.n and (
                len(so) in (2, 3) or (len(so) == 4 and so[2] * so[3] < s[2] * s[3])):
            return (f"reshapes activations of shape {shape_text(x)} to {shape_text(o)}: the positions of the "
                    f"{s[2]}x{s[3]} map become channels, so every weight after it is a weight per position, a "
                    "fully connected layer")
        return (f"reshapes activations of shape {shape_text(x)} to {shape_text(o)}, a layout the checker does not "
                "follow (positions must stay positions and channels channels), so a fully connected layer cannot be "
                "ruled out")

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
            return [Act(xi.real)]
        if r == 4 and perm[:2] == [0, 1]:  # height and width swapped: positions stay positions
            real = self._real(x, xi)
            return [Act((real[perm[2] - 2], real[perm[3] - 2]))]
        return (f"moves the dims of activations of shape {shape_text(x)} to {shape_text(o)} (order {tuple(perm)}): "
                "positions would become channels or batch, so a 1x1 conv after it weighs every position on its "
                "own, a fully connected layer")

    def _cat(self, args, kwargs, outs):
        parts = args[0]
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        o = outs[0]
        reals = []
        for t in parts:
            i = self.lookup(t)
            if not isinstance(i, Act):
                return (f"concatenates activations with a tensor of shape {shape_text(t)} that is not computed from "
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
        return [Act(real)]

    def _conv(self, args, kwargs, o):
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding",
                 "groups")
        bound = dict(zip(names, args))
        bound.update(kwargs)
        x, weight, bias = bound["input"], bound["weight"], bound.get("bias")
        xi = self.lookup(x)
        for role, t in (("kernel", weight), ("bias", bias)):
            if isinstance(t, torch.Tensor) and isinstance(self.lookup(t), Act):
                return (f"its {role} is computed from the input, not a fixed weight: what it connects cannot be "
                        "bounded, so a fully connected layer cannot be ruled out")
        if not isinstance(xi, Act):
            return WHY_UNKNOWN
        bad = self._layout(x, xi)
        if bad or weight.dim() != 4:
            return bad or WHY_UNKNOWN
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
        return self._grows(x, xi, o) or [Act(tuple(int(s) for s in o.shape[2:]))]

    def _norm(self, func, args, kwargs, outs):
        bound = {a.name: v for a, v in zip(func._schema.arguments, args)}
        bound.update(kwargs)
        first = func._schema.arguments[0].name
        x = bound.get(first)
        xi = self.lookup(x) if isinstance(x, torch.Tensor) else None
        if not isinstance(xi, Act):
            return WHY_UNKNOWN
        bad = self._layout(x, xi)
        if bad:
            return bad
        for arg, value in bound.items():
            if arg == first or not isinstance(value, torch.Tensor):
                continue
            info = self.lookup(value)
            if isinstance(info, Act):
                return (f"its {arg} is computed from the input, which the checker does not follow, so a fully "
                        "connected layer cannot be ruled out")
            if arg in ("weight", "bias"):  # the learned scale and shift, one per channel
                self.charge(value, info, f"norm {arg}")
            # running_mean / running_var: statistics, not weights (as BatchNorm's buffers are never counted)
        return [Act(xi.real)] + [Act(None, "aux")] * (len(outs) - 1)

    def _reduce(self, func, args, kwargs, x, o):
        bound = {a.name: v for a, v in zip(func._schema.arguments, args)}
        bound.update(kwargs)
        dims = bound.get("dim")
        if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
            dims = list(range(x.dim()))
        dims = [dims] if isinstance(dims, int) else list(dims)
        norm = sorted({int(d) % x.dim() for d in dims})
        if x.dim() == 4 and norm == [2, 3]:
            return [Act((1, 1) if o.dim() == 4 else None)]
        what = ("over the batch it mixes images" if 0 in norm else "over channels it is not judged" if norm == [1]
                else "over part of a map it is not global pooling")
        return (f"reduces activations of shape {shape_text(x)} over dims {tuple(norm)}: only a reduction over the "
                f"whole map (dims 2 and 3: global pooling) is a known local operation ({what}), so a fully "
                "connected layer cannot be ruled out")


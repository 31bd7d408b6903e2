"""The dispatch mode under which the verdict (models/verdict.py) runs a forward: it sees every aten op, follows which
tensors are activations, judges each op that touches one (models/verdict_families.py) and records the constants used
as weights.

It imports torch, so models/verdict.py imports it only when a module is judged.
"""

from __future__ import annotations

import os
import sys
import sysconfig

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from models.verdict_families import FamilyJudge
from models.verdict_ops import (KEEPS_UNIFORM, KNOWN, NOTES, RANDOM, RESTRIDES, SHAPE_ONLY, UNIFORM, Act, Const,
                                shape_text, storage_key)

_PLAIN_DISPATCH = torch.Tensor.__torch_dispatch__  # what Tensor and Parameter have: no dispatch of their own
_SKIP_DIRS = (os.path.dirname(torch.__file__) + os.sep, sysconfig.get_paths()["stdlib"] + os.sep, "<frozen")
# The verdict's own files: the recorder's frames are passed over, and judge_forward's ends the search for a line.
_VERDICT_FILES = frozenset(os.path.join(os.path.dirname(__file__), name)
                           for name in ("verdict.py", "verdict_mode.py", "verdict_families.py"))


def _user_line() -> str | None:
    """file:line of the innermost frame outside torch, the verdict's files and the standard library: the forward's
    line."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename in _VERDICT_FILES:  # the recorder's own frames
        frame = frame.f_back
    while frame is not None:
        name = frame.f_code.co_filename
        if name in _VERDICT_FILES:  # back at judge_forward: the op came from torch's own modules, no line of the user's
            return None
        if not name.startswith(_SKIP_DIRS):
            return f"{os.path.basename(name)}:{frame.f_lineno}"
        frame = frame.f_back
    return None


class Recorder(FamilyJudge, TorchDispatchMode):
    """One forward pass: follows activations through every aten op and judges each op that touches one. `judge`,
    models/verdict.py's _Judge, gathers the refusals and the tensors from outside the forward of all the passes."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False  # else torch wraps __torch_dispatch__ in a dynamo guard, whose import costs about a second

    def __init__(self, judge, x):
        super().__init__()
        self.judge, self.n = judge, int(x.shape[0])
        self.info: dict[int, tuple] = {}  # id -> (tensor, Act | Const); keeps every tensor alive for the pass
        self.act_storage: set = set()
        self.fresh: dict = {}  # made in this forward from nothing and used as weights: key -> (size, label)
        self.charged: set = set()  # leaf keys used as weights in this pass
        self.path: list[tuple[str, str]] = []  # the module stack, from hooks
        self._set(x, Act(tuple(x.shape[2:]) if x.dim() == 4 else None))

    # -- bookkeeping
    def _set(self, t, info):
        self.info[id(t)] = (t, info)
        if isinstance(info, Act) and t.numel():
            self.act_storage.add(storage_key(t))

    def lookup(self, t):
        entry = self.info.get(id(t))
        if entry is not None and entry[0] is t:
            return entry[1]
        key = storage_key(t)
        if key in self.act_storage:  # an alias made outside the dispatcher (.data): the activation itself
            info = Act(tuple(t.shape[2:]) if t.dim() == 4 else None)
        else:  # from outside the forward: a parameter, a buffer, a tensor in a list, a closure, a number
            info = Const(frozenset([key]))
            self.judge.leaf(key, t)
        self._set(t, info)
        return info

    def charge(self, t, info: Const, role: str):
        """`t`, not computed from the input, is combined with activations: a weight, counted."""
        if info.random and not info.sources:
            return  # a random mask
        if info.sources:
            self.charged.update(info.sources)
        elif t.dim() > 0 and t.is_floating_point():
            self.fresh[storage_key(t)] = (t.numel(), f"a {shape_text(t)} tensor made in forward ({role})")

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
        note = f" ({NOTES[name]})" if name in NOTES else ""
        self.judge.reason(f"aten.{name}{note}{self.where()}: {why}")

    # -- the dispatcher's entry
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        infos = [self.lookup(t) for t in tensors]
        name = getattr(getattr(func, "_overloadpacket", None), "__name__", str(func))
        before = None
        if name in RESTRIDES and infos and isinstance(infos[0], Act) and tensors[0] is args[0]:
            before = args[0].clone()  # (not recorded: the mode is off inside its own handler)
        out = func(*args, **kwargs)
        outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        if before is not None and len(outs) == 1 and outs[0].shape == before.shape and \
                torch.equal(outs[0], before) and infos[0].state == "ok":
            self._set(outs[0], Act(infos[0].real))  # a new memory layout (channels_last), the same values
            return out
        hiding = [t for t in types if getattr(t, "__torch_dispatch__", None) is not _PLAIN_DISPATCH]
        if hiding:  # a tensor subclass with its own __torch_dispatch__ runs ops this mode never sees
            self.refuse(name, f"a tensor subclass ({', '.join(t.__name__ for t in hiding)}) with its own "
                              "__torch_dispatch__: the operations it runs are hidden from the checker, so a fully "
                              "connected layer cannot be ruled out")
            for o in outs:
                self._set(o, Act(None, "tainted"))
            return out
        acts = [i for i in infos if isinstance(i, Act)]
        if not acts or name in SHAPE_ONLY:
            self._constant(name, [] if name in SHAPE_ONLY else infos, outs)
            return out
        if any(i.state == "tainted" for i in acts) and (name in KNOWN or name in RESTRIDES):
            result = None  # already refused upstream: not judged again
        else:
            try:
                result = self.judge_op(func, name, args, kwargs, tensors, infos, outs)
            except Exception as exc:  # the checker's own failure is a refusal, not a pass
                result = f"the checker could not judge it ({type(exc).__name__}: {exc}), so a fully connected " \
                         "layer cannot be ruled out"
            if isinstance(result, str):
                self.refuse(name, result)
                result = None
        for k, o in enumerate(outs):
            self._set(o, result[k] if result is not None and k < len(result) else Act(None, "tainted"))
        return out

    def computed_from_input(self, out) -> bool:
        """Whether the forward's output is an activation: followed here, or an alias of one made outside the
        dispatcher (.data)."""
        entry = self.info.get(id(out))
        info = entry[1] if entry is not None and entry[0] is out else None
        if info is None and storage_key(out) in self.act_storage:
            info = Act()
        return isinstance(info, Act)

    def _constant(self, name, infos, outs):
        sources = frozenset().union(*(i.sources for i in infos)) if infos else frozenset()
        random = name in RANDOM or any(i.random for i in infos)
        uniform = name in UNIFORM or (bool(infos) and all(i.uniform for i in infos) and name in KEEPS_UNIFORM)
        for o in outs:
            self._set(o, Const(sources, random, uniform))


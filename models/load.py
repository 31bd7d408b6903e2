"""What `check` and `certify` take: a preset name, a spec JSON file, or path/to/file.py:ClassName.

A module target is imported, and so run: `check file.py:Class` executes that file. What it may do while imported
and instantiated is bounded only this far: an exception, `sys.exit()` (SystemExit) or `os._exit()` (replaced, for the
import and the instantiation, by a function that raises) becomes a refusal naming the file (exit 2). A file that ends
its process another way (a signal to itself, ctypes) is not stopped: run only code you would run anyway.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Union

from models import presets
from models.spec import NetSpec, SpecError

MAX_MODULE_BYTES = 1_000_000  # a module file's source; a network of one's own takes a few KB


class TargetError(ValueError):
    """A target that names nothing usable; the message says what was expected."""


class RefusedSpec(TargetError):
    """A spec that describes no network the rules allow (its maps shrink below 1x1): refused (exit 1), not unusable."""


class SourceMismatch(TargetError):
    """A module file whose source is not the one a certificate or checkpoint recorded (its sha256 differs)."""


class ExitCalled(BaseException):
    """Raised in place of os._exit while a module file is imported or instantiated (BaseException: an `except
    Exception` in the file does not swallow it)."""


def _no_exit(code: int = 0):
    raise ExitCalled(code)


@contextmanager
def exits_refused():
    """os._exit (and posix._exit / nt._exit, the same function) raise instead of ending the process."""
    platform_module = sys.modules.get(os.name)
    saved = os._exit, getattr(platform_module, "_exit", None)
    os._exit = _no_exit
    if saved[1] is not None:
        platform_module._exit = _no_exit
    try:
        yield
    finally:
        os._exit = saved[0]
        if saved[1] is not None:
            platform_module._exit = saved[1]


def guarded(what: str, call: Callable):
    """call(), with an exception, SystemExit or os._exit during it turned into a TargetError saying `what` did it
    (KeyboardInterrupt, a real Ctrl-C, goes through)."""
    try:
        with exits_refused():
            return call()
    except KeyboardInterrupt:
        raise
    except SystemExit as exc:
        raise TargetError(f"{what} called sys.exit({exc.code!r}) (SystemExit); refused") from None
    except ExitCalled as exc:
        raise TargetError(f"{what} called os._exit({exc.args[0]!r}); refused") from None
    except BaseException as exc:
        detail = str(exc).splitlines()[0][:300] if str(exc) else ""
        raise TargetError(f"{what} raised {type(exc).__name__}: {detail}") from None


def read_source(path: str | Path) -> bytes:
    """A module file's bytes, refused over MAX_MODULE_BYTES."""
    path = Path(path)
    if not path.is_file():
        raise TargetError(f"{path}: no such file")
    size = path.stat().st_size
    if size > MAX_MODULE_BYTES:
        raise TargetError(f"{path}: {size:,} bytes, over the {MAX_MODULE_BYTES:,} allowed for a module file")
    return path.read_bytes()


def source_digest(path: str | Path) -> str:
    """The sha256 of a module file's source, as a certificate records it."""
    return hashlib.sha256(read_source(path)).hexdigest()


class _HashedSourceLoader(importlib.machinery.SourceFileLoader):
    """Imports the bytes that were read and hashed, not whatever the file holds a moment later; no bytecode cache."""

    def __init__(self, name: str, path: str, source: bytes):
        super().__init__(name, path)
        self.source = source

    def get_data(self, path):
        return self.source if path == self.path else super().get_data(path)

    def get_code(self, fullname):
        return compile(self.source, self.path, "exec", dont_inherit=True)


def import_module_class(path: str | Path, class_name: str, sha256: str | None = None):
    """The class `class_name` defined in the Python file at `path` (a torch.nn.Module subclass), importing, and so
    running, that file. `sha256`: the source must have this digest (SourceMismatch otherwise)."""
    import torch

    path = Path(path)
    source = read_source(path)
    digest = hashlib.sha256(source).hexdigest()
    if sha256 is not None and digest != sha256:
        raise SourceMismatch(f"{path}: source sha256 {digest}, not the {sha256} recorded")
    loader = _HashedSourceLoader(path.stem, str(path), source)
    module_spec = importlib.util.spec_from_loader(path.stem, loader, origin=str(path))
    module = importlib.util.module_from_spec(module_spec)
    guarded(f"{path}: importing it", lambda: loader.exec_module(module))
    if not hasattr(module, class_name):
        raise TargetError(f"{path} defines no {class_name!r}")
    cls = getattr(module, class_name)
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise TargetError(f"{path}:{class_name}: {class_name} is a {type(cls).__name__}, not a torch.nn.Module class")
    return cls


def instantiate(path: str | Path, class_name: str, sha256: str | None = None):
    """An instance of path:class_name, made without arguments (the import and the call guarded)."""
    cls = import_module_class(path, class_name, sha256)
    return guarded(f"{path}:{class_name}() (made without arguments)", cls)


def split_module_target(target: str) -> tuple[str, str] | None:
    """("path/to/file.py", "ClassName") for a module target, else None."""
    if ":" in target and target.split(":", 1)[0].endswith(".py"):
        path, _, class_name = target.partition(":")
        return path, class_name
    return None


def load_target(target: str) -> Union[NetSpec, "object"]:
    """A preset name, a spec JSON file, or path/to/file.py:ClassName -> NetSpec or an nn.Module instance."""
    if target in presets.PRESETS:
        return presets.PRESETS[target]
    module_target = split_module_target(target)
    if module_target:
        return instantiate(*module_target)
    path = Path(target)
    if not path.is_file():
        raise TargetError(f"{target!r} is neither a preset ({', '.join(presets.PRESETS)}), a spec JSON file, "
                          "nor path/to/file.py:ClassName")
    if path.suffix == ".py":
        raise TargetError(f"{target}: a Python file needs the class after a colon, {target}:ClassName")
    try:
        return NetSpec.from_file(path)
    except SpecError as exc:
        if "the map must stay at least 1x1" in str(exc):
            raise RefusedSpec(str(exc)) from None
        raise TargetError(str(exc)) from None

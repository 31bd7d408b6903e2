"""What `check` and `certify` take: a preset name, a spec JSON file, or path/to/file.py:ClassName."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Union

from models import presets
from models.spec import NetSpec, SpecError


class TargetError(ValueError):
    """A target that names nothing usable; the message says what was expected."""


class RefusedSpec(TargetError):
    """A spec that describes no network the rules allow (its maps shrink below 1x1): refused (exit 1), not unusable."""


def import_module_class(path: str | Path, class_name: str):
    """The class `class_name` defined in the Python file at `path`; it must be a torch.nn.Module subclass."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise TargetError(f"{path}: no such file")
    try:
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    except Exception as exc:
        raise TargetError(f"{path} could not be imported: {type(exc).__name__}: {exc}") from None
    if not hasattr(module, class_name):
        raise TargetError(f"{path} defines no {class_name!r}")
    cls = getattr(module, class_name)
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise TargetError(f"{path}:{class_name}: {class_name} is a {type(cls).__name__}, not a torch.nn.Module class")
    return cls


def instantiate(path: str | Path, class_name: str):
    cls = import_module_class(path, class_name)
    try:
        return cls()
    except Exception as exc:
        raise TargetError(f"{path}:{class_name}() could not be instantiated without arguments: "
                          f"{type(exc).__name__}: {exc}") from None


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
        return NetSpec.from_json(path.read_text())
    except SpecError as exc:
        if "the map must stay at least 1x1" in str(exc):
            raise RefusedSpec(f"{path}: {exc}") from None
        raise TargetError(f"{path}: {exc}") from None

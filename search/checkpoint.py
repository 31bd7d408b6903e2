"""Checkpoint files: their sha256, their payload read with weights_only loading and its fields checked, and the
module they describe rebuilt with its weights. A module of one's own is imported only from the file the command line
names, never from the path a checkpoint records."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import torch

from models.budget import count_params
from models.build import build
from models.load import SourceMismatch, TargetError, instantiate, split_module_target
from models.spec import MAX_BUILT_PARAMS, NetSpec, SpecError
from search.certificate_errors import CheckpointError, EvidenceMismatch
from search.fsio import atomic_write

CHECKPOINT_FORMAT = "budgetnas-checkpoint-1"
MAX_CHECKPOINT_BYTES = 64_000_000  # a checkpoint of 20,000 parameters takes about 100 KB


def sha256_file(path: str | Path, max_bytes: int = MAX_CHECKPOINT_BYTES) -> str:
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise CheckpointError(f"{path}: {size:,} bytes, over the {max_bytes:,} allowed for a checkpoint")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def spec_digest(spec: NetSpec) -> str:
    """The sha256 of a spec's compact JSON, the form a checkpoint stores."""
    return hashlib.sha256(spec.to_json(indent=None).encode("utf-8")).hexdigest()



def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint's payload, loading only tensors and plain data (weights_only=True), with its fields checked."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    sha256_file(path)  # refuses one over MAX_CHECKPOINT_BYTES before it is loaded
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: refused, not a plain weights file ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a budgetnas checkpoint (no '{CHECKPOINT_FORMAT}' marker)")
    state = payload.get("state_dict")
    module = payload.get("module")
    problems = [
        not (isinstance(state, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                             for k, v in state.items())) and "state_dict is not a dict of tensors",
        not isinstance(payload.get("config"), dict) and "config is not an object",
        not isinstance(payload.get("test_acc"), float) and "test_acc is not a number",
        not (isinstance(payload.get("spec"), str) or (isinstance(module, dict) and isinstance(module.get("path"), str)
                                                      and isinstance(module.get("class"), str)))
        and "neither a spec nor a module path and class"]
    problems = [p for p in problems if p]
    if problems:
        raise CheckpointError(f"{path}: damaged budgetnas checkpoint: {'; '.join(problems)}")
    return payload


def rebuild(payload: dict, path: Path, module_target: str | None = None) -> torch.nn.Module:
    """The module a checkpoint describes, with its weights. A module of one's own is imported only from
    `module_target` (the command line's path.py:Class), never from the path the checkpoint names."""
    try:
        if "spec" in payload:
            spec = NetSpec.from_json(payload["spec"], where=f"{path}: spec")
            if count_params(spec) > MAX_BUILT_PARAMS:
                raise CheckpointError(f"{path}: its spec counts {count_params(spec):,} parameters, over the "
                                      f"{MAX_BUILT_PARAMS:,} a checkpoint may rebuild")
            module = build(spec)
        elif module_target is None:
            raise CheckpointError(
                f"{path} names the module file {payload['module']['path']}:{payload['module']['class']}; a file named "
                "inside a checkpoint is imported only when the command line names it too: --module PATH.py:CLASS")
        else:
            file, class_name = split_module_target(module_target) or (module_target, "")
            module = instantiate(file, class_name, payload["module"].get("sha256"))
        module.load_state_dict(payload["state_dict"])
    except CheckpointError:
        raise
    except SourceMismatch as exc:
        raise EvidenceMismatch("module.sha256", f"the source {payload['module'].get('sha256')}",
                               f"{exc}") from None
    except (SpecError, TargetError) as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: network and weights do not match: {str(exc).splitlines()[0][:200]}") from None
    return module


def load_checkpoint(path: str | Path, module_target: str | None = None) -> tuple[torch.nn.Module, dict]:
    """Rebuild the module from a checkpoint (a module of one's own from `module_target`, the command line's)."""
    payload = read_checkpoint(path)
    return rebuild(payload, Path(path), module_target), payload


def save_checkpoint(path: Path, module: torch.nn.Module, c, cfg, test_acc: float) -> Path:
    """The weights and what rebuilds the module: the spec JSON of `c` (a search.retrain.Certifiable), or the file,
    class and source digest of a module of one's own (imported again only from a file the command line names)."""
    payload = {"format": CHECKPOINT_FORMAT, "config": cfg.to_dict(), "test_acc": test_acc,
               "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()}}
    if c.spec is not None:
        payload["spec"] = c.spec.to_json(indent=None)
    else:
        payload["module"] = c.module_record()
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return atomic_write(path, lambda f: f.write(buffer.getvalue()))

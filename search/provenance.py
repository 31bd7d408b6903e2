"""Where a result came from: the code version, Python, torch, Optuna and the host, stored with studies and
certificates."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import optuna


def provenance() -> dict:
    import torch

    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent.parent, timeout=5).stdout.strip()
    except Exception:
        commit = ""
    return {"code": commit or "unknown", "python": platform.python_version(), "torch": torch.__version__,
            "optuna": optuna.__version__, "host": platform.node()}

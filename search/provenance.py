"""Where a result came from: the code version, Python, torch, Optuna, the host and its CPU, stored with studies and
certificates.

The CPU is named down to its family, model and stepping: the same code, seed and recipe certified `micro` a tenth of
a point apart on two days, both on "2-core AMD EPYC" machines (docs/recipe.md), and "AMD EPYC" alone, all a virtual
machine's model name may say, does not tell two CPU generations apart."""

from __future__ import annotations

import os
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
            "optuna": optuna.__version__, "host": platform.node(), "cpu": cpu_identity()}


def cpu_identity(cpuinfo: str | None = None) -> str:
    """"AMD EPYC (family 26, model 2, stepping 1), 2 threads": the first processor of /proc/cpuinfo (or of the text
    given), with the threads this process may use; platform.processor() where there is no /proc/cpuinfo."""
    from search.engine.runtime import cpu_fields, cpuinfo_fields

    fields = cpu_fields() if cpuinfo is None else cpuinfo_fields(cpuinfo)
    name = fields.get("model name") or platform.processor() or "unknown CPU"
    detail = ", ".join(f"{k.split()[-1]} {fields[k]}" for k in ("cpu family", "model", "stepping") if k in fields)
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name}{f' ({detail})' if detail else ''}, {threads} threads"

"""The certificate and front.json files read with bounds (size, UTF-8, JSON depth) and checked against their schemas:
step 1 of search/certificate.py's verification. A refusal is a CertificateError naming the field."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

from models.spec import NetSpec, SpecError, read_json_file
from search.budgets import METRICS
from search.certificate_errors import CertificateError
from search.engine import TrainConfig

MAX_CERTIFICATE_BYTES = 16_000_000  # 10 seeds of 1,000 epochs take about 2 MB
MAX_SEEDS = 100
MAX_EPOCH_RECORDS = 1_000
SOURCE_KINDS = ("trial", "preset", "spec", "module")

Check = Callable[[Any, str], None]


def _refuse(where: str, expected: str, value: Any) -> None:
    shown = repr(value)
    raise CertificateError(f"{where}: {expected}, got {shown[:80]}{'...' if len(shown) > 80 else ''}")


def number(lo: float | None = None, hi: float | None = None, nan_ok: bool = False) -> Check:
    def check_number(value, where):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            _refuse(where, "must be a number", value)
        if math.isnan(value):
            if not nan_ok:
                _refuse(where, "must be a number, not NaN", value)
            return
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            _refuse(where, f"must be from {lo} to {hi}" if hi is not None else f"must be at least {lo}", value)
    return check_number


def integer(lo: int = 0, hi: int | None = None) -> Check:
    def check_integer(value, where):
        if not isinstance(value, int) or isinstance(value, bool) or value < lo or (hi is not None and value > hi):
            _refuse(where, f"must be an integer of at least {lo:,}" + (f" and at most {hi:,}" if hi else ""), value)
    return check_integer


def text(max_len: int = 4096, choices: tuple[str, ...] | None = None) -> Check:
    def check_text(value, where):
        if not isinstance(value, str) or "\0" in value or len(value) > max_len:
            _refuse(where, f"must be text of at most {max_len:,} characters", value)
        if choices is not None and value not in choices:
            _refuse(where, f"must be one of {choices}", value)
    return check_text


def flag(value, where) -> None:
    if not isinstance(value, bool):
        _refuse(where, "must be true or false", value)


def digest(value, where) -> None:
    if not (isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)):
        _refuse(where, "must be a sha256 digest (64 hex digits); a certificate from before budgetnas recorded "
                       "digests must be certified again", value)


def optional(inner: Check) -> Check:
    return lambda value, where: None if value is None else inner(value, where)


def list_of(inner: Check, lo: int, hi: int) -> Check:
    def check_list(value, where):
        if not isinstance(value, list) or not lo <= len(value) <= hi:
            _refuse(where, f"must be a list of {lo:,} to {hi:,} entries", value if not isinstance(value, list)
                    else f"a list of {len(value):,}")
        for i, item in enumerate(value):
            inner(item, f"{where}[{i}]")
    return check_list


def obj(required: dict[str, Check], optional_fields: dict[str, Check] | None = None) -> Check:
    """An object with these fields (others are ignored)."""
    def check_obj(value, where):
        if not isinstance(value, dict):
            _refuse(where, "must be an object", value)
        for name, inner in required.items():
            if name not in value:
                raise CertificateError(f"{where}.{name}: missing")
            inner(value[name], f"{where}.{name}")
        for name, inner in (optional_fields or {}).items():
            if name in value:
                inner(value[name], f"{where}.{name}")
    return check_obj


def mapping(value, where) -> None:
    if not isinstance(value, dict) or not all(isinstance(k, str) and (v is None or isinstance(v, (str, int, float)))
                                              for k, v in value.items()):
        _refuse(where, "must be an object of plain values", value)


EPOCH = obj({"epoch": integer(1), "test_acc": number(0, 1, nan_ok=True)},
            {k: number(nan_ok=True) for k in ("train_loss", "train_acc", "test_loss", "lr", "seconds")})
RUN = obj({"seed": integer(0), "status": text(100), "final_test_acc": number(0, 1, nan_ok=True),
           "epochs": list_of(EPOCH, 0, MAX_EPOCH_RECORDS), "checkpoint": text(), "checkpoint_sha256": digest},
          {"precision": text(10, ("bf16", "fp32")), "first_epoch_reaching_target": optional(integer(1)),
           "step_path": text(30), "fallback": optional(text())})
RULE = obj({"rule": text(500), "figure": text(), "pass": flag})
CERTIFICATE = obj(
    {"name": text(200), "source": obj({"kind": text(20, SOURCE_KINDS)}), "n_params": integer(0),
     "config": lambda v, w: None if isinstance(v, dict) else _refuse(w, "must be an object", v),
     "seeds": list_of(RUN, 1, MAX_SEEDS), "final_test_acc_mean": number(0, 1, nan_ok=True),
     "final_test_acc_std": number(0, 1, nan_ok=True),
     "dataset": obj({"name": text(100), "mean": number(-1e6, 1e6), "std": number(1e-9, 1e6),
                     "classes": integer(1, 512)}, {"md5": mapping}),
     "target": optional(number(0, 1)), "max_params": integer(1), "rules": list_of(RULE, 1, 20), "certified": flag},
    {"study": optional(text(200)), "trial": optional(integer(0)), "val_acc": optional(number(0, 1, nan_ok=True)),
     "receptive_field": optional(integer(0)), "macs": optional(integer(0)), "spec_sha256": digest,
     "seeds_reaching_target": optional(integer(0)), "device": text(100), "wall_s": number(0, nan_ok=True),
     "versions": mapping,
     "module": optional(obj({"path": text(), "class": text(200), "sha256": digest}))})


def validate_certificate(cert: Any, where: str) -> dict:
    """`cert` if it has every field the schema names, with its type; CertificateError naming the first that is not."""
    CERTIFICATE(cert, where)
    if (cert.get("spec") is None) == (cert.get("module") is None):
        raise CertificateError(f"{where}: must hold a spec or a module, one of the two")
    if cert.get("spec") is not None:
        try:
            NetSpec.from_dict(cert["spec"])
        except SpecError as exc:
            raise CertificateError(f"{where}.spec: {exc}") from None
        if "spec_sha256" not in cert:
            raise CertificateError(f"{where}.spec_sha256: missing (a certificate from before budgetnas recorded "
                                   "digests, or an edited one); certify it again")
    try:
        TrainConfig.from_dict(cert["config"])
    except (TypeError, ValueError) as exc:
        raise CertificateError(f"{where}.config: {exc}") from None
    seeds = [r["seed"] for r in cert["seeds"]]
    if len(set(seeds)) != len(seeds):
        raise CertificateError(f"{where}.seeds: seed numbers repeat ({', '.join(map(str, seeds))})")
    return cert


def read_certificate(path: str | Path) -> dict:
    """A certificate file, read with bounds and checked against the schema (CertificateError naming the file)."""
    data = read_json_file(path, str(path), MAX_CERTIFICATE_BYTES, CertificateError, kind="a certificate")
    return validate_certificate(data, str(path))


FRONT_ENTRY = obj({"trial": integer(0), "n_params": integer(0), "val_acc": optional(number(0, 1, nan_ok=True)),
                   "test_acc_mean": number(0, 1, nan_ok=True), "test_acc_std": number(0, 1, nan_ok=True),
                   "test_acc_per_seed": list_of(number(0, 1, nan_ok=True), 1, MAX_SEEDS), "certified": flag,
                   "failed_rules": list_of(text(500), 0, 20), "reused": flag, "certificate": text()},
                  # Absent from a front.json written before it held them; each must then be its certificate's.
                  {"macs": integer(0), "activation_bytes": integer(0), "model_bytes": integer(0)})
FRONT = obj({"study": text(200), "floor": number(0, 1), "seeds": integer(1, MAX_SEEDS),
             "target": optional(number(0, 1)), "entries": list_of(FRONT_ENTRY, 0, 10_000)},
            {"size_metric": text(30, METRICS)})


def read_front_file(path: str | Path) -> dict:
    """front.json, read with bounds and checked against its schema (CertificateError naming the file)."""
    front = read_json_file(path, str(path), MAX_CERTIFICATE_BYTES, CertificateError, kind="front.json")
    FRONT(front, str(path))
    return front

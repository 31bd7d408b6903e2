"""The files certification leaves and the report reads: <results>/certified/<name>/certificate.json, the study's
best.json (a copy of the latest certificate `best` wrote) and front.json (one entry per certified front trial),
each read back only once its evidence verifies (search/certificate.py)."""

from __future__ import annotations

import json
from pathlib import Path

from models.spec import NetSpec
from search.budgets import ATTRS, figures
from search.certificate import CertificateError, CheckpointError, EvidenceMismatch, read_certificate, verify
from search.certificate_schema import read_front_file
from search.data import DataError
from search.fsio import atomic_write_text


def certificate_dir(results_dir: str, name: str) -> Path:
    """The folder of one network's certificate and checkpoints."""
    return Path(results_dir) / "certified" / name


def reusable_certificate(results_dir: str, c, seeds: int, target: float, max_params: int,
                         data_dir: str | None = None) -> tuple[dict | None, str | None]:
    """(certificate, None): one already written for `c` (a search.retrain.Certifiable) with the same spec, recipe,
    seeds, target and budget, whose evidence bears it out (digests, checkpoints, the rules judged again, every seed's
    test accuracy measured again: search/certificate.py). (None, why) when there is one that cannot be reused;
    (None, None) when there is none to reuse."""
    path = certificate_dir(results_dir, c.name) / "certificate.json"
    if c.spec is None or not path.exists():
        return None, None
    try:
        cert = read_certificate(path)
    except CertificateError as exc:
        return None, str(exc)
    same = (cert.get("spec") == json.loads(c.spec.to_json()) and cert["config"] == c.cfg.to_dict()
            and len(cert["seeds"]) == seeds and cert["target"] == target and cert["max_params"] == max_params)
    if not same:
        return None, None
    try:
        verify(cert, near=[path.parent], data_dir=data_dir)
    except (CertificateError, CheckpointError, EvidenceMismatch, DataError) as exc:
        return None, f"{path}: {exc}"
    return cert, None


def write_best(results_dir: str, result: dict) -> Path:
    return atomic_write_text(Path(results_dir) / result["study"] / "best.json", json.dumps(result, indent=2))


# A front entry's figures other than parameters, (metric, trials.csv column): computed from the certificate's spec
# (models/resources.py), so that a study bounded by another size metric lists its own.
OTHER_FIGURES = tuple((metric, column) for metric, column in ATTRS.items() if metric != "params")


def _spec_figures(c: dict) -> dict:
    by_metric = figures(NetSpec.from_dict(c["spec"]))
    return {column: by_metric[metric] for metric, column in OTHER_FIGURES}


def _front_entry(c: dict, reused: bool, results_dir: str) -> dict:
    return {"trial": c["trial"], "n_params": c["n_params"], **_spec_figures(c), "val_acc": c["val_acc"],
            "test_acc_mean": c["final_test_acc_mean"], "test_acc_std": c["final_test_acc_std"],
            "test_acc_per_seed": [r["final_test_acc"] for r in c["seeds"]], "certified": c["certified"],
            "failed_rules": [r["rule"] for r in c["rules"] if not r["pass"]], "reused": reused,
            "certificate": str(certificate_dir(results_dir, c["name"]) / "certificate.json")}


def write_front(study_name: str, floor: float, seeds: int, certs: list[tuple[dict, bool]], results_dir: str,
                size_metric: str = "params") -> dict:
    """Write front.json (one entry per certified front trial, smallest first, with its four size figures and its
    validation and test accuracy; `size_metric`: the study's, the one its tables show) and return what it holds."""
    entries = [_front_entry(c, reused, results_dir) for c, reused in certs]
    result = {"study": study_name, "floor": floor, "seeds": seeds, "target": certs[0][0]["target"] if certs else None,
              "size_metric": size_metric, "entries": entries}
    atomic_write_text(Path(results_dir) / study_name / "front.json", json.dumps(result, indent=2))
    return result


front_summary = write_front  # the name from before it said that it writes the file


def _verified_certificate(path: Path, results_dir: str) -> dict:
    """A certificate read and verified as far as the report goes: schema, digests, what its checkpoints record,
    the rules judged again (search/certificate.py, steps 1 to 3; nothing is measured)."""
    cert = read_certificate(path)
    verify(cert, near=[path.parent, certificate_dir(results_dir, Path(cert["name"]).name)], measure=False)
    return cert


def read_best(results_dir: str, study_name: str) -> tuple[dict | None, str | None]:
    """best.json, verified: (certificate, None), (None, why it is not shown), or (None, None) when there is none."""
    path = Path(results_dir) / study_name / "best.json"
    if not path.exists():
        return None, None
    try:
        return _verified_certificate(path, results_dir), None
    except (CertificateError, CheckpointError, EvidenceMismatch) as exc:
        return None, f"{path} is not shown: {exc}"


def _checked_front_entry(entry: dict, results_dir: str) -> tuple[dict, str | None]:
    """(the entry, why it is not shown or None): not shown where its certificate does not verify, is no trial's, or
    does not hold the entry's figures. An entry written before front.json held the figures other than parameters
    comes back with them, from its certificate."""
    named = Path(entry["certificate"])
    path = named if named.is_file() else certificate_dir(results_dir, named.parent.name) / "certificate.json"
    try:
        cert = _verified_certificate(path, results_dir)
    except (CertificateError, CheckpointError, EvidenceMismatch) as exc:
        return entry, f"trial {entry['trial']}: {exc}"
    if cert.get("spec") is None:  # a module's certificate: no spec to count from, and no trial of a study
        return entry, f"trial {entry['trial']}: {path} certifies a module, not a trial"
    expected = _front_entry(cert, entry["reused"], results_dir)
    entry = {**{column: expected[column] for _, column in OTHER_FIGURES}, **entry}
    for key, value in expected.items():
        if key != "certificate" and entry[key] != value and not (value != value and entry[key] != entry[key]):
            return entry, f"trial {entry['trial']}: {key}: front.json says {entry[key]!r}, its certificate {value!r}"
    return entry, None


def read_front(results_dir: str, study_name: str) -> tuple[dict | None, list[str]]:
    """front.json with only the entries whose certificates verify: (front or None, why entries are not shown)."""
    path = Path(results_dir) / study_name / "front.json"
    if not path.exists():
        return None, []
    try:
        front = read_front_file(path)
    except CertificateError as exc:
        return None, [f"{path} is not shown: {exc}"]
    checked = [_checked_front_entry(e, results_dir) for e in front["entries"]]
    front = {**front, "entries": [e for e, problem in checked if problem is None]}
    return front, [f"{path}: an entry is not shown: {problem}" for _, problem in checked if problem]

"""A certificate verified against its evidence: its checkpoints, the rules judged again, the test images measured again.

A certificate claims; its checkpoints are the evidence. It records the sha256 of each seed's checkpoint file and of
the spec (or of the module's source file), and each checkpoint records the spec or module, the training config and
the test accuracy it reached. Verification, cheapest first:

1. the file: at most MAX_CERTIFICATE_BYTES, UTF-8, JSON nested at most MAX_JSON_DEPTH deep, every field the schema
   names present with its type (`CertificateError`: unusable, exit 2);
2. each checkpoint's digest, then what it records (spec, module, config, seed, test accuracy) against the
   certificate (`EvidenceMismatch`: exit 1, naming the field and both values);
3. the rules judged again from the evidence: parameters counted on the rebuilt module, epochs from the config, the
   fully connected verdict on the module;
4. (`export`, and `best --front` before it reuses a certificate) every seed's test accuracy measured again on the
   test images and compared with the certificate's figure to 0.01 points.

The report stops after step 2 (it trains and measures nothing). Digests are not signatures: whoever can write the
files can recompute them; steps 3 and 4 are what such an edit cannot pass.

No file named inside a certificate or checkpoint is imported: a module's certificate is verified only with the
module file named on the command line (`export --module path.py:Class`), whose source digest must match.

This module does steps 2 to 4. Step 1 is search/certificate_schema.py; the checkpoint files, search/checkpoint.py;
the rules' rows, search/verdicts.py; the errors, search/certificate_errors.py. Their names stay importable here.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from models.budget import analyze
from models.load import TargetError, guarded, source_digest, split_module_target
from models.rules import RULES
from models.spec import NetSpec, SpecError
from search.certificate_errors import CertificateError, CheckpointError, EvidenceMismatch
from search.certificate_schema import (MAX_CERTIFICATE_BYTES, read_certificate, read_front_file,  # noqa: F401
                                       validate_certificate)
from search.checkpoint import (CHECKPOINT_FORMAT, load_checkpoint, read_checkpoint, rebuild,  # noqa: F401
                               sha256_file, spec_digest)
from search.data import load_data
from search.engine import TrainConfig, evaluate, to_device
from search.verdicts import accuracy_row, judge_rules  # noqa: F401

TOLERANCE = 0.0001  # accuracy, as a fraction: 0.01 points, one image in 10,000


def percent_pair(a: float, b: float) -> tuple[str, str]:
    """Two accuracies in percent, to 0.01 points unless that shows them equal."""
    digits = 2 if f"{a:.2%}" != f"{b:.2%}" else 4
    return f"{a:.{digits}%}", f"{b:.{digits}%}"


# ---- the evidence ----------------------------------------------------------------------------------------------

@dataclass
class SeedEvidence:
    seed: int
    path: Path  # the checkpoint file
    payload: dict
    module: torch.nn.Module | None = None  # rebuilt with its weights; None when only read (the report)


def find_checkpoint(run: dict, index: int, near: Sequence[Path]) -> Path:
    """The checkpoint a seed names, or one of that name in `near` (the certificate moved, or a relative path read
    from elsewhere)."""
    named = Path(run["checkpoint"])
    for candidate in (named, *(Path(folder) / named.name for folder in near)):
        if candidate.is_file():
            return candidate
    raise CertificateError(f"seeds[{index}].checkpoint: {named} not found (nor beside the certificate)")


def check_module_option(cert: dict, module_target: str | None) -> None:
    """A module's certificate needs the module file on the command line, with the source the certificate recorded;
    a spec's certificate takes none."""
    recorded = cert.get("module")
    if recorded is None:
        if module_target is not None:
            raise CertificateError(f"--module {module_target}: the certificate is of a spec, which needs no module")
        return
    if module_target is None:
        raise CertificateError(
            f"the certificate is of the module {recorded['path']}:{recorded['class']}; a file named inside a "
            "certificate is imported only when the command line names it too: give --module PATH.py:CLASS")
    parts = split_module_target(module_target)
    if parts is None:
        raise CertificateError(f"--module {module_target!r}: must be path/to/file.py:ClassName")
    if parts[1] != recorded["class"]:
        raise EvidenceMismatch("module.class", repr(recorded["class"]), f"--module names {parts[1]!r}")
    try:
        found = source_digest(parts[0])
    except TargetError as exc:
        raise CertificateError(f"--module: {exc}") from None
    if found != recorded["sha256"]:
        raise EvidenceMismatch("module.sha256", recorded["sha256"], f"{parts[0]} has the source sha256 {found}")


def _same(a: float, b: float, tolerance: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tolerance + 1e-12


def compare_spec(cert: dict, payload: dict, name: str) -> None:
    """The certificate's spec (and its recorded digest) against the checkpoint's, or its module against the module
    the checkpoint names."""
    if cert.get("spec") is not None:
        claimed = spec_digest(NetSpec.from_dict(cert["spec"]))
        if claimed != cert["spec_sha256"]:
            raise EvidenceMismatch("spec_sha256", cert["spec_sha256"], f"its own spec has the sha256 {claimed}")
        if "spec" not in payload:
            raise EvidenceMismatch("spec", f"a spec of sha256 {claimed}", f"{name} holds a module, not a spec")
        try:
            held = spec_digest(NetSpec.from_json(payload["spec"], where=f"{name}: spec"))
        except SpecError as exc:
            raise CheckpointError(str(exc)) from None
        if held != claimed:
            raise EvidenceMismatch("spec", f"a spec of sha256 {claimed}", f"{name} holds a spec of sha256 {held}")
        return
    recorded, held = cert["module"], payload.get("module") or {}
    if "spec" in payload or held.get("class") != recorded["class"] or held.get("sha256") != recorded["sha256"]:
        found = "a spec" if "spec" in payload else f"the module {held.get('class')!r} of source sha256 " \
                                                   f"{held.get('sha256')}"
        raise EvidenceMismatch("module", f"the module {recorded['class']!r} of source sha256 {recorded['sha256']}",
                               f"{name} holds {found}")


def compare_payload(cert: dict, index: int, payload: dict, name: str) -> None:
    """What a seed's checkpoint records (spec or module, config, seed, test accuracy) against the certificate."""
    run = cert["seeds"][index]
    compare_spec(cert, payload, name)
    trained = dict(payload["config"])
    seed = trained.pop("seed", None)
    if seed != run["seed"]:
        raise EvidenceMismatch(f"seeds[{index}].seed", str(run["seed"]), f"{name} was trained with seed {seed!r}")
    claimed = {k: v for k, v in cert["config"].items() if k != "seed"}
    for key in sorted(set(trained) | set(claimed)):
        if trained.get(key) != claimed.get(key):
            raise EvidenceMismatch(f"config.{key}", repr(claimed.get(key)),
                                   f"{name} was trained with {trained.get(key)!r}")
    if not _same(payload["test_acc"], run["final_test_acc"], 1e-12):
        said, found = percent_pair(run["final_test_acc"], payload["test_acc"])
        raise EvidenceMismatch(f"seeds[{index}].final_test_acc", said, f"{name} recorded {found}")


def read_evidence(cert: dict, near: Sequence[Path], module_target: str | None = None,
                  rebuild_modules: bool = True) -> list[SeedEvidence]:
    """Each seed's checkpoint: found, its digest checked, its records compared with the certificate, and (with
    `rebuild_modules`) its module rebuilt with its weights."""
    if rebuild_modules:
        check_module_option(cert, module_target)
    evidence = []
    for i, run in enumerate(cert["seeds"]):
        path = find_checkpoint(run, i, near)
        found = sha256_file(path)
        if found != run["checkpoint_sha256"]:
            raise EvidenceMismatch(f"seeds[{i}].checkpoint_sha256", run["checkpoint_sha256"],
                                   f"{path} has the sha256 {found}")
        payload = read_checkpoint(path)
        compare_payload(cert, i, payload, path.name)
        module = rebuild(payload, path, module_target) if rebuild_modules else None
        evidence.append(SeedEvidence(run["seed"], path, payload, module))
    return evidence


def _describe(rule: dict | None) -> str:
    return "no such rule" if rule is None else f"'{rule['rule']}' {'PASS' if rule['pass'] else 'FAIL'} " \
                                               f"({rule['figure']})"


def compare_rules(cert: dict, rules: list[dict], n_params: int, finals: list[float], figures: bool = True) -> None:
    """The certificate's figures and verdicts against those judged again from the evidence (`figures` False: the
    verdicts only, for accuracies measured again, which may differ from the recorded ones in the last digit)."""
    if cert["n_params"] != n_params:
        raise EvidenceMismatch("n_params", f"{cert['n_params']:,}", f"the rebuilt network counts {n_params:,}")
    claimed = cert["rules"]
    for i in range(max(len(claimed), len(rules))):
        said, judged = (claimed[i] if i < len(claimed) else None), (rules[i] if i < len(rules) else None)
        # The fully connected rule's figure is the verdict's wording, which a later budgetnas may phrase otherwise.
        figure_differs = judged is not None and said is not None and judged["rule"] != RULES.fc_rule() and \
            said["figure"] != judged["figure"] and figures
        if said is None or judged is None or said["rule"] != judged["rule"] or said["pass"] != judged["pass"] \
                or figure_differs:
            raise EvidenceMismatch(f"rules[{i}]", _describe(said), f"judged from the evidence: {_describe(judged)}")
    passed = all(r["pass"] for r in rules)
    if cert["certified"] != passed:
        raise EvidenceMismatch("certified", str(cert["certified"]).lower(),
                               f"the rules judged from the evidence {'all pass' if passed else 'do not all pass'}")
    _, mean, std = accuracy_row(finals, cert["target"], cert["dataset"]["name"])
    for name, value in (("final_test_acc_mean", mean), ("final_test_acc_std", std)):
        if not _same(cert[name], value, 1e-9):
            said, found = percent_pair(cert[name], value)
            raise EvidenceMismatch(name, said, f"the seeds' accuracies give {found}")


@dataclass
class Verified:
    """A certificate whose claims its evidence bears out."""

    cert: dict
    evidence: dict[int, SeedEvidence]  # by seed
    accuracy: dict[int, float]  # final-epoch test accuracy by seed: measured again, or as recorded
    rules: list[dict]  # judged again from the evidence
    n_params: int
    measured: bool
    test: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)  # normalised images, labels

    @property
    def spec(self) -> NetSpec | None:
        payload = next(iter(self.evidence.values())).payload
        return NetSpec.from_json(payload["spec"]) if "spec" in payload else None


def _static_rules(cert: dict, evidence: list[SeedEvidence]) -> tuple[list[dict], int]:
    first = evidence[0]
    spec = NetSpec.from_json(first.payload["spec"]) if "spec" in first.payload else None
    if spec is not None:
        analysis = analyze(spec)
        for name, value in (("receptive_field", analysis.receptive_field), ("macs", analysis.macs)):
            if cert.get(name) != value:
                said = "nothing" if cert.get(name) is None else f"{cert[name]:,}"
                raise EvidenceMismatch(name, said, f"the spec of {first.path.name} gives {value:,}")
    try:
        epochs = TrainConfig.from_dict(first.payload["config"]).epochs
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{first.path}: config: {exc}") from None
    try:
        module = copy.deepcopy(first.module)  # the verdict runs it in train and eval mode
    except Exception:  # a module of one's own that cannot be copied: judged as it is, measured in eval mode after
        module = first.module
    rows, n_params, _ = judge_rules(module, spec, epochs, cert["dataset"]["classes"], cert["max_params"])
    return rows, n_params


def _with_accuracy(cert: dict, rows: list[dict], accuracy: dict[int, float]) -> list[dict]:
    finals = [accuracy[r["seed"]] for r in cert["seeds"]]
    return rows[:3] + [accuracy_row(finals, cert["target"], cert["dataset"]["name"])[0]] + rows[3:]


def remeasure(cert: dict, evidence: list[SeedEvidence], x: torch.Tensor, y: torch.Tensor) -> dict[int, float]:
    """Each seed's test accuracy measured on (x, y), in the precision it was recorded in, compared with the
    certificate's figure to 0.01 points."""
    measured = {}
    for i, (run, e) in enumerate(zip(cert["seeds"], evidence)):
        acc = guarded(f"{e.path.name}: the network's forward on the test images",
                      lambda: evaluate(e.module, x, y, bf16=run.get("precision") == "bf16"))[1]
        if not math.isnan(run["final_test_acc"]) and not _same(acc, run["final_test_acc"], TOLERANCE):
            said, found = percent_pair(run["final_test_acc"], acc)
            raise EvidenceMismatch(f"seeds[{i}].final_test_acc", said,
                                   f"{e.path.name} measures {found} on the {len(y):,} test images")
        measured[e.seed] = acc
    return measured


def test_images(cert: dict, data_dir: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The certificate's test set, normalised as it trained, once its record (classes, normalisation, the files'
    md5) is that of the files here: the card and the ONNX metadata tell users how to normalise."""
    record = cert["dataset"]
    data = load_data(data_dir, dataset=record["name"], with_test=True, full_train=True)  # the statistics certify used
    found = data.record()
    for key in ("classes", "mean", "std", "md5"):
        if key in record and record[key] != found[key]:
            raise EvidenceMismatch(f"dataset.{key}", repr(record[key]), f"the {record['name']} files under "
                                   f"{data.root} give {found[key]!r}")
    return to_device(data.test, torch.device("cpu"), data.stats)


def verify(cert: dict, near: Sequence[Path] = (), module_target: str | None = None, data_dir: str | None = None,
           measure: bool = True) -> Verified:
    """Steps 2 to 4 of the module docstring; `measure` False stops before the test images are read."""
    evidence = read_evidence(cert, near, module_target)
    rows, n_params = _static_rules(cert, evidence)
    recorded = {r["seed"]: r["final_test_acc"] for r in cert["seeds"]}
    compare_rules(cert, _with_accuracy(cert, rows, recorded), n_params, list(recorded.values()))
    if not measure:
        return Verified(cert, {e.seed: e for e in evidence}, recorded, _with_accuracy(cert, rows, recorded),
                        n_params, False)
    x, y = test_images(cert, data_dir)
    measured = remeasure(cert, evidence, x, y)
    rules = _with_accuracy(cert, rows, measured)
    compare_rules(cert, rules, n_params, list(recorded.values()), figures=False)
    return Verified(cert, {e.seed: e for e in evidence}, measured, rules, n_params, True, (x, y))

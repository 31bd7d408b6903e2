"""The certificate file and its evidence: read with bounds and a schema, and verified against its checkpoints.

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
"""

from __future__ import annotations

import copy
import hashlib
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from models.budget import analyze, check, check_module, count_params
from models.build import build
from models.load import SourceMismatch, TargetError, guarded, instantiate, source_digest, split_module_target
from models.rules import RULES
from models.spec import MAX_BUILT_PARAMS, NetSpec, SpecError, read_json_file
from search.data import load_data
from search.engine import TrainConfig, evaluate, to_device

CHECKPOINT_FORMAT = "budgetnas-checkpoint-1"
MAX_CERTIFICATE_BYTES = 16_000_000  # 10 seeds of 1,000 epochs take about 2 MB
MAX_CHECKPOINT_BYTES = 64_000_000  # a checkpoint of 20,000 parameters takes about 100 KB
MAX_SEEDS = 100
MAX_EPOCH_RECORDS = 1_000
TOLERANCE = 0.0001  # accuracy, as a fraction: 0.01 points, one image in 10,000
SOURCE_KINDS = ("trial", "preset", "spec", "module")


class CertificateError(ValueError):
    """A certificate that cannot be used: too big, not UTF-8 or JSON, a field missing or of the wrong type, a
    checkpoint missing, or an option that does not fit it (exit 2)."""


class CheckpointError(RuntimeError):
    """A checkpoint that is not ours, is damaged, or holds objects that weights_only loading refuses (exit 2)."""


class EvidenceMismatch(RuntimeError):
    """A certificate whose claim its evidence contradicts (exit 1): the field, the claim, and what was found."""

    def __init__(self, field_name: str, claimed: str, found: str):
        super().__init__(f"{field_name}: the certificate says {claimed}, but {found}")
        self.field_name = field_name


def sha256_file(path: str | Path, max_bytes: int = MAX_CHECKPOINT_BYTES) -> str:
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise CheckpointError(f"{path}: {size:,} bytes, over the {max_bytes:,} allowed for a checkpoint")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def spec_digest(spec: NetSpec) -> str:
    """The sha256 of a spec's compact JSON, the form a checkpoint stores."""
    return hashlib.sha256(spec.to_json(indent=None).encode("utf-8")).hexdigest()


def percent_pair(a: float, b: float) -> tuple[str, str]:
    """Two accuracies in percent, to 0.01 points unless that shows them equal."""
    digits = 2 if f"{a:.2%}" != f"{b:.2%}" else 4
    return f"{a:.{digits}%}", f"{b:.{digits}%}"


# ---- the schema ------------------------------------------------------------------------------------------------

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


# ---- checkpoints -----------------------------------------------------------------------------------------------

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


# ---- the rules, judged again -----------------------------------------------------------------------------------

def judge_rules(module: torch.nn.Module | None, spec: NetSpec | None, epochs: int, classes: int,
                max_params: int = RULES.max_params) -> tuple[list[dict], int, list[str]]:
    """The rules judged without training: (rows, parameters, other reasons the module fails). Rows hold the
    exercise's parameter, fully connected and epoch rules, then `max_params` when it is not the exercise's.
    `module` None: a spec too large to build (over MAX_BUILT_PARAMS), judged on the spec alone."""
    verdicts = [check(spec, max_params)] if spec is not None else []
    if module is not None:
        verdicts.append(check_module(module, max_params=max_params,
                                     num_classes=spec.num_classes if spec is not None else classes))
    n_params = max(v.n_params for v in verdicts)
    reasons = list(dict.fromkeys(r for v in verdicts for r in v.reasons))
    fully_connected = [r for r in reasons if "fully connected" in r]
    other = [r for r in (verdicts[-1].reasons if module is not None else ())
             if "fully connected" not in r and "budget" not in r]
    rows = [
        {"rule": RULES.params_rule(), "figure": f"{n_params:,}", "pass": n_params < RULES.max_params},
        {"rule": RULES.fc_rule(), "figure": "; ".join(fully_connected) or "none: every operation on activations is a known local one (docs/verdict.md)",
         "pass": not fully_connected},
        {"rule": RULES.epochs_rule(), "figure": str(epochs), "pass": epochs <= RULES.max_epochs},
    ]
    if max_params != RULES.max_params:
        rows.append({"rule": f"{RULES.params_rule(max_params)} (the budget asked for, not one of the exercise's "
                             "rules)", "figure": f"{n_params:,}", "pass": n_params < max_params})
    return rows, n_params, other


def accuracy_row(finals: list[float], target: float | None, dataset: str) -> tuple[dict, float, float]:
    """The accuracy rule over the seeds' final-epoch test accuracies: (row, mean, sample sd). `target` None: the
    accuracy is reported, not judged."""
    mean = statistics.fmean(finals)
    std = statistics.stdev(finals) if len(finals) > 1 else 0.0
    shown = RULES.accuracy_text(mean, target)
    figure = f"{shown} +- {std:.2%}" if len(finals) > 1 else f"{shown} (one seed: no spread)"
    if target is None:
        return ({"rule": f"final-epoch test accuracy (mean of {len(finals)}; no target for {dataset}: not judged)",
                 "figure": figure, "pass": True}, mean, std)
    return {"rule": RULES.accuracy_rule(len(finals), target), "figure": figure, "pass": mean >= target}, mean, std


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


# ---- front.json ------------------------------------------------------------------------------------------------

FRONT_ENTRY = obj({"trial": integer(0), "n_params": integer(0), "val_acc": optional(number(0, 1, nan_ok=True)),
                   "test_acc_mean": number(0, 1, nan_ok=True), "test_acc_std": number(0, 1, nan_ok=True),
                   "test_acc_per_seed": list_of(number(0, 1, nan_ok=True), 1, MAX_SEEDS), "certified": flag,
                   "failed_rules": list_of(text(500), 0, 20), "reused": flag, "certificate": text()})
FRONT = obj({"study": text(200), "floor": number(0, 1), "seeds": integer(1, MAX_SEEDS),
             "target": optional(number(0, 1)), "entries": list_of(FRONT_ENTRY, 0, 10_000)})


def read_front_file(path: str | Path) -> dict:
    """front.json, read with bounds and checked against its schema (CertificateError naming the file)."""
    front = read_json_file(path, str(path), MAX_CERTIFICATE_BYTES, CertificateError, kind="front.json")
    FRONT(front, str(path))
    return front

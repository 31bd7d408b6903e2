"""Certification: retrain a network on all 60,000 training images with several seeds, evaluate on the 10,000 test
images after every epoch, save checkpoints and a certificate, and judge it against the four rules.

What is certified (`Certifiable`): a stored trial (`best`, `certify --study S --trial N`), a preset, a spec JSON, or
an nn.Module class of one's own (`certify TARGET`). Every rule that can be judged before training is judged first.
`best --front` certifies every trial on the accuracy/size front above a floor and writes `front.json`.

Files: <results>/certified/<name>/certificate.json and seed<K>.pt (name: the preset, the spec file's or class's
name, or <study>-trial-<N>); <results>/<study>/best.json, a copy of the latest certificate `best` wrote (what the
report shows); <results>/<study>/front.json.

The test set is read here and nowhere else: the search selected on the validation split.
"""

from __future__ import annotations

import io
import json
import platform
import time
from dataclasses import dataclass, replace
from pathlib import Path

import optuna
import torch

from models.budget import analyze, check
from models.build import build
from models.rules import RULES
from models.spec import MAX_BUILT_PARAMS, NetSpec
from search.certificate import (CHECKPOINT_FORMAT, CertificateError, CheckpointError, EvidenceMismatch,  # noqa: F401
                                accuracy_row, judge_rules, load_checkpoint, read_certificate, read_front_file,
                                sha256_file,
                                spec_digest, verify)
from search.data import DataError, load_data
from search.engine import TrainConfig, fit, resolve_device, to_device
from search.fsio import atomic_write, atomic_write_text
from search.record import (Outcome, TrialRecord, best_of, candidates, pareto_front, records, smallest_reaching,
                           study_dataset)
from search.storage import SearchError, provenance


def pick_winner(study: optuna.Study, trial_number: int | None = None, target: float | None = None) -> TrialRecord:
    """The trial to certify: `--trial N`; in pareto studies with a target, the smallest net that reached it;
    otherwise the feasible completed trial with the highest validation accuracy (fewer parameters break ties)."""
    if trial_number is not None:
        matches = [r for r in records(study) if r.number == trial_number]
        if not matches:
            raise SearchError(f"--trial {trial_number}: study {study.study_name!r} has trials 0 to "
                              f"{len(study.get_trials(deepcopy=False)) - 1}")
        chosen = matches[0]
        if not chosen.has_spec or chosen.stored_outcome == Outcome.REJECTED:
            raise SearchError(f"--trial {trial_number}: that trial was {chosen.attrs.get('outcome', 'never built')} "
                              f"({chosen.attrs.get('reason', 'no spec stored')}); pick a trained one")
        return chosen
    done = candidates(study)
    if not done:
        counts = len(study.get_trials(deepcopy=False))
        raise SearchError(f"study {study.study_name!r} has no completed trial within the budget yet "
                          f"({counts} trials stored); run search until one completes")
    if target is not None:
        smallest = smallest_reaching(done, target)
        if smallest is None:
            top = max(r.values[0] for r in done)
            raise SearchError(f"no completed trial reached {target:.2%} validation accuracy (the best has {top:.2%}); "
                              "lower --target or search longer")
        return smallest
    return best_of(done)


def front_to_certify(study: optuna.Study, floor: float) -> list[TrialRecord]:
    """The trials on the accuracy/size front whose validation accuracy is at least `floor`, smallest first."""
    done = candidates(study)
    if not done:
        raise SearchError(f"study {study.study_name!r} has no completed trial within the budget yet; run search "
                          "until one completes")
    front = [r for r in pareto_front(done) if r.values[0] >= floor]
    if not front:
        top = max(r.values[0] for r in done)
        raise SearchError(f"no trial on the front reached the floor of {floor:.2%} validation accuracy (the best has "
                          f"{top:.2%}); lower --floor")
    return front


@dataclass
class Certifiable:
    """A network to certify, with the recipe it trains with."""

    name: str  # its folder under <results>/certified/
    source: dict  # where it came from: {"kind": "trial" | "preset" | "spec" | "module", ...}
    cfg: TrainConfig
    spec: NetSpec | None = None  # None for an nn.Module class of one's own
    module_path: str | None = None  # that class's file and name
    module_class: str | None = None
    val_acc: float | None = None  # a stored trial's validation accuracy
    trial: int | None = None
    study: str | None = None
    dataset: str = "mnist"  # one of search.data.DATASETS
    classes: int = 10  # logits the network must output: its set's classes
    module_sha256: str | None = None  # the module file's source, as first imported: every seed imports the same

    def build(self) -> torch.nn.Module:
        if self.spec is not None:
            return build(self.spec)
        from models.load import instantiate, source_digest

        if self.module_sha256 is None:
            self.module_sha256 = source_digest(self.module_path)
        return instantiate(self.module_path, self.module_class, self.module_sha256)

    def module_record(self) -> dict:
        return {"path": str(Path(self.module_path).resolve()), "class": self.module_class, "sha256": self.module_sha256}

    def label(self) -> str:
        return f"trial {self.trial}" if self.trial is not None else self.name


def from_trial(study: optuna.Study, record: TrialRecord) -> Certifiable:
    name = study.study_name
    return Certifiable(f"{name}-trial-{record.number}", {"kind": "trial", "study": name, "trial": record.number},
                       record.config, spec=record.spec, val_acc=record.values[0] if record.values else None,
                       trial=record.number, study=name, dataset=study_dataset(study))


def with_recipe(c: Certifiable, **overrides) -> Certifiable:
    """The same network with recipe fields replaced (None leaves a field as it is); TrainConfig checks them."""
    changes = {k: v for k, v in overrides.items() if v is not None}
    return replace(c, cfg=TrainConfig(**{**c.cfg.to_dict(), **changes})) if changes else c


def certificate_dir(results_dir: str, name: str) -> Path:
    return Path(results_dir) / "certified" / name


def judge(c: Certifiable, max_params: int = RULES.max_params) -> tuple[list[dict], int, list[str]]:
    """The rules that can be judged without training: (rows, parameters, other reasons), as
    search.certificate.judge_rules. A spec counted over MAX_BUILT_PARAMS is judged on the spec alone, unbuilt."""
    too_big = c.spec is not None and check(c.spec, max_params).n_params > MAX_BUILT_PARAMS
    module = None if too_big else c.build()
    return judge_rules(module, c.spec, c.cfg.epochs, c.spec.num_classes if c.spec is not None else c.classes,
                       max_params)


def refusal_before_training(c: Certifiable, max_params: int = RULES.max_params) -> str | None:
    """Why `c` cannot pass whatever its accuracy (a rule already failed, or a module that does not run), else None."""
    rows, _, other = judge(c, max_params)
    failed = [f"{r['rule']}: {r['figure']}" for r in rows if not r["pass"]] + other
    return "; ".join(failed) or None


def save_checkpoint(path: Path, module: torch.nn.Module, c: Certifiable, cfg: TrainConfig, test_acc: float) -> Path:
    """The weights and what rebuilds the module: the spec JSON, or the file, class and source digest of a module of
    one's own (imported again only from a file the command line names: search/certificate.py)."""
    payload = {"format": CHECKPOINT_FORMAT, "config": cfg.to_dict(), "test_acc": test_acc,
               "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()}}
    if c.spec is not None:
        payload["spec"] = c.spec.to_json(indent=None)
    else:
        payload["module"] = c.module_record()
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return atomic_write(path, lambda f: f.write(buffer.getvalue()))


def _first_epoch_reaching(curve: list[dict], target: float) -> int | None:
    return next((e["epoch"] for e in curve if e["test_acc"] >= target), None)


def _train_seed(c: Certifiable, seed: int, data: tuple, dev, out_dir: Path, target: float | None, log,
                progress: bool | None) -> dict:
    """One seed trained and tested after every epoch; its checkpoint saved; its entry of the certificate."""
    seed_cfg = replace(c.cfg, seed=seed)
    torch.manual_seed(seed)  # a module of one's own keeps its own initialisation, drawn from the seed
    model = c.build()
    # A module of one's own trains as it is, through torch's optimizer (the whole-step path rebuilds a net's
    # step and expects budgetnas's layers).
    history = fit(model, None, None, seed_cfg, device=dev, data_on_device=data, progress=progress,
                  whole_step=None if c.spec is not None else False, reset_weights=c.spec is not None,
                  on_epoch=lambda r: log(f"  seed {seed} epoch {r.epoch:2d}: test {r.val_acc:.2%}"))
    curve = [{"epoch": e.epoch, "train_loss": e.train_loss, "train_acc": e.train_acc, "test_loss": e.val_loss,
              "test_acc": e.val_acc, "lr": e.lr, "seconds": e.seconds} for e in history.epochs]
    final = curve[-1]["test_acc"] if curve and history.status == "completed" else float("nan")
    ckpt = save_checkpoint(out_dir / f"seed{seed}.pt", model, c, seed_cfg, final)
    return {"seed": seed, "status": history.status, "precision": history.precision, "shards": history.shards,
            "step_path": history.step_path, "fallback": history.fallback, "final_test_acc": final, "epochs": curve,
            "first_epoch_reaching_target": _first_epoch_reaching(curve, target) if target else None,
            "checkpoint": str(ckpt), "checkpoint_sha256": sha256_file(ckpt)}


def certify(c: Certifiable, *, seeds: int = 3, data_dir: str | None = None, device: str = "auto",
            results_dir: str = "results", target: float | None = RULES.target_accuracy,
            max_params: int = RULES.max_params, log=print, progress: bool | None = None) -> dict:
    """Train `c` with seeds 0..seeds-1 on all training images of its set, test after every epoch, write the
    certificate (with the sha256 of each checkpoint and of the spec or module source) and one checkpoint per seed
    under <results>/certified/<name>/, and return the certificate.
    `target` None (another set, no target given): the accuracy is reported, not judged."""
    out_dir = certificate_dir(results_dir, c.name)
    rows, n_params, _ = judge(c, max_params)
    dev = resolve_device(device)
    data_set = load_data(data_dir, dataset=c.dataset, with_test=True, full_train=True)
    data = (*to_device(data_set.train, dev, data_set.stats), *to_device(data_set.test, dev, data_set.stats))
    analysis = analyze(c.spec) if c.spec is not None else None
    runs = []
    start = time.perf_counter()
    for seed in range(seeds):
        log(f"seed {seed}: training {c.label()} ({n_params:,} params) on {len(data_set.train):,} {data_set.name} "
            f"images for {c.cfg.epochs} epochs")
        runs.append(_train_seed(c, seed, data, dev, out_dir, target, log, progress))
    finals = [r["final_test_acc"] for r in runs]
    accuracy, mean, std = accuracy_row(finals, target, data_set.name)
    rules = rows[:3] + [accuracy] + rows[3:]
    result = {
        "name": c.name, "source": c.source, "study": c.study, "trial": c.trial,
        "spec": json.loads(c.spec.to_json()) if c.spec is not None else None,
        "spec_sha256": spec_digest(c.spec) if c.spec is not None else None,
        "module": None if c.spec is not None else c.module_record(),
        "n_params": n_params, "receptive_field": analysis.receptive_field if analysis else None,
        "macs": analysis.macs if analysis else None,
        "config": c.cfg.to_dict(), "val_acc": c.val_acc,
        "seeds": runs, "final_test_acc_mean": mean, "final_test_acc_std": std,
        "dataset": data_set.record(),
        "target": target, "max_params": max_params,
        "seeds_reaching_target": sum(f >= target for f in finals) if target else None,
        "rules": rules, "certified": all(r["pass"] for r in rules),
        "device": str(dev), "wall_s": time.perf_counter() - start,
        "versions": {**provenance(), "platform": platform.platform()},
    }
    if result["spec_sha256"] is None:
        del result["spec_sha256"]
    atomic_write_text(out_dir / "certificate.json", json.dumps(result, indent=2))
    return result


def reusable_certificate(results_dir: str, c: Certifiable, seeds: int, target: float, max_params: int,
                         data_dir: str | None = None) -> tuple[dict | None, str | None]:
    """(certificate, None): one already written for this network with the same spec, recipe, seeds, target and
    budget, whose evidence bears it out (digests, checkpoints, the rules judged again, every seed's test accuracy
    measured again: search/certificate.py). (None, why) when there is one that cannot be reused; (None, None) when
    there is none to reuse."""
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


def _front_entry(c: dict, reused: bool, results_dir: str) -> dict:
    return {"trial": c["trial"], "n_params": c["n_params"], "val_acc": c["val_acc"],
            "test_acc_mean": c["final_test_acc_mean"], "test_acc_std": c["final_test_acc_std"],
            "test_acc_per_seed": [r["final_test_acc"] for r in c["seeds"]], "certified": c["certified"],
            "failed_rules": [r["rule"] for r in c["rules"] if not r["pass"]], "reused": reused,
            "certificate": str(certificate_dir(results_dir, c["name"]) / "certificate.json")}


def front_summary(study_name: str, floor: float, seeds: int, certs: list[tuple[dict, bool]], results_dir: str) -> dict:
    """front.json: one entry per certified front trial, smallest first, with its validation and test accuracy."""
    entries = [_front_entry(c, reused, results_dir) for c, reused in certs]
    result = {"study": study_name, "floor": floor, "seeds": seeds, "target": certs[0][0]["target"] if certs else None,
              "entries": entries}
    atomic_write_text(Path(results_dir) / study_name / "front.json", json.dumps(result, indent=2))
    return result


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


def _front_entry_problem(entry: dict, study_name: str, results_dir: str) -> str | None:
    """Why a front.json entry is not shown (its certificate does not verify, or the entry is not its certificate's
    figures), else None."""
    named = Path(entry["certificate"])
    path = named if named.is_file() else certificate_dir(results_dir, named.parent.name) / "certificate.json"
    try:
        cert = _verified_certificate(path, results_dir)
    except (CertificateError, CheckpointError, EvidenceMismatch) as exc:
        return f"trial {entry['trial']}: {exc}"
    expected = _front_entry(cert, entry["reused"], results_dir)
    for key, value in expected.items():
        if key != "certificate" and entry[key] != value and not (value != value and entry[key] != entry[key]):
            return f"trial {entry['trial']}: {key}: front.json says {entry[key]!r}, its certificate {value!r}"
    return None


def read_front(results_dir: str, study_name: str) -> tuple[dict | None, list[str]]:
    """front.json with only the entries whose certificates verify: (front or None, why entries are not shown)."""
    path = Path(results_dir) / study_name / "front.json"
    if not path.exists():
        return None, []
    try:
        front = read_front_file(path)
    except CertificateError as exc:
        return None, [f"{path} is not shown: {exc}"]
    problems = [(e, _front_entry_problem(e, study_name, results_dir)) for e in front["entries"]]
    front = {**front, "entries": [e for e, problem in problems if problem is None]}
    return front, [f"{path}: an entry is not shown: {problem}" for _, problem in problems if problem]

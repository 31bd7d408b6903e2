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
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import optuna
import torch

from models.budget import analyze, check, check_module
from models.build import build
from models.rules import RULES
from models.spec import NetSpec, SpecError
from search.data import load_data
from search.engine import TrainConfig, fit, resolve_device, to_device
from search.fsio import atomic_write, atomic_write_text
from search.record import (Outcome, TrialRecord, best_of, candidates, pareto_front, records, smallest_reaching,
                           study_dataset)
from search.storage import SearchError, provenance

CHECKPOINT_FORMAT = "budgetnas-checkpoint-1"


class CheckpointError(RuntimeError):
    """A checkpoint that is not ours, is damaged, or holds objects that weights_only loading refuses."""


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

    def build(self) -> torch.nn.Module:
        if self.spec is not None:
            return build(self.spec)
        from models.load import instantiate

        return instantiate(self.module_path, self.module_class)

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
    """The rules that can be judged without training: (rows, parameters, fully connected reasons). Rows hold the
    exercise's parameter, fully connected and epoch rules, then `max_params` when it is not the exercise's."""
    module = c.build()
    module_verdict = check_module(module, max_params=max_params,
                                  num_classes=c.spec.num_classes if c.spec is not None else c.classes)
    spec_verdict = check(c.spec, max_params) if c.spec is not None else module_verdict
    n_params = max(spec_verdict.n_params, module_verdict.n_params)
    fully_connected = [r for r in (*spec_verdict.reasons, *module_verdict.reasons) if "fully connected" in r]
    other = [r for r in module_verdict.reasons if "fully connected" not in r and "budget" not in r]
    rows = [
        {"rule": RULES.params_rule(), "figure": f"{n_params:,}", "pass": n_params < RULES.max_params},
        {"rule": RULES.fc_rule(), "figure": "; ".join(fully_connected) or "none found (Linear, matmul, whole-map conv)",
         "pass": not fully_connected},
        {"rule": RULES.epochs_rule(), "figure": str(c.cfg.epochs), "pass": c.cfg.epochs <= RULES.max_epochs},
    ]
    if max_params != RULES.max_params:
        rows.append({"rule": f"{RULES.params_rule(max_params)} (the budget asked for, not one of the exercise's "
                             "rules)", "figure": f"{n_params:,}", "pass": n_params < max_params})
    return rows, n_params, other


def refusal_before_training(c: Certifiable, max_params: int = RULES.max_params) -> str | None:
    """Why `c` cannot pass whatever its accuracy (a rule already failed, or a module that does not run), else None."""
    rows, _, other = judge(c, max_params)
    failed = [f"{r['rule']}: {r['figure']}" for r in rows if not r["pass"]] + other
    return "; ".join(failed) or None


def save_checkpoint(path: Path, module: torch.nn.Module, c: Certifiable, cfg: TrainConfig, test_acc: float) -> Path:
    """The weights and what rebuilds the module: the spec JSON, or the file and class of a module of one's own."""
    payload = {"format": CHECKPOINT_FORMAT, "config": cfg.to_dict(), "test_acc": test_acc,
               "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()}}
    if c.spec is not None:
        payload["spec"] = c.spec.to_json(indent=None)
    else:
        payload["module"] = {"path": str(Path(c.module_path).resolve()), "class": c.module_class}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return atomic_write(path, lambda f: f.write(buffer.getvalue()))


def load_checkpoint(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """Rebuild the module from a checkpoint, loading only tensors and plain data (weights_only=True)."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except Exception as exc:
        raise CheckpointError(f"{path}: refused, not a plain weights file ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a budgetnas checkpoint (no '{CHECKPOINT_FORMAT}' marker)")
    try:
        if "spec" in payload:
            module = build(NetSpec.from_json(payload["spec"]))
        else:
            from models.load import instantiate

            module = instantiate(payload["module"]["path"], payload["module"]["class"])
        module.load_state_dict(payload["state_dict"])
    except (SpecError, KeyError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{path}: network and weights do not match: {str(exc).splitlines()[0][:200]}") from None
    return module, payload


def _first_epoch_reaching(curve: list[dict], target: float) -> int | None:
    return next((e["epoch"] for e in curve if e["test_acc"] >= target), None)


def certify(c: Certifiable, *, seeds: int = 3, data_dir: str | None = None, device: str = "auto",
            results_dir: str = "results", target: float | None = RULES.target_accuracy,
            max_params: int = RULES.max_params, log=print, progress: bool | None = None) -> dict:
    """Train `c` with seeds 0..seeds-1 on all training images of its set, test after every epoch, write the
    certificate and one checkpoint per seed under <results>/certified/<name>/, and return the certificate.
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
        seed_cfg = replace(c.cfg, seed=seed)
        model = c.build()
        log(f"seed {seed}: training {c.label()} ({n_params:,} params) on {len(data_set.train):,} {data_set.name} "
            f"images for {c.cfg.epochs} epochs")
        # A module of one's own trains as it is, through torch's optimizer (the whole-step path rebuilds a net's
        # step and expects budgetnas's layers).
        history = fit(model, None, None, seed_cfg, device=dev, data_on_device=data, progress=progress,
                      whole_step=None if c.spec is not None else False,
                      on_epoch=lambda r: log(f"  seed {seed} epoch {r.epoch:2d}: test {r.val_acc:.2%}"))
        curve = [{"epoch": e.epoch, "train_loss": e.train_loss, "train_acc": e.train_acc, "test_loss": e.val_loss,
                  "test_acc": e.val_acc, "lr": e.lr, "seconds": e.seconds} for e in history.epochs]
        final = curve[-1]["test_acc"] if curve and history.status == "completed" else float("nan")
        ckpt = save_checkpoint(out_dir / f"seed{seed}.pt", model, c, seed_cfg, final)
        runs.append({"seed": seed, "status": history.status, "precision": history.precision, "shards": history.shards,
                     "final_test_acc": final, "epochs": curve,
                     "first_epoch_reaching_target": _first_epoch_reaching(curve, target) if target else None,
                     "checkpoint": str(ckpt)})
    finals = [r["final_test_acc"] for r in runs]
    mean = statistics.fmean(finals)
    std = statistics.stdev(finals) if len(finals) > 1 else 0.0
    shown = RULES.accuracy_text(mean, target)
    figure = f"{shown} +- {std:.2%}" if seeds > 1 else f"{shown} (one seed: no spread)"
    if target is None:  # judged only against a target someone gave
        accuracy = {"rule": f"final-epoch test accuracy (mean of {seeds}; no target for {data_set.name}: not judged)",
                    "figure": figure, "pass": True}
    else:
        accuracy = {"rule": RULES.accuracy_rule(seeds, target), "figure": figure, "pass": mean >= target}
    rules = rows[:3] + [accuracy] + rows[3:]
    result = {
        "name": c.name, "source": c.source, "study": c.study, "trial": c.trial,
        "spec": json.loads(c.spec.to_json()) if c.spec is not None else None,
        "module": None if c.spec is not None else {"path": str(Path(c.module_path).resolve()), "class": c.module_class},
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
    atomic_write_text(out_dir / "certificate.json", json.dumps(result, indent=2))
    return result


def read_certificate(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def reusable_certificate(results_dir: str, c: Certifiable, seeds: int, target: float, max_params: int) -> dict | None:
    """A certificate already written for this network with the same spec, recipe, seeds, target and budget."""
    cert = read_certificate(certificate_dir(results_dir, c.name) / "certificate.json")
    if cert is None or c.spec is None:
        return None
    same = (cert.get("spec") == json.loads(c.spec.to_json()) and cert.get("config") == c.cfg.to_dict()
            and len(cert.get("seeds", [])) == seeds and cert.get("target") == target
            and cert.get("max_params", RULES.max_params) == max_params)
    return cert if same else None


def write_best(results_dir: str, result: dict) -> Path:
    return atomic_write_text(Path(results_dir) / result["study"] / "best.json", json.dumps(result, indent=2))


def front_summary(study_name: str, floor: float, seeds: int, certs: list[tuple[dict, bool]], results_dir: str) -> dict:
    """front.json: one entry per certified front trial, smallest first, with its validation and test accuracy."""
    entries = [{"trial": c["trial"], "n_params": c["n_params"], "val_acc": c["val_acc"],
                "test_acc_mean": c["final_test_acc_mean"], "test_acc_std": c["final_test_acc_std"],
                "test_acc_per_seed": [r["final_test_acc"] for r in c["seeds"]], "certified": c["certified"],
                "failed_rules": [r["rule"] for r in c["rules"] if not r["pass"]], "reused": reused,
                "certificate": str(certificate_dir(results_dir, c["name"]) / "certificate.json")}
               for c, reused in certs]
    result = {"study": study_name, "floor": floor, "seeds": seeds, "target": certs[0][0]["target"] if certs else None,
              "entries": entries}
    atomic_write_text(Path(results_dir) / study_name / "front.json", json.dumps(result, indent=2))
    return result


def read_front(results_dir: str, study_name: str) -> dict | None:
    return read_certificate(Path(results_dir) / study_name / "front.json")


def read_best(results_dir: str, study_name: str) -> dict | None:
    return read_certificate(Path(results_dir) / study_name / "best.json")

"""`best`: pick the winner from storage, retrain it on all 60,000 training images with several seeds, evaluate on the
10,000 test images after every epoch, save checkpoints and a certificate, and judge it against the four rules.
`best --front` does the same for every trial on the accuracy/size front above a floor and writes `front.json`.

Files, under <results>/<study>/: certified/trial-<N>/certificate.json and seed<K>.pt for every certified trial;
best.json, a copy of the latest certificate `best` wrote for one trial (what the report shows); front.json.

The test set is read here and nowhere else: the search selected on the validation split.
"""

from __future__ import annotations

import io
import json
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

import optuna
import torch

from models.budget import analyze, check, check_module
from models.build import build
from models.rules import RULES
from models.spec import NetSpec, SpecError
from search.data import load_mnist
from search.engine import TrainConfig, fit, resolve_device, to_device
from search.fsio import atomic_write, atomic_write_text
from search.record import Outcome, TrialRecord, best_of, candidates, pareto_front, records, smallest_reaching
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


def certificate_dir(results_dir: str, study_name: str, trial_number: int) -> Path:
    return Path(results_dir) / study_name / "certified" / f"trial-{trial_number}"


def save_checkpoint(path: Path, module: torch.nn.Module, spec: NetSpec, cfg: TrainConfig, test_acc: float) -> Path:
    payload = {"format": CHECKPOINT_FORMAT, "spec": spec.to_json(indent=None), "config": cfg.to_dict(),
               "test_acc": test_acc, "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()}}
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
        spec = NetSpec.from_json(payload["spec"])
        module = build(spec)
        module.load_state_dict(payload["state_dict"])
    except (SpecError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: spec and weights do not match: {str(exc).splitlines()[0][:200]}") from None
    return module, payload


def _first_epoch_reaching(curve: list[dict], target: float) -> int | None:
    return next((e["epoch"] for e in curve if e["test_acc"] >= target), None)


def certify(study: optuna.Study, trial: TrialRecord, *, seeds: int = 3, data_dir: str | None = None,
            device: str = "auto", results_dir: str = "results", target: float = RULES.target_accuracy,
            max_params: int = RULES.max_params, log=print, progress: bool | None = None) -> dict:
    spec, cfg = trial.spec, trial.config
    out_dir = certificate_dir(results_dir, study.study_name, trial.number)
    verdict = check(spec, max_params)
    module_verdict = check_module(build(spec), max_params=max_params)
    dev = resolve_device(device)
    mnist = load_mnist(data_dir, with_test=True, full_train=True)
    data = (*to_device(mnist.train, dev), *to_device(mnist.test, dev))
    analysis = analyze(spec)
    runs = []
    start = time.perf_counter()
    for seed in range(seeds):
        seed_cfg = replace(cfg, seed=seed)
        model = build(spec)
        log(f"seed {seed}: training trial {trial.number}'s network ({analysis.n_params:,} params) on 60,000 images "
            f"for {cfg.epochs} epochs")
        history = fit(model, None, None, seed_cfg, device=dev, data_on_device=data, progress=progress,
                      on_epoch=lambda r: log(f"  seed {seed} epoch {r.epoch:2d}: test {r.val_acc:.2%}"))
        curve = [{"epoch": e.epoch, "train_loss": e.train_loss, "train_acc": e.train_acc, "test_loss": e.val_loss,
                  "test_acc": e.val_acc, "lr": e.lr, "seconds": e.seconds} for e in history.epochs]
        final = curve[-1]["test_acc"] if curve and history.status == "completed" else float("nan")
        ckpt = save_checkpoint(out_dir / f"seed{seed}.pt", model, spec, seed_cfg, final)
        runs.append({"seed": seed, "status": history.status, "precision": history.precision, "shards": history.shards,
                     "final_test_acc": final, "epochs": curve,
                     "first_epoch_reaching_target": _first_epoch_reaching(curve, target), "checkpoint": str(ckpt)})
    finals = [r["final_test_acc"] for r in runs]
    mean = statistics.fmean(finals)
    std = statistics.stdev(finals) if len(finals) > 1 else 0.0
    fully_connected = [r for r in (*verdict.reasons, *module_verdict.reasons) if "fully connected" in r]
    n_params = max(verdict.n_params, module_verdict.n_params)
    rules = [  # always the exercise's four; another budget is judged as a fifth line that says it is not one of them
        {"rule": RULES.params_rule(), "figure": f"{n_params:,}", "pass": n_params < RULES.max_params},
        {"rule": RULES.fc_rule(), "figure": "; ".join(fully_connected) or "none found (Linear, matmul, whole-map conv)",
         "pass": not fully_connected},
        {"rule": RULES.epochs_rule(), "figure": str(cfg.epochs), "pass": cfg.epochs <= RULES.max_epochs},
        {"rule": RULES.accuracy_rule(seeds, target), "figure": f"{mean:.2%} +- {std:.2%}", "pass": mean >= target},
    ]
    if max_params != RULES.max_params:
        rules.append({"rule": f"{RULES.params_rule(max_params)} (the budget asked for, not one of the exercise's "
                              "rules)", "figure": f"{n_params:,}", "pass": n_params < max_params})
    result = {
        "study": study.study_name, "trial": trial.number, "spec": json.loads(spec.to_json()),
        "n_params": analysis.n_params, "receptive_field": analysis.receptive_field, "macs": analysis.macs,
        "config": cfg.to_dict(), "val_acc": trial.values[0] if trial.values else None,
        "seeds": runs, "final_test_acc_mean": mean, "final_test_acc_std": std,
        "target": target, "max_params": max_params, "seeds_reaching_target": sum(f >= target for f in finals),
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


def reusable_certificate(results_dir: str, study_name: str, trial: TrialRecord, seeds: int, target: float,
                         max_params: int) -> dict | None:
    """A certificate already written for this trial with the same network, recipe, seeds, target and budget."""
    cert = read_certificate(certificate_dir(results_dir, study_name, trial.number) / "certificate.json")
    if cert is None:
        return None
    same = (cert.get("spec") == json.loads(trial.spec.to_json()) and cert.get("config") == trial.config.to_dict()
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
                "certificate": str(certificate_dir(results_dir, study_name, c["trial"]) / "certificate.json")}
               for c, reused in certs]
    result = {"study": study_name, "floor": floor, "seeds": seeds, "target": certs[0][0]["target"] if certs else None,
              "entries": entries}
    atomic_write_text(Path(results_dir) / study_name / "front.json", json.dumps(result, indent=2))
    return result


def read_front(results_dir: str, study_name: str) -> dict | None:
    return read_certificate(Path(results_dir) / study_name / "front.json")


def read_best(results_dir: str, study_name: str) -> dict | None:
    return read_certificate(Path(results_dir) / study_name / "best.json")

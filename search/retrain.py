"""`best`: pick the winner from storage, retrain it on all 60,000 training images with several seeds, evaluate on the
10,000 test images after every epoch, save checkpoints and `best.json`, and judge it against the four rules.

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
from search.record import Outcome, TrialRecord, best_of, candidates, records, smallest_reaching
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
    out_dir = Path(results_dir) / study.study_name
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
        ckpt = save_checkpoint(out_dir / f"best_seed{seed}.pt", model, spec, seed_cfg, final)
        runs.append({"seed": seed, "status": history.status, "precision": history.precision, "shards": history.shards,
                     "final_test_acc": final, "epochs": curve,
                     "first_epoch_reaching_target": _first_epoch_reaching(curve, target), "checkpoint": str(ckpt)})
    finals = [r["final_test_acc"] for r in runs]
    mean = statistics.fmean(finals)
    std = statistics.stdev(finals) if len(finals) > 1 else 0.0
    linear_free = not any("Linear" in r or "fully connected" in r for r in module_verdict.reasons)
    rules = [
        {"rule": RULES.params_rule(max_params), "figure": f"{module_verdict.n_params:,}",
         "pass": verdict.ok and module_verdict.n_params < max_params},
        {"rule": "no Linear layer", "figure": "none found" if linear_free else "; ".join(module_verdict.reasons),
         "pass": linear_free},
        {"rule": RULES.epochs_rule(), "figure": str(cfg.epochs), "pass": cfg.epochs <= RULES.max_epochs},
        {"rule": RULES.accuracy_rule(seeds, target), "figure": f"{mean:.2%} +- {std:.2%}", "pass": mean >= target},
    ]
    result = {
        "study": study.study_name, "trial": trial.number, "spec": json.loads(spec.to_json()),
        "n_params": analysis.n_params, "receptive_field": analysis.receptive_field, "macs": analysis.macs,
        "config": cfg.to_dict(), "val_acc": trial.values[0] if trial.values else None,
        "seeds": runs, "final_test_acc_mean": mean, "final_test_acc_std": std,
        "target": target, "seeds_reaching_target": sum(f >= target for f in finals),
        "rules": rules, "certified": all(r["pass"] for r in rules),
        "device": str(dev), "wall_s": time.perf_counter() - start,
        "versions": {**provenance(), "platform": platform.platform()},
    }
    atomic_write_text(out_dir / "best.json", json.dumps(result, indent=2))
    return result


def read_best(results_dir: str, study_name: str) -> dict | None:
    path = Path(results_dir) / study_name / "best.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None

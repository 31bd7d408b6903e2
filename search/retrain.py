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
from optuna.trial import FrozenTrial

from models.budget import analyze, check, check_module
from models.build import build
from models.spec import NetSpec, SpecError
from search.data import load_mnist
from search.fsio import atomic_write, atomic_write_text
from search.study import SearchError, feasible_completed, provenance
from search.train import MAX_EPOCHS, TrainConfig, fit, resolve_device, to_device

TARGET = 0.994  # the exercise's test accuracy, final epoch, mean over seeds
CHECKPOINT_FORMAT = "budgetnas-checkpoint-1"


class CheckpointError(RuntimeError):
    """A checkpoint that is not ours, is damaged, or holds objects that weights_only loading refuses."""


def pick_winner(study: optuna.Study, trial_number: int | None = None, target: float | None = None) -> FrozenTrial:
    """The trial to certify: `--trial N`; in pareto studies with a target, the smallest net that reached it;
    otherwise the feasible completed trial with the highest validation accuracy (fewer parameters break ties)."""
    if trial_number is not None:
        matches = [t for t in study.get_trials(deepcopy=False) if t.number == trial_number]
        if not matches:
            raise SearchError(f"--trial {trial_number}: study {study.study_name!r} has trials 0 to "
                              f"{len(study.get_trials(deepcopy=False)) - 1}")
        trial = matches[0]
        if "spec" not in trial.user_attrs or trial.user_attrs.get("outcome") in ("rejected",):
            raise SearchError(f"--trial {trial_number}: that trial was {trial.user_attrs.get('outcome', 'never built')} "
                              f"({trial.user_attrs.get('reason', 'no spec stored')}); pick a trained one")
        return trial
    done = feasible_completed(study)
    if not done:
        counts = len(study.get_trials(deepcopy=False))
        raise SearchError(f"study {study.study_name!r} has no completed trial within the budget yet "
                          f"({counts} trials stored); run search until one completes")
    if target is not None:
        reached = [t for t in done if t.values[0] >= target]
        if not reached:
            top = max(t.values[0] for t in done)
            raise SearchError(f"no completed trial reached {target:.2%} validation accuracy (the best has {top:.2%}); "
                              "lower --target or search longer")
        return min(reached, key=lambda t: (t.user_attrs["n_params"], -t.values[0]))
    return max(done, key=lambda t: (t.values[0], -t.user_attrs["n_params"]))


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


def certify(study: optuna.Study, trial: FrozenTrial, *, seeds: int = 3, data_dir: str | None = None,
            device: str = "auto", results_dir: str = "results", target: float = TARGET, max_params: int = 20_000,
            log=print, progress: bool | None = None) -> dict:
    spec = NetSpec.from_json(trial.user_attrs["spec"])
    cfg = TrainConfig.from_dict(trial.user_attrs["config"])
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
        {"rule": f"fewer than {max_params:,} parameters", "figure": f"{module_verdict.n_params:,}",
         "pass": verdict.ok and module_verdict.n_params < max_params},
        {"rule": "no Linear layer", "figure": "none found" if linear_free else "; ".join(module_verdict.reasons),
         "pass": linear_free},
        {"rule": f"at most {MAX_EPOCHS} epochs", "figure": str(cfg.epochs), "pass": cfg.epochs <= MAX_EPOCHS},
        {"rule": f"final-epoch test accuracy at least {target:.2%} (mean of {seeds} seed{'s' if seeds > 1 else ''})",
         "figure": f"{mean:.2%} +- {std:.2%}", "pass": mean >= target},
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

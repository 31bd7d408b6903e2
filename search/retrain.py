"""Certification: retrain a network on all 60,000 training images with several seeds, evaluate on the 10,000 test
images after every epoch, save a checkpoint per seed and write the certificate, judged against the four rules.

What is certified (`Certifiable`): a stored trial (`best`, `certify --study S --trial N`), a preset, a spec JSON, or
an nn.Module class of one's own (`certify TARGET`). Every rule that can be judged before training is judged first.
Which trials `best` certifies: search/choose.py; the files certification leaves and the report reads (best.json,
front.json): search/certified_files.py; checkpoints: search/checkpoint.py. Their names stay importable from here.

Files: <results>/certified/<name>/certificate.json and seed<K>.pt (name: the preset, the spec file's or class's
name, or <study>-trial-<N>). While the seeds train, their checkpoints go to <name>/partial/; only a complete run
moves them into place and writes the certificate, so that an interrupted one leaves an earlier certificate and its
checkpoints as they were.

The test set is read here and nowhere else: the search selected on the validation split.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import optuna
import torch

from models.budget import analyze, check
from models.build import build
from models.rules import RULES
from models.spec import MAX_BUILT_PARAMS, NetSpec
from search.certificate import CertificateError, CheckpointError, EvidenceMismatch  # noqa: F401
from search.certified_files import (certificate_dir, front_summary, read_best, read_front,  # noqa: F401
                                    reusable_certificate, write_best, write_front)
from search.checkpoint import load_checkpoint, save_checkpoint, sha256_file, spec_digest  # noqa: F401
from search.choose import front_to_certify, pick_winner  # noqa: F401
from search.data import load_data
from search.engine import TrainConfig, epoch_line, fit, resolve_device, to_device
from search.engine.runtime import signals_ignored
from search.fsio import atomic_write_text
from search.record import TrialRecord, study_dataset
from search.storage import provenance
from search.verdicts import accuracy_row, judge_rules


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


def rules_before_training(c: Certifiable, max_params: int = RULES.max_params) -> tuple[list[dict], int, list[str]]:
    """The rules that can be judged without training: (rows, parameters, other reasons), as
    search.verdicts.judge_rules. A spec counted over MAX_BUILT_PARAMS is judged on the spec alone, unbuilt."""
    too_big = c.spec is not None and check(c.spec, max_params).n_params > MAX_BUILT_PARAMS
    module = None if too_big else c.build()
    return judge_rules(module, c.spec, c.cfg.epochs, c.spec.num_classes if c.spec is not None else c.classes,
                       max_params)


def refusal_before_training(c: Certifiable, max_params: int = RULES.max_params) -> str | None:
    """Why `c` cannot pass whatever its accuracy (a rule already failed, or a module that does not run), else None."""
    rows, _, other = rules_before_training(c, max_params)
    failed = [f"{r['rule']}: {r['figure']}" for r in rows if not r["pass"]] + other
    return "; ".join(failed) or None


PARTIAL = "partial"  # the folder, in the certificate's, of the checkpoints of a run not yet complete


def _first_epoch_reaching(curve: list[dict], target: float) -> int | None:
    return next((e["epoch"] for e in curve if e["test_acc"] >= target), None)


@dataclass
class SeedProgress:
    """Where a certification is (the seed training, 1-based, and the epoch in progress), its line after every epoch
    with the time left, and the checkpoints of the seeds that finished; an interrupted certify says what it holds."""

    label: str
    seeds: int
    epochs: int
    out_dir: Path  # the certificate's folder
    log: Callable[[str], None] = print
    seed: int = 1
    epoch: int = 1
    seconds: list[float] = field(default_factory=list)  # every epoch's wall time so far, all seeds
    kept: list[Path] = field(default_factory=list)

    def on_epoch(self, record) -> None:
        self.seconds.append(record.seconds)
        epochs_left = self.epochs - record.epoch + (self.seeds - self.seed) * self.epochs
        left_s = sum(self.seconds) / len(self.seconds) * epochs_left  # at the mean epoch time so far
        self.log(epoch_line(f"seed {self.seed}/{self.seeds}", record.epoch, self.epochs, "test", record.val_acc,
                            record.seconds, left_s))
        self.epoch = min(record.epoch + 1, self.epochs)

    def seed_done(self, checkpoint: Path) -> None:
        self.kept.append(checkpoint)
        self.seed, self.epoch = min(self.seed + 1, self.seeds), 1

    def stopped(self) -> str:
        """What an interrupted certification leaves, as the code writes it (nothing is in place before the end)."""
        if not self.kept:
            kept = "no seed had finished"
        else:
            names = ", ".join(p.name for p in self.kept)
            kept = (f"{'seed 1' if len(self.kept) == 1 else f'seeds 1-{len(self.kept)}'} finished, checkpoint"
                    f"{'s' if len(self.kept) > 1 else ''} kept in {self.kept[0].parent}/ ({names}; not certified, "
                    "not reused by a new run)")
        earlier = ("; the earlier certificate and its checkpoints are left as they were"
                   if (self.out_dir / "certificate.json").exists() else "")
        return (f"certification of {self.label} interrupted during seed {self.seed}/{self.seeds}, epoch "
                f"{self.epoch}/{self.epochs}: {kept}; no certificate written{earlier}. Run the same command again to "
                "retrain "
                + (f"all {self.seeds} seeds." if self.seeds > 1 else "it."))


def _train_seed(c: Certifiable, seed: int, data: tuple, dev, out_dir: Path, target: float | None,
                tracker: SeedProgress, progress: bool | None) -> dict:
    """One seed trained and tested after every epoch; its checkpoint saved in the partial folder (moved into
    `out_dir` with the certificate); its entry of the certificate, naming the checkpoint where it will be."""
    seed_cfg = replace(c.cfg, seed=seed)
    torch.manual_seed(seed)  # a module of one's own keeps its own initialisation, drawn from the seed
    model = c.build()
    # A module of one's own trains as it is, through torch's optimizer (the whole-step path rebuilds a net's
    # step and expects budgetnas's layers).
    history = fit(model, None, None, seed_cfg, device=dev, data_on_device=data, progress=progress,
                  whole_step=None if c.spec is not None else False, reset_weights=c.spec is not None,
                  on_epoch=tracker.on_epoch)
    curve = [{"epoch": e.epoch, "train_loss": e.train_loss, "train_acc": e.train_acc, "test_loss": e.val_loss,
              "test_acc": e.val_acc, "lr": e.lr, "seconds": e.seconds} for e in history.epochs]
    final = curve[-1]["test_acc"] if curve and history.status == "completed" else float("nan")
    staged = save_checkpoint(out_dir / PARTIAL / f"seed{seed}.pt", model, c, seed_cfg, final)
    tracker.seed_done(staged)
    return {"seed": seed, "status": history.status, "precision": history.precision, "shards": history.shards,
            "step_path": history.step_path, "fallback": history.fallback, "final_test_acc": final, "epochs": curve,
            "first_epoch_reaching_target": _first_epoch_reaching(curve, target) if target else None,
            "checkpoint": str(out_dir / staged.name), "checkpoint_sha256": sha256_file(staged)}


def _store(out_dir: Path, result: dict) -> None:
    """The seeds' checkpoints moved from the partial folder into place and the certificate written, with Ctrl-C and
    SIGTERM ignored meanwhile: an earlier certificate and its checkpoints are replaced only by a complete run."""
    with signals_ignored():
        for run in result["seeds"]:
            os.replace(out_dir / PARTIAL / Path(run["checkpoint"]).name, run["checkpoint"])
        atomic_write_text(out_dir / "certificate.json", json.dumps(result, indent=2))
        shutil.rmtree(out_dir / PARTIAL, ignore_errors=True)


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def _plan_line(c: Certifiable, n_params: int, seeds: int, n_images: int, dataset: str) -> str:
    """What is about to train, said before the first (long) epoch: "certifying micro (4,582 params): 3 seeds x 20
    epochs on 60,000 images"."""
    validation = f", validation {c.val_acc:.2%}" if c.val_acc is not None else ""
    of_set = f" of {dataset}" if dataset != "mnist" else ""  # MNIST, the exercise's set, goes without saying
    return (f"certifying {c.label()} ({n_params:,} params{validation}): {_count(seeds, 'seed')} x "
            f"{_count(c.cfg.epochs, 'epoch')} on {n_images:,} images{of_set}")


def certify(c: Certifiable, *, seeds: int = 3, data_dir: str | None = None, device: str = "auto",
            results_dir: str = "results", target: float | None = RULES.target_accuracy,
            max_params: int = RULES.max_params, log=print, progress: bool | None = None) -> dict:
    """Train `c` with seeds 0..seeds-1 on all training images of its set, test after every epoch, write the
    certificate (with the sha256 of each checkpoint and of the spec or module source) and one checkpoint per seed
    under <results>/certified/<name>/, and return the certificate.
    `target` None (another set, no target given): the accuracy is reported, not judged."""
    out_dir = certificate_dir(results_dir, c.name)
    rows, n_params, _ = rules_before_training(c, max_params)
    dev = resolve_device(device)
    data_set = load_data(data_dir, dataset=c.dataset, with_test=True, full_train=True)
    data = (*to_device(data_set.train, dev, data_set.stats), *to_device(data_set.test, dev, data_set.stats))
    analysis = analyze(c.spec) if c.spec is not None else None
    log(_plan_line(c, n_params, seeds, len(data_set.train), data_set.name))
    tracker = SeedProgress(c.label(), seeds, c.cfg.epochs, out_dir, log)
    start = time.perf_counter()
    try:
        runs = [_train_seed(c, seed, data, dev, out_dir, target, tracker, progress) for seed in range(seeds)]
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM (search.engine.runtime.StopRequested): say what is kept
        stop.certifying = tracker.stopped()
        raise
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
    _store(out_dir, result)
    return result

"""The search: the study it opens or resumes (sampler, pruner, warm start, set-up check), and
`run_search`, which lets Optuna run the objective until the study holds `--trials` trained trials.

`--trials N` counts trained trials (training, completed, pruned, failed) across every process that shares the
storage: the command run again after an interruption continues to N, and parallel workers stop at N together.
What one trial does is in search/objective.py; what it stores, in search/record.py.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import optuna
from optuna.trial import FrozenTrial

from models.presets import PRESETS
from search import space
from search.data import load_mnist
from search.engine import TrainConfig, resolve_device, to_device
from search.engine.runtime import set_cpu_threads
from search.fsio import atomic_write_text
from search.objective import TrialContext, TrialFailed, make_objective
from search.options import SearchOptions
from search.pruning import make_pruner
from search.record import count_trained, outcome_counts, trial_frame
from search.storage import check_setup, fail_dead_local_trials, open_storage, provenance

def make_sampler(opts: SearchOptions) -> optuna.samplers.BaseSampler:
    seed = opts.seed
    if opts.storage is not None:
        # A shared storage means workers: with one seed they would all suggest the same candidates in lockstep.
        seed = (opts.seed * 1_000_003 + os.getpid()) % 2**31
    if opts.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if opts.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    # Multivariate TPE models the joint choices (widths with depth); the trials' constraint values (set_constraint)
    # steer it off over-budget nets. `group` splits the conditional space (1 to 3 blocks) into its subspaces.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=10, multivariate=True, group=True)


def open_study(opts: SearchOptions) -> optuna.Study:
    storage = open_storage(opts.storage_url, opts.heartbeat)
    check_setup(storage, opts.study, opts.setup())
    directions = ["maximize"] if opts.objective == "accuracy" else ["maximize", "minimize"]
    study = optuna.create_study(study_name=opts.study, storage=storage, directions=directions,
                                sampler=make_sampler(opts), pruner=make_pruner(opts.pruner, opts.objective, opts.epochs),
                                load_if_exists=True)
    if "setup" not in study.user_attrs:
        study.set_user_attr("setup", opts.setup())
        study.set_user_attr("provenance", provenance())
        if opts.warm_start:
            for name, spec in PRESETS.items():
                cfg = TrainConfig(epochs=opts.epochs, seed=opts.seed)
                params = space.encode(spec, cfg, param_target=opts.objective == "pareto")
                study.enqueue_trial(params, user_attrs={"preset": name}, skip_if_exists=True)
    return study


@dataclass
class SearchResult:
    study: optuna.Study
    trained: int
    counts: dict[str, int]
    wall_s: float
    stop_reason: str | None = None
    csv_path: Path | None = None


def trials_csv_path(results_dir: str, study_name: str) -> Path:
    return Path(results_dir) / study_name / "trials.csv"


def write_trials_csv(study: optuna.Study, path: Path) -> Path:
    return atomic_write_text(path, trial_frame(study).to_csv(index=False))


def run_search(opts: SearchOptions, log: Callable[[str], None] = print, progress: bool | None = None,
               on_trial_end: Callable[[optuna.Study, FrozenTrial], None] | None = None) -> SearchResult:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    device = resolve_device(opts.device)
    study = open_study(opts)
    csv_path = trials_csv_path(opts.results_dir, opts.study)
    start = time.perf_counter()
    for number in fail_dead_local_trials(study):
        log(f"trial {number}: its worker on this machine is gone (killed?); failed, and its parameters queued again")
    if count_trained(study) >= opts.trials:
        write_trials_csv(study, csv_path)
        return SearchResult(study, count_trained(study), outcome_counts(study), 0.0, None, csv_path)

    if device.type == "cpu":
        set_cpu_threads(opts.threads, opts.jobs)
    mnist = load_mnist(opts.data_dir)
    train = mnist.train.head(opts.subset) if opts.subset else mnist.train
    data = (*to_device(train, device), *to_device(mnist.val, device))
    ctx = TrialContext(opts, data, device, log, progress=progress)

    def after_trial(study: optuna.Study, trial: FrozenTrial) -> None:
        write_trials_csv(study, csv_path)
        if on_trial_end:
            on_trial_end(study, trial)
        if count_trained(study) >= opts.trials:
            study.stop()

    study.optimize(make_objective(ctx), n_trials=None, n_jobs=opts.jobs, callbacks=[after_trial],
                   catch=(TrialFailed,), gc_after_trial=False, show_progress_bar=False)
    write_trials_csv(study, csv_path)
    return SearchResult(study, count_trained(study), outcome_counts(study), time.perf_counter() - start,
                        ctx.stop_reason, csv_path)

"""The search: the study it opens or resumes (sampler, pruner, warm start, set-up check), and
`run_search`, which lets Optuna run the objective until the study holds `--trials` trained trials.

`--trials N` counts trained trials (training, completed, pruned, failed) across every process that shares the
storage: the command run again after an interruption continues to N, and parallel workers stop at N together.
What one trial does is in search/objective.py; what it stores, in search/record.py.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from models.budget import count_params
from models.presets import PRESETS
from search import space
from search.data import load_data
from search.descent import queue_descent
from search.engine import TrainConfig, resolve_device, to_device
from search.engine.runtime import set_cpu_threads, stop_point, use_bf16
from search.fsio import atomic_write_text
from search.objective import TrialContext, TrialFailed, make_objective
from search.options import SearchOptions
from search.pruning import make_pruner
from search.record import count_trained, outcome_counts, trial_frame
from search.storage import (SearchError, check_setup, claim_results_folder, claim_worker_index, fail_dead_local_trials,
                            open_storage, provenance)


def make_sampler(opts: SearchOptions, worker_index: int = 0) -> optuna.samplers.BaseSampler:
    # Workers sharing a study: with one seed they would all suggest the same candidates in lockstep, so each takes
    # its own from the study's seed and the index it claimed in the storage (the first worker: the seed itself).
    seed = opts.seed if worker_index == 0 else (opts.seed * 1_000_003 + worker_index) % 2**31
    if opts.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if opts.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    # Multivariate TPE models the joint choices (widths with depth); the trials' constraint values (set_constraint)
    # steer it off over-budget nets. `group` splits the conditional space (1 to 3 blocks) into its subspaces.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=10, multivariate=True, group=True)


def _retries_first(study: optuna.Study) -> None:
    """Pop the queued retries of interrupted or killed trials before the other queued trials (presets), so a retry
    is never left waiting while the study reaches --trials. Optuna pops in storage order and offers no priority;
    this replaces its private `_pop_waiting_trial_id` on this study object with the same atomic claim
    (WAITING -> RUNNING succeeds for one worker only) over the waiting trials in another order."""
    def pop() -> int | None:
        waiting = study._storage.get_all_trials(study._study_id, deepcopy=False, states=(TrialState.WAITING,))
        def is_retry(t: FrozenTrial) -> bool:  # ours (Ctrl-C, a dead local worker) or Optuna's (heartbeat)
            return "retry_of" in t.user_attrs or "failed_trial" in t.system_attrs

        for trial in sorted(waiting, key=lambda t: (not is_retry(t), t.number)):
            try:
                if study._storage.set_trial_state_values(trial._trial_id, state=TrialState.RUNNING):
                    return trial._trial_id
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
        return None

    study._pop_waiting_trial_id = pop


def open_study(opts: SearchOptions, data_record: dict | None = None) -> optuna.Study:
    """Open or create the study. `data_record`: the data's identity (Data.record()), part of the set-up; loaded
    here when not given."""
    if data_record is None:
        data_record = load_data(opts.data_dir, dataset=opts.dataset).record()
    smallest = space.smallest_params(opts.min_rf)
    if opts.max_params <= smallest:  # every candidate would be refused, after --max-rejections of them
        raise SearchError(f"--max-params={opts.max_params:,}: the smallest network of the search space with a receptive "
                          f"field of at least {opts.min_rf} px (--min-rf) has {smallest:,} parameters; give a budget "
                          f"above {smallest:,}")
    storage = open_storage(opts.storage_url, opts.heartbeat)
    # The precision the engine trains in here joins the set-up: bf16 and fp32 results are not comparable.
    setup = {**opts.with_data(data_record),
             "precision": "bf16" if use_bf16(resolve_device(opts.device), "auto") else "fp32"}
    check_setup(storage, opts.study, setup)
    directions = ["maximize"] if opts.objective == "accuracy" else ["maximize", "minimize"]
    study = optuna.create_study(study_name=opts.study, storage=storage, directions=directions,
                                sampler=make_sampler(opts), pruner=make_pruner(opts.pruner, opts.objective, opts.epochs),
                                load_if_exists=True)
    _retries_first(study)
    if opts.storage is not None:  # a storage given by name may be shared by workers
        study.sampler = make_sampler(opts, claim_worker_index(study, opts.worker))
    if "setup" not in study.user_attrs:
        study.set_user_attr("setup", setup)
        study.set_user_attr("provenance", provenance())
        study.set_user_attr("target", opts.target)  # None: no target line in the report
        if opts.warm_start:
            presets = PRESETS.items()
            if opts.objective == "pareto":  # smallest first: each bigger preset then meets its smaller rivals at the rungs
                presets = sorted(presets, key=lambda item: count_params(item[1]))
            for name, spec in presets:
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


class _QuietHandledFailures(logging.Filter):
    """Drop Optuna's "Trial N failed with parameters ..." record (with its traceback) and the "failed with value"
    line after it, for the failures budgetnas reports itself: a trial that failed in training (TrialFailed) and
    Ctrl-C or SIGTERM (one line from the CLI)."""

    dropped_last = False

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "failed with value" in message and self.dropped_last:
            self.dropped_last = False
            return False
        self.dropped_last = "failed with parameters" in message and any(
            name in message for name in ("KeyboardInterrupt", "StopRequested(", "TrialFailed("))
        return not self.dropped_last


_QUIET = _QuietHandledFailures()
logging.getLogger("optuna.study._optimize").addFilter(_QUIET)  # the logger that reports failed trials


def run_search(opts: SearchOptions, log: Callable[[str], None] = print, progress: bool | None = None,
               on_trial_end: Callable[[optuna.Study, FrozenTrial], None] | None = None) -> SearchResult:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    device = resolve_device(opts.device)
    data_set = load_data(opts.data_dir, dataset=opts.dataset)
    study = open_study(opts, data_set.record())
    claim_results_folder(opts.results_dir, opts.study, opts.storage_url)
    csv_path = trials_csv_path(opts.results_dir, opts.study)
    start = time.perf_counter()
    for number in fail_dead_local_trials(study):
        log(f"trial {number}: its worker on this machine is gone (killed?); failed, and its parameters queued again")
    if count_trained(study) >= opts.trials:
        write_trials_csv(study, csv_path)
        return SearchResult(study, count_trained(study), outcome_counts(study), 0.0, None, csv_path)

    if device.type == "cpu":
        set_cpu_threads(opts.threads, opts.jobs)
    train = data_set.train.head(opts.subset) if opts.subset else data_set.train
    data = (*to_device(train, device, data_set.stats), *to_device(data_set.val, device, data_set.stats))
    ctx = TrialContext(opts, data, device, log, progress=progress, classes=data_set.classes)
    stop_point()  # a stop requested while the data and the study were loading

    def after_trial(study: optuna.Study, trial: FrozenTrial) -> None:
        write_trials_csv(study, csv_path)
        if on_trial_end:
            on_trial_end(study, trial)
        stop_point()  # Ctrl-C or SIGTERM during the trial's last moments: stop before the next one
        if count_trained(study) >= opts.trials:
            study.stop()
        else:
            queue_descent(study, opts.descent_levels)

    study.optimize(make_objective(ctx), n_trials=None, n_jobs=opts.jobs, callbacks=[after_trial],
                   catch=(TrialFailed,), gc_after_trial=False, show_progress_bar=False)
    write_trials_csv(study, csv_path)
    return SearchResult(study, count_trained(study), outcome_counts(study), time.perf_counter() - start,
                        ctx.stop_reason, csv_path)

"""The search: the study it opens or resumes (sampler, pruner, warm start, set-up check), and
`run_search`, which lets Optuna run the objective until the study holds `--trials` trained trials.

`--trials N` counts trained trials (training, completed, pruned, failed) across every process that shares the
storage: the command run again after an interruption continues to N, and parallel workers stop at N together.
What one trial does is in search/objective.py; what it stores, in search/record.py.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import optuna
from optuna.trial import FrozenTrial

from models.budget import check, count_params
from models.presets import PRESETS
from models.spec import NetSpec
from search import space
from search.data import load_data
from search.descent import next_descent, next_winner_descent
from search.evolution import next_step, slot_free
from search.engine import recipe_for, resolve_device, to_device
from search.engine.runtime import set_cpu_threads, signals_ignored, stop_point, use_bf16
from search.errors import SearchError
from search.fsio import atomic_write_text
from search.objective import TrialContext, TrialFailed, make_objective
from search.options import SearchOptions
from search.provenance import provenance
from search.pruning import make_pruner
from search.record import count_trained, outcome_counts, trial_frame
from search.setup import check_setup
from search.storage import claim_results_folder, open_storage
from search.tally import tally_of
from search.workers import RetriesFirstStudy, claim_worker_index, fail_dead_local_trials, requeue_interrupted


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


def open_study(opts: SearchOptions, data_record: dict | None = None) -> RetriesFirstStudy:
    """Open or create the study (one that runs queued retries first). `data_record`: the data's identity
    (Data.record()), part of the set-up; loaded here when not given."""
    if data_record is None:
        data_record = load_data(opts.data_dir, dataset=opts.dataset).record()
    unmeetable = space.unmeetable_bound(opts.budget)
    if unmeetable:  # every candidate would be refused, after --max-rejections of them
        raise SearchError(unmeetable)
    storage = open_storage(opts.storage_url, opts.heartbeat)
    # The precision the engine trains in here joins the set-up: bf16 and fp32 results are not comparable.
    setup = {**opts.with_data(data_record),
             "precision": "bf16" if use_bf16(resolve_device(opts.device), "auto") else "fp32"}
    check_setup(storage, opts.study, setup)
    directions = ["maximize"] if opts.objective == "accuracy" else ["maximize", "minimize"]
    sampler, pruner = make_sampler(opts), make_pruner(opts.pruner, opts.objective, opts.epochs)
    optuna.create_study(study_name=opts.study, storage=storage, directions=directions, sampler=sampler, pruner=pruner,
                        load_if_exists=True)
    study = RetriesFirstStudy(opts.study, storage, sampler=sampler, pruner=pruner)
    if opts.storage is not None:  # a storage given by name may be shared by workers
        study.sampler = make_sampler(opts, claim_worker_index(study, opts.worker))
    if "setup" not in study.user_attrs:
        study.set_user_attr("setup", setup)
        study.set_user_attr("provenance", provenance())
        study.set_user_attr("target", opts.target)  # None: no target line in the report
        if opts.warm_start:
            for name, spec in presets_to_queue(opts):
                cfg = recipe_for(count_params(spec), epochs=opts.epochs, seed=opts.seed)
                params = space.encode(spec, cfg, param_target=opts.objective == "pareto", size_metric=opts.size_metric)
                study.enqueue_trial(params, user_attrs={"preset": name}, skip_if_exists=True)
    return study


def presets_to_queue(opts: SearchOptions) -> list[tuple[str, NetSpec]]:
    """The presets a new study queues first, in order, until half of --trials (rounded down, at least one) would
    train: the other half is left to the search's own candidates, so that every search explores. A preset the gates
    refuse untrained (at or over --max-params without --repair, a receptive field under --min-rf) takes no slot; it
    is queued where it falls, and stored as rejected.

    Order: a pareto search smallest first, so that each bigger preset meets its smaller rivals at the rungs; an
    accuracy search largest first, since among the presets accuracy grows with size (baseline 99.57%, threeblock
    99.54%, compact 99.44%, micro 99.42% validation in 20 epochs, docs/search.md): the half kept is the likeliest
    winners', and the first trials set a high bar at the pruning rungs for the sampled ones."""
    smallest_first = opts.objective == "pareto"
    ordered = sorted(PRESETS.items(), key=lambda item: count_params(item[1]) * (1 if smallest_first else -1))
    slots, queued = max(1, opts.trials // 2), []
    for name, spec in ordered:
        if slots == 0:
            break
        verdict = check(spec, opts.max_params)
        fits = verdict.ok and opts.budget.fits(spec)  # every bound: parameters, MACs, int8 bytes
        slots -= (fits or opts.repair) and verdict.receptive_field >= opts.min_rf
        queued.append((name, spec))
    return queued


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


class Bookkeeping:
    """What `run_search` does after each trial: the caller's `on_trial_end`, a stop asked for meanwhile, the stop
    at --trials trained trials, and the next evolution step or front descendant. It reads only the trials that changed since the
    last trial (search/tally.py), so its cost does not grow with the study; trials.csv is written when the search
    ends or is stopped, not here."""

    def __init__(self, study: optuna.Study, opts: SearchOptions,
                 on_trial_end: Callable[[optuna.Study, FrozenTrial], None] | None = None):
        self.opts, self.on_trial_end = opts, on_trial_end
        self.tally = tally_of(study).refresh()  # the one full read, before the first trial

    def after_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if self.on_trial_end:
            self.on_trial_end(study, trial)
        stop_point()  # Ctrl-C or SIGTERM during the trial's last moments: stop before the next one
        if self.tally.refresh().trained() >= self.opts.trials:
            study.stop()
        elif self.opts.descend:
            self.queue_step(study, trial)
        elif self.opts.winner_descent:
            step = self.winner_descent()
            if step is not None:
                study.enqueue_trial(step[0], user_attrs=step[1], skip_if_exists=True)

    def winner_descent(self) -> tuple[dict, dict] | None:
        """An accuracy search's next winner descendant (search/descent.py), or None."""
        records = self.tally.evolution_records()
        return next_winner_descent(records, self.opts.target, slot_free(records), self.opts.budget,
                                   self.tally.params_keys())

    def queue_step(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """The next evolution step (search/evolution.py), in turns with front descent's (pareto) or the winner
        descent's (accuracy, where on)."""
        levels = self.opts.descent_levels
        descend = (lambda: next_descent(self.tally.descent_records(), levels)) if levels else None
        if self.opts.winner_descent:
            descend = self.winner_descent
        rng = random.Random(f"{self.opts.seed}:{trial.number}")  # the same study state, the same step
        step = next_step(self.tally.evolution_records(), self.opts.objective == "pareto", levels,
                         self.opts.max_params, rng, descend, self.opts.budget, self.tally.params_keys())
        if step is not None:
            study.enqueue_trial(step[0], user_attrs=step[1], skip_if_exists=True)


def run_search(opts: SearchOptions, log: Callable[[str], None] = print, progress: bool | None = None,
               on_trial_end: Callable[[optuna.Study, FrozenTrial], None] | None = None) -> SearchResult:
    """Run trials until the study holds `opts.trials` trained trials; trials.csv is written at the end, and when
    Ctrl-C or SIGTERM stops the search (KeyboardInterrupt, raised again, its `requeued` the number of interrupted
    trials queued again first)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    device = resolve_device(opts.device)
    data_set = load_data(opts.data_dir, dataset=opts.dataset)
    study = open_study(opts, data_set.record())
    claim_results_folder(opts.results_dir, opts.study, opts.storage_url)
    csv_path = trials_csv_path(opts.results_dir, opts.study)
    start = time.perf_counter()
    for number in fail_dead_local_trials(study, study.backend):
        log(f"trial {number}: its worker on this machine is gone (killed?); failed, and its parameters queued again")
    keeper = Bookkeeping(study, opts, on_trial_end)
    if keeper.tally.trained() >= opts.trials:
        write_trials_csv(study, csv_path)
        return SearchResult(study, count_trained(study), outcome_counts(study), 0.0, None, csv_path)

    if device.type == "cpu":
        set_cpu_threads(opts.threads, opts.jobs)
    train = data_set.train.head(opts.subset) if opts.subset else data_set.train
    data = (*to_device(train, device, data_set.stats), *to_device(data_set.val, device, data_set.stats))
    ctx = TrialContext(opts, data, device, log, progress=progress, classes=data_set.classes)
    try:
        stop_point()  # a stop requested while the data and the study were loading
        study.optimize(make_objective(ctx), n_trials=None, n_jobs=opts.jobs, callbacks=[keeper.after_trial],
                       catch=(TrialFailed,), gc_after_trial=False, show_progress_bar=False)
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: the interrupted trial queued again, then the table
        with signals_ignored():
            with contextlib.suppress(Exception):  # the stop is what the caller needs to hear of
                stop.requeued = requeue_interrupted(study)  # how many, for the caller's message
            with contextlib.suppress(Exception):
                write_trials_csv(study, csv_path)
        raise
    except BaseException:  # an error: the table as far as it got
        with contextlib.suppress(Exception):  # the error is what the caller needs to hear of
            write_trials_csv(study, csv_path)
        raise
    write_trials_csv(study, csv_path)
    return SearchResult(study, count_trained(study), outcome_counts(study), time.perf_counter() - start,
                        ctx.stop_reason, csv_path)

"""Workers sharing a study: who a worker is, its claim on a training slot and on a worker index, the study that
hands out queued retries first, and what becomes of the trials of a worker that died (failed, queued again once).

Only Optuna's public API: the study's own methods, and the storage's (`optuna.storages.BaseStorage`) methods on the
storage the search opened, addressed by the id `storage_id` looks up.
"""

from __future__ import annotations

import os
import platform
import time

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from search.errors import SearchError
from search.record import STALE_REASON, Outcome, records


def this_worker() -> str:
    """host:pid, stored on each trial so that a dead local worker's trials are found."""
    return f"{platform.node()}:{os.getpid()}"


def storage_id(storage: BaseStorage, study_name: str, number: int) -> int:
    """The storage's id of trial `number` of the study, which its methods take."""
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study_name), number)


def retried_number(trial: FrozenTrial) -> int | None:
    """The trial that `trial` retries, as Optuna's heartbeat retry (RetryHeartbeatStaleTrialCallback) records it;
    None if it retries none. Read as that callback's `retried_trial_number` reads it, which warns on every call
    (experimental since Optuna 2.8)."""
    return trial.system_attrs.get("failed_trial")


def retry_source(trial: optuna.Trial) -> int | None:
    """The trial a live trial retries after its worker went silent (Optuna's heartbeat retry), or None."""
    storage = trial.storage
    return retried_number(storage.get_trial(storage_id(storage, trial.study.study_name, trial.number)))


def is_retry(trial: FrozenTrial) -> bool:
    """A queued retry: ours (Ctrl-C, a dead local worker) or Optuna's (heartbeat)."""
    return "retry_of" in trial.user_attrs or retried_number(trial) is not None


class RetriesFirstStudy(optuna.Study):
    """A study whose next trial is a queued retry of an interrupted or killed trial when there is one, before the
    other queued trials (presets, descendants), so that a retry is never left waiting while the study reaches
    --trials. Optuna pops queued trials in storage order and offers no priority; `ask` claims a retry with the
    storage's atomic WAITING -> RUNNING (one worker wins it) and otherwise asks as Optuna does."""

    def __init__(self, study_name: str, storage: BaseStorage, sampler=None, pruner=None):
        super().__init__(study_name=study_name, storage=storage, sampler=sampler, pruner=pruner)
        self.backend = storage  # the storage as opened: Optuna's cache of finished trials wraps it in the study

    def ask(self, fixed_distributions=None) -> optuna.Trial:
        if not fixed_distributions:
            for waiting in self.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
                if not is_retry(waiting):
                    continue
                trial_id = storage_id(self.backend, self.study_name, waiting.number)
                try:
                    if self.backend.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                        return optuna.Trial(self, trial_id)
                except optuna.exceptions.UpdateFinishedTrialError:
                    continue
        return super().ask(fixed_distributions)


def claim_conflict(study: optuna.Study, number: int, key: str | None, n_trials: int) -> tuple[Outcome, int | None] | None:
    """None if trial `number` (already marked "training") may train; else (SURPLUS, None) or (DUPLICATE, other).

    Trials numbered below it that count, or that are still running and may yet claim a slot, are counted against
    it; higher-numbered ones never are. So two workers that race for the last slot, or for the same candidate,
    cannot both win, and the lower number does.
    """
    ahead = 0
    for r in records(study):
        if r.number >= number:
            continue
        pending = r.state == TrialState.RUNNING and r.stored_outcome in (None, Outcome.PENDING)
        if r.is_trained or pending:
            ahead += 1
            if key is not None and r.key == key:
                return Outcome.DUPLICATE, r.number
    return None if ahead < n_trials else (Outcome.SURPLUS, None)


def claim_worker_index(study: optuna.Study, worker: str, settle_s: float = 0.2) -> int:
    """The lowest worker index not yet claimed in the study's storage (user attributes worker_0, worker_1, ...),
    claimed for `worker` (host:pid); a worker that claimed one before gets it back.

    Storage offers no compare-and-set, so a claim is written, left `settle_s` seconds, and read back: of two workers
    that write one index at once, the one overwritten moves on. Two that also read back in the same instant can
    still share an index (and a sampler seed); docs/search.md says what is repeatable with several workers.
    """
    for index in range(100_000):
        key = f"worker_{index}"
        owner = study.user_attrs.get(key)
        if owner == worker:
            return index
        if owner is None:
            study.set_user_attr(key, worker)
            time.sleep(settle_s)
            if study.user_attrs.get(key) == worker:
                return index
    raise SearchError(f"study {study.study_name!r}: no free worker index among 100,000")


def fail_dead_local_trials(study: optuna.Study, storage: BaseStorage) -> list[int]:
    """RUNNING trials of a worker on this machine whose process is gone (SIGKILL, a crash): fail them now and queue
    their parameters again once, rather than waiting for the heartbeat grace period. `storage`: the study's, as
    opened. Returns their numbers."""
    host = platform.node()
    dead = []
    retried = {r.retry_of for r in records(study)}
    for r in records(study, (TrialState.RUNNING,)):
        worker_host, _, pid = r.worker.rpartition(":")
        if worker_host != host or not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        trial_id = storage_id(storage, study.study_name, r.number)
        try:
            # The outcome is written while the trial can still be updated (a finished trial cannot), so the report
            # and trials.csv say why it stopped instead of showing it "training".
            storage.set_trial_user_attr(trial_id, "outcome", Outcome.STALE.value)
            storage.set_trial_user_attr(trial_id, "reason", STALE_REASON)
            failed = storage.set_trial_state_values(trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:  # another worker's heartbeat check failed it first
            continue
        if failed:
            dead.append(r.number)
            if r.number not in retried:
                study.enqueue_trial(r.params, user_attrs={"retry_of": r.number})
    return dead


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def requeue_interrupted(study: optuna.Study) -> int:
    """Queue again, once, the parameters of trials stopped by Ctrl-C or SIGTERM; returns how many were queued."""
    recs = records(study)
    retried = {r.retry_of for r in recs} | {retried_number(r.trial) for r in recs}
    queued = 0
    for r in recs:
        # Only a complete candidate is worth running again: one stopped while its parameters were still being
        # drawn holds a partial draw, which the sampler would finish differently.
        if r.stored_outcome == Outcome.INTERRUPTED and r.has_spec and r.number not in retried:
            study.enqueue_trial(r.params, user_attrs={"retry_of": r.number})
            queued += 1
    return queued

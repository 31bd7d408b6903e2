"""Where studies live: opening Optuna storage (with retries and heartbeats), loading a stored study, the set-up
fingerprint a study keeps, provenance, and the workers' claims on training slots and their liveness."""

from __future__ import annotations

import os
import platform
import subprocess
import time
import warnings
from pathlib import Path

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from search.record import Outcome, records

HEARTBEAT = (10, 60)  # seconds: a worker beats every 10 s; a RUNNING trial silent for 60 s is failed and retried


class SearchError(RuntimeError):
    """A search, or a stored study, that cannot be used; the message says why and what to do."""


def open_storage(url: str, heartbeat: tuple[int, int] | None = HEARTBEAT) -> RDBStorage:
    """An RDB storage; with `heartbeat` (interval, grace in seconds) stale trials of killed workers are failed and
    retried once."""
    engine_kwargs = {}
    if url.startswith("sqlite"):
        # Several threads or processes on one file: wait for the lock instead of "database is locked".
        engine_kwargs = {"connect_args": {"timeout": 120}}
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    elif url.startswith("postgresql"):
        engine_kwargs = {"pool_pre_ping": True}
    for attempt in range(5):
        try:
            with warnings.catch_warnings():  # heartbeats are marked experimental, and have been since Optuna 2.8
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                beats = {} if heartbeat is None else dict(
                    heartbeat_interval=heartbeat[0], grace_period=heartbeat[1],
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1))
                return RDBStorage(url, engine_kwargs=engine_kwargs, **beats)
        except ImportError as exc:
            raise SearchError(f"storage {url!r}: its database driver is not installed ({exc})") from None
        except Exception as exc:
            # Workers started together on a fresh database race to create Optuna's tables; the loser retries.
            if "already exists" in str(exc) or "UniqueViolation" in str(exc) or "duplicate key" in str(exc):
                time.sleep(0.5 * (attempt + 1))
                continue
            raise SearchError(f"storage {url!r} cannot be opened: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    raise SearchError(f"storage {url!r}: its tables could not be created after 5 attempts")


def default_storage_url(results_dir: str, study: str) -> str:
    return f"sqlite:///{Path(results_dir) / (study + '.db')}"


def study_names(storage) -> list[str]:
    return [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]


def load_existing_study(study_name: str, storage_url: str) -> optuna.Study:
    storage = open_storage(storage_url, heartbeat=None)
    names = study_names(storage)
    if study_name not in names:
        known = f"; studies there: {', '.join(names)}" if names else "; it holds no study yet (run search first)"
        raise SearchError(f"no study {study_name!r} in {storage_url}{known}")
    return optuna.load_study(study_name=study_name, storage=storage)


def check_setup(storage, study_name: str, setup: dict) -> None:
    """Refuse to continue a stored study with a set-up (budget, objective, epochs, ...) other than its own."""
    if study_name not in study_names(storage):
        return
    stored = optuna.load_study(study_name=study_name, storage=storage).user_attrs.get("setup")
    if stored is not None and stored != setup:
        diff = ", ".join(f"{k} was {stored.get(k)!r}, now {v!r}" for k, v in setup.items() if stored.get(k) != v)
        raise SearchError(f"study {study_name!r} was created with a different set-up ({diff}); "
                          "continue it with its own options, or give a new --study name")


def provenance() -> dict:
    import torch

    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent.parent, timeout=5).stdout.strip()
    except Exception:
        commit = ""
    return {"code": commit or "unknown", "python": platform.python_version(), "torch": torch.__version__,
            "optuna": optuna.__version__, "host": platform.node()}


# ---- workers ------------------------------------------------------------------------------------

def this_worker() -> str:
    """host:pid, stored on each trial so that a dead local worker's trials are found."""
    return f"{platform.node()}:{os.getpid()}"


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


def fail_dead_local_trials(study: optuna.Study) -> list[int]:
    """RUNNING trials of a worker on this machine whose process is gone (SIGKILL, a crash): fail them now and queue
    their parameters again once, rather than waiting for the heartbeat grace period. Returns their numbers."""
    host = platform.node()
    dead = []
    retried = {r.retry_of for r in records(study)}
    for r in records(study, (TrialState.RUNNING,)):
        worker_host, _, pid = r.worker.rpartition(":")
        if worker_host != host or not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        if study._storage.set_trial_state_values(r.trial._trial_id, TrialState.FAIL):
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
    retried = {r.retry_of for r in recs} | {r.trial.system_attrs.get("failed_trial") for r in recs}
    queued = 0
    for r in recs:
        if r.stored_outcome == Outcome.INTERRUPTED and r.number not in retried:
            study.enqueue_trial(r.params, user_attrs={"retry_of": r.number})
            queued += 1
    return queued

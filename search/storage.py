"""Where studies live: opening Optuna storage (with retries and heartbeats), loading a stored study, the set-up
fingerprint a study keeps, provenance, and the workers' claims on training slots and their liveness."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import time
import warnings
from pathlib import Path

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from search.fsio import atomic_write_text, check_writable
from search.record import STALE_REASON, Outcome, records

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


# Letters, digits, '-', '_' and '.', not starting with a dot: a study name becomes a file and a folder name.
STUDY_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")


def check_study_name(name: str, option: str = "--study") -> str:
    """A name that becomes a file or folder name: letters, digits, '-', '_' and '.', not starting with a dot."""
    if not STUDY_NAME.fullmatch(name or ""):
        what = "a study name" if option == "--study" else "a name"
        raise SearchError(f"{option} {name!r}: {what} is 1 to 100 letters, digits, '-', '_' or '.', not starting "
                          "with a dot (it names files and a folder)")
    return name


def storage_url(url: str | None, results_dir: str, study: str) -> str:
    """The storage URL to use: the default SQLite file, a plain file path taken as SQLite (absolute), or the URL
    given; in-memory SQLite is refused (nothing would be kept)."""
    if url is None:
        return default_storage_url(results_dir, study)
    if "://" not in url:  # a plain path: an SQLite file there
        return f"sqlite:///{Path(url).expanduser().resolve()}"
    if url.startswith("sqlite"):
        path = url.split("://", 1)[1]
        if not path.startswith("/") or path in ("/", "/:memory:") or "mode=memory" in path:
            raise SearchError(f"--storage {url!r}: an in-memory SQLite database keeps nothing once the command ends; "
                              f"give a file, for example sqlite:///{Path(results_dir) / (study + '.db')}")
    return url


def sqlite_file(url: str) -> Path | None:
    """The file behind an SQLite URL (relative to the current folder after three slashes), else None."""
    return Path(url.split(":///", 1)[1].split("?", 1)[0]) if url.startswith("sqlite:///") else None


def describe_storage(url: str) -> str:
    """The URL, with the absolute file for SQLite: sqlite:///tmp/x is ./tmp/x, which people do not always expect."""
    path = sqlite_file(url)
    return f"{url} (the file {path.resolve()})" if path is not None else url


STORAGE_MARKER = ".storage"  # in each study's results folder: the storage URL whose study owns the folder


def _owner(results_dir: str, study: str, url: str) -> tuple[Path, str, str | None]:
    folder = Path(results_dir) / study
    db = sqlite_file(url)
    url = f"sqlite:///{db.resolve()}" if db is not None else url
    marker = folder / STORAGE_MARKER
    return marker, url, marker.read_text().strip() if marker.is_file() else None


def check_results_folder(results_dir: str, study: str, url: str) -> None:
    """Before any work, writing nothing: the study's results folder (trials.csv, report, certificates) and its
    SQLite file can be written, and the folder is not another storage's study of the same name (their files would
    overwrite each other)."""
    check_writable(Path(results_dir) / study)
    db = sqlite_file(url)
    if db is not None:
        check_writable(db)
    marker, url, owner = _owner(results_dir, study, url)
    if owner is not None and owner != url:
        raise SearchError(f"{marker.parent} holds the files of study {study!r} in {owner}, not {url}; give another "
                          "--results-dir (or --study) for this one")


def claim_results_folder(results_dir: str, study: str, url: str) -> None:
    """Mark the study's results folder as this storage's (once the study is open)."""
    check_results_folder(results_dir, study, url)
    marker, url, owner = _owner(results_dir, study, url)
    if owner is None:
        atomic_write_text(marker, url + "\n")


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
    if stored is not None and "dataset" not in stored:  # made before --dataset existed: it is an MNIST study
        stored = {**stored, "dataset": {"name": "mnist"}}
        setup = {**setup, "dataset": {"name": setup.get("dataset", {}).get("name", "mnist")}}
    # Keys a study stored: an older study, made before a key was added, is compared on the keys it has.
    changed = {k: v for k, v in setup.items() if k in (stored or {}) and stored[k] != v}
    if changed:
        def show(key: str, value) -> str:
            if key == "subset" and value is None:  # None means all of the training split
                return "all 50,000 images"
            if key == "dataset":  # the name, and whether the files are the same
                return repr(value.get("name"))
            return repr(value)

        if "dataset" in changed and stored["dataset"].get("name") == setup["dataset"].get("name"):
            changed["dataset"] = {"name": f"{setup['dataset'].get('name')} with other files (md5 sums differ)"}
        diff = ", ".join(f"{k} was {show(k, stored.get(k))}, now {show(k, v)}" for k, v in changed.items())
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
        # The outcome is written while the trial can still be updated (a finished trial cannot), so the report and
        # trials.csv say why it stopped instead of showing it "training".
        study._storage.set_trial_user_attr(r.trial._trial_id, "outcome", Outcome.STALE.value)
        study._storage.set_trial_user_attr(r.trial._trial_id, "reason", STALE_REASON)
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
        # Only a complete candidate is worth running again: one stopped while its parameters were still being
        # drawn holds a partial draw, which the sampler would finish differently.
        if r.stored_outcome == Outcome.INTERRUPTED and r.has_spec and r.number not in retried:
            study.enqueue_trial(r.params, user_attrs={"retry_of": r.number})
            queued += 1
    return queued

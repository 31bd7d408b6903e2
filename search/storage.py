"""Where studies live: storage URLs, opening Optuna storage (with retries and heartbeats), loading a stored study,
and which storage's study owns a results folder.

The set-up fingerprint is in search/setup.py, provenance in search/provenance.py, workers' claims and liveness in
search/workers.py; their names are importable from here too, as they were before the split.
"""

from __future__ import annotations

import re
import time
import warnings
from pathlib import Path

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

from search.errors import SearchError
from search.fsio import atomic_write_text, check_writable
# Importable from here as before the split (cli.py, search/options.py, search/objective.py, search/export.py,
# search/retrain.py and tests import them from search.storage).
from search.provenance import provenance  # noqa: F401
from search.setup import check_setup  # noqa: F401
from search.workers import (claim_conflict, claim_worker_index, fail_dead_local_trials,  # noqa: F401
                            requeue_interrupted, this_worker)

HEARTBEAT = (10, 60)  # seconds: a worker beats every 10 s; a RUNNING trial silent for 60 s is failed and retried


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


STORAGE_MARKER = ".storage"  # in each study's results folder: the storage whose study owns the folder
# What the marker holds for the default database, <results>/<study>.db: its place relative to the study's folder, so
# a results folder copied or moved elsewhere is owned by its own database there. Any other storage is written as
# its URL (an SQLite file as an absolute path).
RELATIVE = "relative:"  # then a path from the study's folder


def _marker_text(results_dir: str, study: str, url: str) -> str:
    """What the marker says for `url`: for the default database (or a URL naming its file), RELATIVE and its path
    from the study's folder; else the URL, an SQLite file's made absolute."""
    db = sqlite_file(url)
    if db is None:
        return url
    if db.resolve() == (Path(results_dir) / f"{study}.db").resolve():
        return f"{RELATIVE}../{study}.db"
    return f"sqlite:///{db.resolve()}"


def _legacy_default(marker: Path, owner: str, study: str, text: str) -> bool:
    """An absolute marker of earlier versions that named the default database of the folder's old place (a file
    <study>.db, wherever it was), read where the folder's own default database is in use and exists."""
    old = sqlite_file(owner)
    own = marker.parent.parent / f"{study}.db"
    return (text.startswith(RELATIVE) and old is not None and old.name == f"{study}.db"
            and (own.is_file() or old.resolve() == own.resolve()))


def _named(folder: Path, text: str) -> str:
    """A marker's text as people read it: the file for the default database, else the URL."""
    return str((folder / text[len(RELATIVE):]).resolve()) if text.startswith(RELATIVE) else text


def check_results_folder(results_dir: str, study: str, url: str) -> None:
    """Before any work, writing nothing: the study's results folder (trials.csv, report, certificates) and its
    SQLite file can be written, and the folder is not another storage's study of the same name (their files would
    overwrite each other)."""
    check_writable(Path(results_dir) / study)
    db = sqlite_file(url)
    if db is not None:
        check_writable(db)
    marker = Path(results_dir) / study / STORAGE_MARKER
    owner, text = marker.read_text().strip() if marker.is_file() else None, _marker_text(results_dir, study, url)
    if owner is None or owner == text or _legacy_default(marker, owner, study, text):
        return
    raise SearchError(f"{marker.parent} holds the files of study {study!r} in {_named(marker.parent, owner)}, not "
                      f"{_named(marker.parent, text)}; give another --results-dir (or --study) for this one")


def claim_results_folder(results_dir: str, study: str, url: str) -> None:
    """Mark the study's results folder as this storage's (once the study is open); an earlier version's absolute
    marker of the default database is rewritten relative to the folder."""
    check_results_folder(results_dir, study, url)
    marker = Path(results_dir) / study / STORAGE_MARKER
    text = _marker_text(results_dir, study, url)
    if not marker.is_file() or marker.read_text().strip() != text:
        atomic_write_text(marker, text + "\n")


def study_names(storage) -> list[str]:
    return optuna.get_all_study_names(storage)


def load_existing_study(study_name: str, storage_url: str) -> optuna.Study:
    storage = open_storage(storage_url, heartbeat=None)
    names = study_names(storage)
    if study_name not in names:
        known = f"; studies there: {', '.join(names)}" if names else "; it holds no study yet (run search first)"
        raise SearchError(f"no study {study_name!r} in {storage_url}{known}")
    return optuna.load_study(study_name=study_name, storage=storage)

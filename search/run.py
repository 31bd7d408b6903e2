"""The `search` command, callable from Python with the CLI's behaviour: the pre-flight checks that refuse bad input
before anything is written, the search with Ctrl-C and SIGTERM stopping it at safe points, and the clean-up after
such a stop (the interrupted trial queued again, trials.csv rewritten), raised as `Interrupted` with its exit code."""

from __future__ import annotations

import signal
from typing import Callable

from search.data import DataError, check_data_root, load_data
from search.engine import resolve_device
from search.engine.runtime import stop_at_safe_points
from search.errors import SearchError
from search.options import SearchOptions
from search.record import nothing_trained_well
from search.refusals import CommandError, Interrupted
from search.storage import check_results_folder, load_existing_study
from search.study import SearchResult, run_search, trials_csv_path, write_trials_csv
from search.workers import requeue_interrupted


def search_options(heartbeat: str | tuple[int, int], worker: str | None = None, **values) -> SearchOptions:
    """SearchOptions from the CLI's values (heartbeat as "interval,grace" seconds; worker None: this process's);
    bad ones as CommandError."""
    try:
        beat = tuple(int(x) for x in heartbeat.split(",")) if isinstance(heartbeat, str) else tuple(heartbeat)
        return SearchOptions(heartbeat=beat, **values, **({"worker": worker} if worker else {}))
    except (SearchError, ValueError) as exc:
        raise CommandError(str(exc)) from None


def refuse_sqlite_across_threads(opts: SearchOptions) -> None:
    if opts.jobs > 1 and opts.storage_url.startswith("sqlite"):
        raise SearchError(f"--jobs={opts.jobs} with SQLite storage: SQLite serialises every write and parallel "
                          "trials would wait on its lock; use a server database (--storage postgresql://...) "
                          "for parallel trials, or --jobs 1")


def preflight(opts: SearchOptions) -> None:
    """Refuse, before anything is written, what would fail later: the device, the data, parallel SQLite, the results
    folder (writable, and not another storage's)."""
    try:
        resolve_device(opts.device)
        check_data_root(opts.data_dir, opts.dataset)
        refuse_sqlite_across_threads(opts)
        check_results_folder(opts.results_dir, opts.study, opts.storage_url)
        load_data(opts.data_dir, dataset=opts.dataset)  # absent files: the download is tried, and refused here
    except (SearchError, DataError, ValueError) as exc:
        raise CommandError(str(exc)) from None


def stop_cleanly(opts: SearchOptions, sigterm: bool) -> Interrupted:
    """After Ctrl-C or SIGTERM: queue the interrupted trial again and rewrite trials.csv; the error to raise, saying
    so. A signal before the study existed leaves nothing to tidy. A second signal during the clean-up is ignored: it
    would interrupt it half-way."""
    before = signal.signal(signal.SIGTERM, signal.SIG_IGN), signal.signal(signal.SIGINT, signal.SIG_IGN)
    n = 0
    try:
        study = load_existing_study(opts.study, opts.storage_url)
        n = requeue_interrupted(study)
        write_trials_csv(study, trials_csv_path(opts.results_dir, opts.study))
    except SearchError:  # interrupted before the study was created
        pass
    finally:
        signal.signal(signal.SIGTERM, before[0])
        signal.signal(signal.SIGINT, before[1])
    sig = "SIGTERM" if sigterm else "Ctrl-C"
    return Interrupted(f"{sig}: search stopped; the running trial is stored as interrupted"
                       f"{' and queued again' if n else ''}. Run the same command to continue to {opts.trials} "
                       "trials.", sigterm)


def search_command(opts: SearchOptions, log: Callable[[str], None] = print,
                   on_trial_end: Callable | None = None) -> SearchResult:
    """Pre-flight, then the search with Ctrl-C and SIGTERM stopping it between two steps or two trials; a stop is
    cleaned up and raised as `Interrupted` (exit 130 or 143), unusable input as `CommandError` (exit 2)."""
    preflight(opts)
    try:
        with stop_at_safe_points():
            return run_search(opts, log=log, on_trial_end=on_trial_end)
    except (SearchError, DataError) as exc:
        raise CommandError(str(exc)) from None
    except KeyboardInterrupt as exc:
        raise stop_cleanly(opts, getattr(exc, "signal_name", "SIGINT") == "SIGTERM") from None


def unfinished(result: SearchResult) -> str | None:
    """Why a finished search is a failure (exit 1): it stopped early, or nothing trained well; None when neither."""
    return result.stop_reason or nothing_trained_well(result.study)

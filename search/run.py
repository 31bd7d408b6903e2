"""The `search` command, callable from Python with the CLI's behaviour: the pre-flight checks that refuse bad input
before anything is written, the search with Ctrl-C and SIGTERM stopping it at safe points, and the clean-up after
such a stop (run_search queues the interrupted trial again and writes trials.csv), raised as `Interrupted` with its
exit code."""

from __future__ import annotations

from typing import Callable

from search.data import DataError, check_data_root, load_data
from search.engine import resolve_device
from search.engine.runtime import stop_at_safe_points
from search.errors import SearchError
from search.options import SearchOptions
from search.record import nothing_trained_well
from search.refusals import CommandError, Interrupted
from search.storage import check_results_folder
from search.study import SearchResult, run_search


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


def stop_message(opts: SearchOptions, stop: KeyboardInterrupt) -> Interrupted:
    """After Ctrl-C or SIGTERM (run_search has queued the interrupted trial again and written trials.csv; a signal
    before the study existed left nothing to tidy): the error to raise, saying so."""
    sigterm = getattr(stop, "signal_name", "SIGINT") == "SIGTERM"
    queued = getattr(stop, "requeued", 0)
    return Interrupted(f"{'SIGTERM' if sigterm else 'Ctrl-C'}: search stopped; the running trial is stored as "
                       f"interrupted{' and queued again' if queued else ''}. Run the same command to continue to "
                       f"{opts.trials} trials.", sigterm)


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
        raise stop_message(opts, exc) from None


def unfinished(result: SearchResult) -> str | None:
    """Why a finished search is a failure (exit 1): it stopped early, or nothing trained well; None when neither."""
    return result.stop_reason or nothing_trained_well(result.study)


def summary_line(study: str, trained: int, counts: dict[str, int], wall_s: float) -> str:
    """The line that ends a search: the trained total and its parts, which add up to it. A trial another worker is
    still training holds one of the --trials slots, so it is in the total and named as a part of it (a worker that
    finishes while another trains would otherwise show "8 trained, 7 completed, 0 pruned")."""
    parts = [f"{counts.get(outcome, 0)} {outcome}" for outcome in ("completed", "pruned", "failed")]
    running = counts.get("training", 0)
    if running:
        parts.append(f"{running} still training in {'another worker' if running == 1 else 'other workers'}")
    return (f"study {study}: {trained} trained ({', '.join(parts)}), {counts.get('rejected', 0)} rejected; "
            f"{wall_s:.0f} s this run")

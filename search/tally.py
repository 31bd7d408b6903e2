"""Running figures of a study for what a search does after each trial: outcome counts, trained trials, the best
network (a re-run counts with its original), every trial's parameter key and the few records front descent
chooses from, kept up to date from the trials that changed since the last look.

Optuna's storage keeps the finished trials it has read in memory and asks the database only for new trials and
those not finished (`study.get_trials`); the figures here are updated from those trials alone, so one finished
trial's bookkeeping costs about the same in a study of 10 trials and of 1,000 (benchmarks/storage_reads.py).
A finished trial never changes again; a waiting or running one is looked at again each time. The figures are the
study's, across every worker sharing its storage, and agree with search/record.py's `count_trained`,
`outcome_counts` and `best`, which read every trial.
"""

from __future__ import annotations

import statistics
import threading
import weakref

import optuna

from search.record import TrialRecord, params_key


class StudyTally:
    """The study's figures as of the last `refresh()`; one per study object (`tally_of`), safe across threads."""

    def __init__(self, study: optuna.Study):
        self._study = weakref.ref(study)  # the registry is keyed weakly by the study: no reference back to it
        self._lock = threading.Lock()
        self._seen = 0  # trials looked at: numbers 0 to _seen - 1
        self._open: dict[int, TrialRecord] = {}  # waiting or running: looked at again on each refresh
        self._finished: set[int] = set()  # numbers of the finished trials taken in: they never change again
        self._counts: dict[str, int] = {}  # outcomes of the finished trials
        self._trained = 0  # finished trials that used a training slot
        # The networks (completed candidates that are not re-runs) and the validation accuracy of each one's runs,
        # as record.runs_of has them; re-runs taken before their original (trials out of order) wait in _early_runs.
        self._nets: dict[int, TrialRecord] = {}
        self._runs: dict[int, list[float]] = {}
        self._early_runs: dict[int, list[float]] = {}
        self._best: int | None = None  # the best network's number
        self._descent = _DescentInputs()
        self._evolution: dict[int, TrialRecord] = {}  # finished candidates and evolution steps (search/evolution.py)
        # Every trial's parameters (record.params_key), queued ones included: Optuna's enqueue_trial passes over a
        # step with any of them (skip_if_exists), so the steps choose among the others.
        self._keys: set[tuple] = set()

    def refresh(self) -> StudyTally:
        """Read the trials that are new or were not finished at the last look, and take them in."""
        with self._lock:
            trials = self._study().get_trials(deepcopy=False)  # in number order
            if trials and trials[-1].number == len(trials) - 1:  # numbered 0 to len - 1, as storage numbers them
                changed = [trials[n] for n in sorted(self._open)] + trials[self._seen:]
                self._seen = len(trials)
            else:  # a gap: another worker's new trial not yet committed; look at them all, and again next time
                changed, self._seen = trials, 0
            for trial in changed:
                self._take(TrialRecord(trial))
        return self

    def _take(self, r: TrialRecord) -> None:
        self._keys.add(params_key(r.fixed_params))  # a running trial's, again once it has all its parameters
        if not r.state.is_finished():
            self._open[r.number] = r
            return
        self._open.pop(r.number, None)
        if r.number in self._finished:
            return
        self._finished.add(r.number)
        self._descent.take(r)
        if r.is_candidate or _is_step(r):
            self._evolution[r.number] = r
        self._counts[r.outcome.value] = self._counts.get(r.outcome.value, 0) + 1
        self._trained += r.is_trained
        if r.is_candidate:
            self._take_run(r)

    def _take_run(self, r: TrialRecord) -> None:
        source = r.attrs.get("rerun_of")
        if source is None:
            self._nets[r.number] = r
            self._runs[r.number] = [r.values[0], *self._early_runs.pop(r.number, [])]
            changed = r.number
        elif source in self._nets:
            self._runs[source].append(r.values[0])
            changed = source
        else:
            self._early_runs.setdefault(source, []).append(r.values[0])
            return
        if self._best is None or self._best == changed:  # the best's mean may have fallen: look at them all
            self._best = max(self._nets, key=self._network_key)
        elif self._network_key(changed) > self._network_key(self._best):
            self._best = changed

    def _network_key(self, number: int) -> tuple:
        """record.network_rank of a network, from the runs kept here."""
        return (statistics.fmean(self._runs[number]), -(self._nets[number].n_params or 0), -number)

    def counts(self) -> dict[str, int]:
        """Trials per outcome ("completed", "rejected", "queued", ...), as `record.outcome_counts`."""
        with self._lock:
            counts = dict(self._counts)
            for r in self._open.values():
                counts[r.outcome.value] = counts.get(r.outcome.value, 0) + 1
        return counts

    def trained(self) -> int:
        """Trials that used a training slot, as `record.count_trained`."""
        with self._lock:
            return self._trained + sum(r.is_trained for r in self._open.values())

    def params_keys(self) -> frozenset:
        """The parameter keys of every trial looked at (see `_keys`)."""
        with self._lock:
            return frozenset(self._keys)

    def best(self) -> TrialRecord | None:
        """The best network, as `record.best_of` picks it: the highest mean validation accuracy over its runs."""
        with self._lock:
            return None if self._best is None else self._nets[self._best]

    def best_network(self) -> tuple[TrialRecord, float] | None:
        """(the best network, the mean validation accuracy of its runs), or None before one completed."""
        with self._lock:
            if self._best is None:
                return None
            return self._nets[self._best], statistics.fmean(self._runs[self._best])

    def descent_records(self) -> list[TrialRecord]:
        """The records `descent.next_descent` can choose from, in number order: it returns for them what it returns
        for every trial of the study (tests/test_storage.py holds the two equal)."""
        with self._lock:
            return self._descent.records([r for r in self._open.values() if r.shrunk_from is not None])

    def evolution_records(self) -> list[TrialRecord]:
        """The records `evolution.next_step` reads, in number order: every finished candidate and evolution step,
        the steps waiting or training, and the trained trial completed last."""
        with self._lock:
            chosen = {**self._evolution, **{r.number: r for r in self._open.values() if _is_step(r)}}
            if self._descent.latest is not None:
                chosen[self._descent.latest.number] = self._descent.latest
            return [chosen[n] for n in sorted(chosen)]


def _is_step(r: TrialRecord) -> bool:
    """Queued by the evolution or front descent (search/evolution.py's STEP_ATTRS; not imported: the tally stays
    free of the search space)."""
    return any(r.attrs.get(k) is not None for k in ("parent", "rerun_of", "shrunk_from"))


class _DescentInputs:
    """What next_descent reads of the finished trials: every descendant (its sources, shrinks and levels), the
    trained trial completed last (descents never come twice in a row) and, of the candidates with a drawn
    parameter target, those that can be the smallest at some accuracy level: the accuracy/size front, where of
    two with the same parameters and accuracy the lower number stays (next_descent's tie-break)."""

    def __init__(self):
        self.descendants: dict[int, TrialRecord] = {}
        self.latest: TrialRecord | None = None
        self.front: list[TrialRecord] = []

    def take(self, r: TrialRecord) -> None:
        if r.shrunk_from is not None:
            self.descendants[r.number] = r
        done = r.trial.datetime_complete
        if r.is_trained and done is not None and (
                self.latest is None or (done, -r.number) > (self.latest.trial.datetime_complete, -self.latest.number)):
            self.latest = r  # of two completed at the same instant, max() in number order keeps the lower number
        if r.is_candidate and r.n_params is not None and "param_target" in r.params:
            if not any(_beats(f, r) for f in self.front):
                self.front = [f for f in self.front if not _beats(r, f)] + [r]

    def records(self, open_descendants: list[TrialRecord]) -> list[TrialRecord]:
        chosen = {**self.descendants, **{r.number: r for r in self.front + open_descendants}}
        if self.latest is not None:
            chosen[self.latest.number] = self.latest
        return [chosen[n] for n in sorted(chosen)]


def _beats(a: TrialRecord, b: TrialRecord) -> bool:
    """`a` has no more parameters and no lower accuracy than `b`, and comes first in next_descent's order."""
    return (a.n_params <= b.n_params and a.values[0] >= b.values[0]
            and (a.n_params, -a.values[0], a.number) < (b.n_params, -b.values[0], b.number))


_TALLIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TALLIES_LOCK = threading.Lock()


def tally_of(study: optuna.Study) -> StudyTally:
    """The study object's tally, made (and so read in full, once) on first use; call `refresh()` to update it."""
    with _TALLIES_LOCK:
        if study not in _TALLIES:
            _TALLIES[study] = StudyTally(study)
        return _TALLIES[study]

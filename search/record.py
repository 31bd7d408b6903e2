"""One typed record of a stored trial: what budgetnas writes on an Optuna trial, and how it is read back.

Every reader of a stored trial (the search, `best`, `report`, the CLI, the benchmarks) goes through `TrialRecord`;
every writer through `TrialWriter`. The attribute names are Optuna user attributes, so a study also opens in
optuna-dashboard and `trials_dataframe()`; they are the same as before this module existed, so older studies open.

Outcomes (the user attribute "outcome"):

    pending      the trial has started and has not been judged yet
    rejected     over the budget, an invalid layout, or a receptive field under the minimum: never trained; PRUNED,
                 with a positive constraint value so that the sampler learns to avoid it
    duplicate    same spec, training config and engine settings (precision, CPU shards) as a stored trial: that
                 trial's result is reused, nothing trained
    training     claimed a training slot and is training now (state RUNNING)
    completed    trained to the last epoch
    pruned       stopped early by the pruner
    failed       the training blew up (NaN loss, an exception, out of memory): FAIL, with the reason
    interrupted  Ctrl-C or SIGTERM during the trial: FAIL, parameters queued again
    surplus      another worker filled the last training slot first: PRUNED, nothing trained

and two that are read, never written: "queued" (WAITING: an enqueued preset or retry) and "stale" (its worker died
while it was pending or training; heartbeats or the next run failed it).
"""

from __future__ import annotations

import json
import math
import statistics
from enum import Enum
from functools import cached_property
from typing import Iterable

import optuna
from optuna.trial import FrozenTrial, TrialState

from models.spec import NetSpec
from search.budgets import ATTRS
from search.engine.config import History, TrainConfig


class Outcome(str, Enum):
    PENDING = "pending"
    REJECTED = "rejected"
    DUPLICATE = "duplicate"
    TRAINING = "training"
    COMPLETED = "completed"
    PRUNED = "pruned"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    SURPLUS = "surplus"
    QUEUED = "queued"  # read only
    STALE = "stale"  # read only

    def __str__(self) -> str:
        return self.value


TRAINED = frozenset({Outcome.TRAINING, Outcome.COMPLETED, Outcome.PRUNED, Outcome.FAILED})  # used a training slot
STALE_REASON = "its worker stopped (killed?): found dead or silent past the heartbeat grace"


def params_key(params: dict) -> tuple:
    """What tells two trials' fixed parameters apart (floats to 9 places), for the steps' duplicate checks."""
    return tuple(sorted((k, round(v, 9) if isinstance(v, float) else v) for k, v in params.items()))


class TrialRecord:
    """A stored trial, typed: read-only properties over a FrozenTrial's state, values and user attributes."""

    def __init__(self, trial: FrozenTrial):
        self.trial = trial
        self.attrs = trial.user_attrs

    def __repr__(self) -> str:
        return f"TrialRecord({self.number}, {self.outcome.value}, n_params={self.n_params})"

    number = property(lambda self: self.trial.number)
    state = property(lambda self: self.trial.state)
    values = property(lambda self: self.trial.values)
    params = property(lambda self: self.trial.params)
    # The parameters Optuna's `enqueue_trial(skip_if_exists=True)` compares a queued step with: a queued trial's
    # fixed ones (its `params` stay empty until it runs), else those it was suggested.
    fixed_params = property(lambda self: self.trial.system_attrs.get("fixed_params", self.trial.params))
    n_params = property(lambda self: self.attrs.get("n_params"))
    receptive_field = property(lambda self: self.attrs.get("receptive_field"))
    macs = property(lambda self: self.attrs.get("macs"))
    activation_bytes = property(lambda self: self.attrs.get("activation_bytes"))  # peak, int8, batch 1
    model_bytes = property(lambda self: self.attrs.get("model_bytes"))  # int8 tensor payload
    key = property(lambda self: self.attrs.get("key"))  # spec and training config, hashed: what makes a duplicate
    preset = property(lambda self: self.attrs.get("preset", ""))
    duplicate_of = property(lambda self: self.attrs.get("duplicate_of"))
    shrunk_from = property(lambda self: self.attrs.get("shrunk_from"))  # front descent's source trial (descent.py)
    retry_of = property(lambda self: self.attrs.get("retry_of"))
    worker = property(lambda self: str(self.attrs.get("worker", "")))
    wall_s = property(lambda self: self.attrs.get("wall_s"))
    device = property(lambda self: self.attrs.get("device"))
    precision = property(lambda self: self.attrs.get("precision", ""))
    shards = property(lambda self: self.attrs.get("shards"))
    history = property(lambda self: self.attrs.get("history") or [])  # one dict per epoch (EpochRecord's fields)
    has_spec = property(lambda self: "spec" in self.attrs)

    def size(self, metric: str = "params") -> float:
        """The trial's figure of a size metric (search.budgets.METRICS); inf where it was never stored."""
        value = self.attrs.get(ATTRS[metric])
        return math.inf if value is None else value

    @property
    def origin(self) -> str:
        """Where the candidate came from, as a person reads it."""
        if self.preset:
            return f"preset {self.preset}"
        if self.shrunk_from is not None:
            return f"trial {self.shrunk_from} shrunk to {self.attrs.get('shrink')}"
        if self.attrs.get("parent") is not None:  # an evolution child (search/evolution.py)
            return f"trial {self.attrs['parent']}, {self.attrs.get('mutation')}"
        if self.attrs.get("rerun_of") is not None:
            return f"trial {self.attrs['rerun_of']} re-run with seed {self.attrs.get('seed')}"
        if self.retry_of is not None:
            return f"retry of trial {self.retry_of}"
        return "sampler"

    @property
    def stored_outcome(self) -> Outcome | None:
        """The outcome as written, or None for a trial that never got one (queued, or older than budgetnas)."""
        value = self.attrs.get("outcome")
        return Outcome(value) if value in Outcome._value2member_map_ else None

    @property
    def outcome(self) -> Outcome:
        """What happened to it, as a person reads it: the stored outcome, or "queued" and "stale"."""
        if self.state == TrialState.WAITING:
            return Outcome.QUEUED
        stored = self.stored_outcome
        if self.state == TrialState.FAIL and stored in (None, Outcome.TRAINING, Outcome.PENDING):
            return Outcome.STALE
        return stored or Outcome.PENDING

    @property
    def reason(self) -> str:
        return STALE_REASON if self.outcome == Outcome.STALE else self.attrs.get("reason", "")

    @property
    def is_trained(self) -> bool:
        """Whether it used one of the study's `--trials` training slots (a "training" one only while it runs)."""
        stored = self.stored_outcome
        return stored in TRAINED and (stored != Outcome.TRAINING or self.state == TrialState.RUNNING)

    @property
    def feasible(self) -> bool:
        return self.attrs.get("constraint", 1) <= 0

    @property
    def is_candidate(self) -> bool:
        """Trained to its last epoch within the budget: the only trials that can be the best."""
        return self.state == TrialState.COMPLETE and self.stored_outcome == Outcome.COMPLETED and self.feasible

    @property
    def val_acc(self) -> float | None:
        """Validation accuracy (fraction): the trial's value, else its last reported epoch."""
        if self.values:
            return self.values[0]
        iv = self.trial.intermediate_values
        return iv[max(iv)] if iv else None

    @property
    def epochs_trained(self) -> int:
        return self.attrs.get("epochs_trained", len(self.history))

    @cached_property
    def spec(self) -> NetSpec:
        return NetSpec.from_json(self.attrs["spec"])

    @cached_property
    def config(self) -> TrainConfig:
        return TrainConfig.from_dict(self.attrs["config"])


def study_dataset(study: optuna.Study) -> str:
    """The set a study searched (a study made before --dataset existed searched MNIST)."""
    return (study.user_attrs.get("setup") or {}).get("dataset", {}).get("name", "mnist")


def study_target(study: optuna.Study) -> float | None:
    """The target accuracy a study was given (fraction), or its set's default; None when neither exists."""
    if "target" in study.user_attrs:
        return study.user_attrs["target"]
    from search.data import KNOWN

    return KNOWN[study_dataset(study)].target if study_dataset(study) in KNOWN else None


def study_size_metric(study: optuna.Study) -> str:
    """The figure a study's front is drawn against: its --size-metric (a study made before it: parameters)."""
    return (study.user_attrs.get("setup") or {}).get("size_metric", "params")


def records(study: optuna.Study, states: Iterable[TrialState] | None = None) -> list[TrialRecord]:
    return [TrialRecord(t) for t in study.get_trials(deepcopy=False, states=tuple(states) if states else None)]


def candidates(study: optuna.Study) -> list[TrialRecord]:
    """Trials trained to their last epoch within the budget: the only candidates for the best."""
    return [r for r in records(study, (TrialState.COMPLETE,)) if r.is_candidate]


def runs_of(done: list[TrialRecord]) -> dict[int, list[float]]:
    """Validation accuracy of every run of each network, keyed by the original trial's number: its own value, then
    those of its completed re-runs (user attribute `rerun_of`: the evolution's re-runs of tied members and winner
    descent's re-run of the best). A re-run is never a network of its own; one whose original is not in `done` is
    left out."""
    runs = {r.number: [r.values[0]] for r in done if r.attrs.get("rerun_of") is None}
    for r in done:
        source = r.attrs.get("rerun_of")
        if source in runs:
            runs[source].append(r.values[0])
    return runs


def accuracy(r: TrialRecord, runs: dict[int, list[float]]) -> float:
    """The network's validation accuracy: the mean of its runs (its own value where it has no re-run)."""
    return statistics.fmean(runs.get(r.number, [r.values[0]]))


def networks(done: list[TrialRecord]) -> tuple[list[TrialRecord], dict[int, list[float]]]:
    """(the networks among `done`: every trial but the re-runs, in the order given; `runs_of(done)`)."""
    runs = runs_of(done)
    return [r for r in done if r.number in runs], runs


def network_rank(r: TrialRecord, runs: dict[int, list[float]]) -> tuple:
    """The order of networks, max() first: the mean validation accuracy of the runs, then fewer parameters, then the
    lower trial number."""
    return (accuracy(r, runs), -(r.n_params or 0), -r.number)


def best_of(done: list[TrialRecord]) -> TrialRecord | None:
    """The network first in `network_rank`'s order; None if there is none."""
    nets, runs = networks(done)
    return max(nets, key=lambda r: network_rank(r, runs)) if nets else None


def best(study: optuna.Study) -> TrialRecord | None:
    """The feasible completed network with the highest validation accuracy (`best_of`)."""
    return best_of(candidates(study))


def leaderboard(done: list[TrialRecord]) -> tuple[list[TrialRecord], dict[int, list[float]]]:
    """(the networks among the candidates `done`, best first in `network_rank`'s order; their runs): re-runs count
    with their original."""
    nets, runs = networks(done)
    return sorted(nets, key=lambda r: network_rank(r, runs), reverse=True), runs


def smallest_reaching(done: list[TrialRecord], target: float, metric: str = "params") -> TrialRecord | None:
    """The smallest network by `metric` whose validation accuracy (the mean of its runs) reached `target` (higher
    accuracy, then fewer parameters, break ties); a re-run counts with its original, never alone."""
    nets, runs = networks(done)
    reached = [r for r in nets if accuracy(r, runs) >= target]
    return min(reached, key=lambda r: (r.size(metric), -accuracy(r, runs), r.size())) if reached else None


def pareto_front(done: list[TrialRecord], metric: str = "params") -> list[TrialRecord]:
    """The networks no other network dominates (at least as accurate, by the mean of its runs, with no more of
    `metric`, better in one), smallest first: the accuracy/size front. Re-runs count with their original."""
    nets, runs = networks(done)
    front: list[TrialRecord] = []
    for r in sorted(nets, key=lambda r: (r.size(metric), -accuracy(r, runs), r.size())):
        if not front or accuracy(r, runs) > accuracy(front[-1], runs):
            front.append(r)
    return front


def count_trained(study: optuna.Study) -> int:
    return sum(r.is_trained for r in records(study))


def outcome_counts(study: optuna.Study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in records(study):
        counts[r.outcome.value] = counts.get(r.outcome.value, 0) + 1
    return counts


def nothing_trained_well(study: optuna.Study) -> str | None:
    """Why a study whose trained trials all failed (none completed or pruned) has nothing to show; else None."""
    recs = records(study)
    trained = [r for r in recs if r.is_trained or r.outcome == Outcome.STALE]
    if not trained or any(r.outcome in (Outcome.COMPLETED, Outcome.PRUNED, Outcome.TRAINING) for r in trained):
        return None
    reasons: dict[str, int] = {}
    for r in trained:
        reasons[r.reason or r.outcome.value] = reasons.get(r.reason or r.outcome.value, 0) + 1
    common, n = max(reasons.items(), key=lambda item: item[1])
    return (f"every one of the study's {len(trained)} trained trials failed, none completed or was pruned; "
            f"{n} of them: {common}")


def trial_frame(study: optuna.Study):
    """One row per trial: number, state, outcome, values, parameters, spec and history as JSON strings."""
    import pandas as pd

    rows = []
    recs = records(study)
    retried_as = {r.retry_of: r.number for r in recs if r.retry_of is not None}
    for r in recs:
        reason = r.reason + (f"; queued again as trial {retried_as[r.number]}" if r.number in retried_as else "")
        rows.append({
            "number": r.number, "state": r.state.name, "outcome": r.outcome.value, "reason": reason,
            "n_params": r.n_params, "receptive_field": r.receptive_field, "macs": r.macs,
            "activation_bytes": r.activation_bytes, "model_bytes": r.model_bytes, "val_acc": r.val_acc,
            "epochs_trained": r.epochs_trained, "wall_s": r.wall_s, "device": r.device, "precision": r.precision,
            "shards": r.shards, "preset": r.preset, "duplicate_of": r.duplicate_of,
            "shrunk_from": r.shrunk_from, "origin": r.origin,
            "datetime_start": r.trial.datetime_start, "datetime_complete": r.trial.datetime_complete,
            "spec": r.attrs.get("spec", ""), "repaired_from": r.attrs.get("repaired_from", ""),
            "config": json.dumps(r.attrs.get("config", {}), sort_keys=True), "history": json.dumps(r.history),
            **{f"param_{k}": v for k, v in r.params.items()}})
    return pd.DataFrame(rows)


class TrialWriter:
    """Writes budgetnas's attributes on a live Optuna trial; the names match what TrialRecord reads."""

    def __init__(self, trial: optuna.Trial):
        self.trial = trial

    def get(self, name: str, default=None):
        return self.trial.user_attrs.get(name, default)

    def set(self, **attrs) -> None:
        for name, value in attrs.items():
            self.trial.set_user_attr(name, value.value if isinstance(value, Outcome) else value)

    def close(self, outcome: Outcome, reason: str | None, **attrs) -> None:
        """The one place a trial's outcome is written, with why (a completed trial needs no reason)."""
        self.set(outcome=outcome, **({} if reason is None else {"reason": reason}), **attrs)

    def set_constraint(self, value: float) -> None:
        """<= 0 is feasible: parameters minus the budget, plus one since the rule is strict; failures are 1.

        The sampler reads the trial's constraint (TPE and NSGA-II steer away from infeasible trials), which Optuna
        lets us set once; the user attribute "constraint" keeps the latest word (a failed trial is never the best).
        """
        if "constraint_set" not in self.trial.user_attrs:
            self.trial.set_constraint("budget", float(value))
            self.trial.set_user_attr("constraint_set", True)
        self.trial.set_user_attr("constraint", float(value))

    def epochs(self, so_far: list) -> None:
        self.trial.set_user_attr("history", so_far)  # stored per epoch: a killed trial keeps its curve
        # The same curve as short text: optuna-dashboard cuts attributes that are not strings at 1,024 characters
        # (a 20-epoch history is about 3,000), and pareto studies have no intermediate values to plot.
        self.trial.set_user_attr("val_acc_curve", " ".join(f"{e['val_acc'] * 100:.2f}" for e in so_far))

    def trained(self, history: History, wall_s: float) -> None:
        self.set(wall_s=wall_s, device=history.device, precision=history.precision, shards=history.shards,
                 epochs_trained=len(history.epochs))  # the history itself was stored per epoch


"""The study's storage without training: the running tally against full reads, front descent's inputs, retries
handed out first, a dead local worker's trials, and the names other modules import from search.storage."""

import random
import subprocess
import sys

import optuna
import pytest
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from search.descent import next_descent
from search.record import Outcome, TrialRecord, best, count_trained, outcome_counts, records
from search.storage import open_storage
from search.tally import StudyTally, tally_of
from search.workers import RetriesFirstStudy, fail_dead_local_trials, retry_source, this_worker

optuna.logging.set_verbosity(optuna.logging.WARNING)
DISTRIBUTIONS = {"param_target": IntDistribution(1_000, 20_000), "lr": FloatDistribution(0.01, 0.1)}


def make_study(tmp_path, name="t", directions=("maximize",)):
    storage = open_storage(f"sqlite:///{tmp_path / 'db.sqlite'}", heartbeat=None)
    optuna.create_study(study_name=name, storage=storage, directions=list(directions))
    return RetriesFirstStudy(name, storage, sampler=optuna.samplers.RandomSampler(seed=0))


def stored(rng: random.Random, shrunk_from=None) -> dict:
    """create_trial's arguments for a finished trial of a random outcome, values and size (ties on purpose)."""
    outcome = rng.choice(["completed", "completed", "pruned", "rejected", "failed", "duplicate"])
    attrs = {"outcome": outcome, "n_params": rng.choice([3_000, 4_000, 5_000]), "constraint": -1.0}
    if shrunk_from is not None:
        attrs.update(shrunk_from=shrunk_from, shrink=rng.choice([0.8, 0.9]), descent_level=rng.choice([0.9, 0.95]))
    params = {"param_target": attrs["n_params"], "lr": 0.05}
    if outcome == "completed":
        return dict(state=TrialState.COMPLETE, value=rng.choice([0.9, 0.95, 0.97]), user_attrs=attrs, params=params,
                    distributions=DISTRIBUTIONS)
    state = TrialState.FAIL if outcome == "failed" else TrialState.PRUNED
    return dict(state=state, user_attrs=attrs, params=params, distributions=DISTRIBUTIONS)


def agrees(study, tally: StudyTally) -> None:
    tally.refresh()
    assert tally.counts() == outcome_counts(study)
    assert tally.trained() == count_trained(study)
    top = best(study)
    assert (tally.best() and tally.best().number) == (top and top.number)
    for levels in ([0.95, 0.9], [0.97], [0.9]):
        assert next_descent(tally.descent_records(), levels) == next_descent(records(study), levels)


def test_the_tally_agrees_with_full_reads_as_trials_arrive_out_of_order(tmp_path):
    rng = random.Random(0)
    study = make_study(tmp_path)
    tally = tally_of(study)
    assert tally_of(study) is tally
    study.enqueue_trial({"lr": 0.05}, user_attrs={"preset": "p"})  # waiting: "queued"
    running = [study.ask() for _ in range(3)]  # open trials, finished later, after higher numbers
    for t in running:
        t.set_user_attr("outcome", Outcome.TRAINING.value)
    agrees(study, tally)
    for i in range(40):
        study.add_trial(create_trial(**stored(rng, shrunk_from=rng.choice([None, None, 0, i]))))
        if i % 7 == 0 and running:
            trial = running.pop()
            trial.set_user_attr("outcome", Outcome.COMPLETED.value)
            trial.set_user_attr("n_params", 3_000)
            trial.set_user_attr("constraint", -1.0)
            study.tell(trial, 0.97)
        agrees(study, tally)
    # A study whose trials another object added: the tally reads them all once, then only what changed.
    assert StudyTally(study).refresh().counts() == outcome_counts(study)


def test_descent_inputs_give_the_same_step_on_many_random_studies(tmp_path):
    for seed in range(30):
        rng = random.Random(seed)
        study = make_study(tmp_path, f"d{seed}")
        tally = tally_of(study)
        for i in range(rng.randint(1, 25)):
            source = rng.choice([None, None, rng.randrange(i)]) if i else None
            study.add_trial(create_trial(**stored(rng, shrunk_from=source)))
            tally.refresh()
        assert next_descent(tally.descent_records(), [0.95, 0.9]) == next_descent(records(study), [0.95, 0.9])


def test_a_queued_retry_is_asked_before_the_trials_queued_ahead_of_it(tmp_path):
    study = make_study(tmp_path)
    study.enqueue_trial({"lr": 0.02}, user_attrs={"preset": "a"})
    study.enqueue_trial({"lr": 0.03}, user_attrs={"preset": "b"})
    study.enqueue_trial({"lr": 0.04}, user_attrs={"retry_of": 7})  # ours: Ctrl-C, a dead local worker
    study.add_trial(create_trial(state=TrialState.WAITING, system_attrs={"failed_trial": 9, "fixed_params": {"lr": 0.05}}))
    other = RetriesFirstStudy("t", study.backend)  # a second worker on the same storage

    first = study.ask()
    assert first.number == 2 and first.suggest_float("lr", 0.01, 0.1) == 0.04 and retry_source(first) is None
    heartbeat_retry = other.ask()  # the retry the first one holds is not handed out twice
    assert heartbeat_retry.number == 3 and retry_source(heartbeat_retry) == 9
    assert study.ask().number == 0 and other.ask().number == 1  # then the queue in order, then new trials
    assert study.ask().number == 4


def test_a_dead_local_workers_trial_is_failed_as_stale_and_queued_again_once(tmp_path):
    study = make_study(tmp_path)
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)  # a process that has exited: no process has its pid for now
    trial = study.ask()
    trial.suggest_float("lr", 0.01, 0.1)
    trial.set_user_attr("outcome", Outcome.TRAINING.value)
    trial.set_user_attr("worker", f"{this_worker().rpartition(':')[0]}:{dead_pid}")
    alive = study.ask()
    alive.set_user_attr("worker", this_worker())  # this process: alive
    if subprocess.run(["kill", "-0", str(dead_pid)], capture_output=True).returncode == 0:
        pytest.skip(f"pid {dead_pid} was taken again meanwhile")

    assert fail_dead_local_trials(study, study.backend) == [0]
    stale, mine, retry = study.get_trials()
    assert stale.state == TrialState.FAIL and stale.user_attrs["outcome"] == "stale"
    assert "its worker stopped" in stale.user_attrs["reason"] and TrialRecord(stale).outcome == Outcome.STALE
    assert mine.state == TrialState.RUNNING
    assert retry.state == TrialState.WAITING and retry.user_attrs == {"retry_of": 0}
    assert fail_dead_local_trials(study, study.backend) == []  # once


def test_names_other_modules_import_from_search_storage_are_still_there():
    from search import provenance, setup, storage, workers

    for name in ("claim_conflict", "claim_worker_index", "fail_dead_local_trials", "requeue_interrupted",
                 "this_worker"):
        assert getattr(storage, name) is getattr(workers, name)
    assert storage.check_setup is setup.check_setup and storage.provenance is provenance.provenance
    assert storage.SearchError is workers.SearchError

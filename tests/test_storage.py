"""The study's storage without training: the running tally against full reads, front descent's inputs, retries
handed out first, a dead local worker's trials, the names other modules import from search.storage, a results folder
copied elsewhere, the end-of-search line's counts, and the presets a new study queues (with one cheap search)."""

import random
import shutil
import subprocess
import sys

import optuna
import pytest
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial
from typer.testing import CliRunner

from cli import app

from search.descent import next_descent
from search.options import SearchOptions
from search.record import (Outcome, TrialRecord, accuracy, best, candidates, count_trained, outcome_counts, records,
                           runs_of)
from search.run import summary_line
from search.storage import open_storage
from search.study import presets_to_queue, run_search
from search.tally import StudyTally, tally_of
from search.workers import RetriesFirstStudy, fail_dead_local_trials, retry_source, this_worker

optuna.logging.set_verbosity(optuna.logging.WARNING)
DISTRIBUTIONS = {"param_target": IntDistribution(1_000, 20_000), "lr": FloatDistribution(0.01, 0.1)}


def make_study(tmp_path, name="t", directions=("maximize",)):
    storage = open_storage(f"sqlite:///{tmp_path / 'db.sqlite'}", heartbeat=None)
    optuna.create_study(study_name=name, storage=storage, directions=list(directions))
    return RetriesFirstStudy(name, storage, sampler=optuna.samplers.RandomSampler(seed=0))


def stored(rng: random.Random, shrunk_from=None, rerun_of=None) -> dict:
    """create_trial's arguments for a finished trial of a random outcome, values and size (ties on purpose)."""
    outcome = rng.choice(["completed", "completed", "pruned", "rejected", "failed", "duplicate"])
    attrs = {"outcome": outcome, "n_params": rng.choice([3_000, 4_000, 5_000]), "constraint": -1.0}
    if rerun_of is not None:
        attrs["rerun_of"] = rerun_of
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
    if top is not None:  # the best network's accuracy: the mean of its runs, as record.runs_of has them
        assert tally.best_network()[1] == pytest.approx(accuracy(top, runs_of(candidates(study))), abs=1e-15)
    for levels in ([0.95, 0.9], [0.97], [0.9]):
        assert next_descent(tally.descent_records(), levels) == next_descent(records(study), levels)


@pytest.mark.parametrize("seed", range(4))
def test_the_tally_agrees_with_full_reads_as_trials_arrive_out_of_order(tmp_path, seed):
    rng = random.Random(seed)
    study = make_study(tmp_path)
    tally = tally_of(study)
    assert tally_of(study) is tally
    study.enqueue_trial({"lr": 0.05}, user_attrs={"preset": "p"})  # waiting: "queued"
    running = [study.ask() for _ in range(3)]  # open trials, finished later, after higher numbers
    for t in running:
        t.set_user_attr("outcome", Outcome.TRAINING.value)
    agrees(study, tally)
    for i in range(40):
        # Some re-runs (of earlier trials, of the running ones that finish later, of pruned ones) so that the best
        # network's mean moves, down too.
        rerun_of = rng.choice([None, None, rng.randrange(i + 3)])
        study.add_trial(create_trial(**stored(rng, shrunk_from=rng.choice([None, None, 0, i]), rerun_of=rerun_of)))
        if i % 7 == 0 and running:
            trial = running.pop()
            trial.set_user_attr("outcome", Outcome.COMPLETED.value)
            trial.set_user_attr("n_params", 3_000)
            trial.set_user_attr("constraint", -1.0)
            study.tell(trial, 0.97)
        agrees(study, tally)
    # A re-run of the best network that pulls its mean under another's: the best changes.
    top = best(study)
    study.add_trial(create_trial(state=TrialState.COMPLETE, value=0.5, params={"lr": 0.05},
                                 distributions={"lr": DISTRIBUTIONS["lr"]},
                                 user_attrs={**top.attrs, "rerun_of": top.number}))
    agrees(study, tally)
    assert tally.best().number != top.number
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


def rejected(n_params: int):
    """A stored trial refused before training: cheap to add, and `report` counts it."""
    return create_trial(state=TrialState.PRUNED, params={"param_target": n_params, "lr": 0.05},
                        distributions=DISTRIBUTIONS,
                        user_attrs={"outcome": "rejected", "n_params": n_params, "reason": "refused untrained (test)"})


def report(*args):
    out = CliRunner().invoke(app, ["report", "--study", "c", *args])
    return out.exit_code, " ".join(out.output.split())


def test_a_results_folder_copied_elsewhere_works_on_its_own_database(tmp_path, monkeypatch):
    """The README's `cp -r results /tmp/elsewhere && python cli.py report --results-dir /tmp/elsewhere`, with the
    original renamed away: the copy's folder is owned by the copy's database, which is the one read."""
    monkeypatch.chdir(tmp_path)  # the default --results-dir, "results", relative as in the README
    study = optuna.create_study(study_name="c", storage=open_storage("sqlite:///results/c.db", heartbeat=None))
    study.add_trial(rejected(19_000))
    assert report() == (0, "report: results/c/report.html (0 trained, 1 rejected, 0 queued)")
    assert (tmp_path / "results" / "c" / ".storage").read_text() == "relative:../c.db\n"
    shutil.copytree(tmp_path / "results", tmp_path / "elsewhere")
    (tmp_path / "results").rename(tmp_path / "gone")
    optuna.load_study(study_name="c", storage="sqlite:///elsewhere/c.db").add_trial(rejected(18_000))
    (tmp_path / "elsewhere" / "c" / "report.html").unlink()

    code, out = report("--results-dir", "elsewhere")
    assert (code, out) == (0, "report: elsewhere/c/report.html (0 trained, 2 rejected, 0 queued)"), out  # the copy's
    assert (tmp_path / "elsewhere" / "c" / "report.html").is_file() and not (tmp_path / "results").exists()
    assert len(optuna.load_study(study_name="c", storage="sqlite:///gone/c.db").trials) == 1  # the original: as it was

    # A marker of an earlier version: the absolute URL of the default database at the folder's old place (gone).
    marker = tmp_path / "elsewhere" / "c" / ".storage"
    marker.write_text(f"sqlite:///{tmp_path / 'results' / 'c.db'}\n")
    assert report("--results-dir", "elsewhere")[0] == 0 and marker.read_text() == "relative:../c.db\n"
    # Another storage's study of the same name is still refused there, naming the folder's own database.
    code, out = report("--results-dir", "elsewhere", "--storage", f"sqlite:///{tmp_path / 'gone' / 'c.db'}")
    assert code == 2 and f"elsewhere/c holds the files of study 'c' in {tmp_path / 'elsewhere' / 'c.db'}, not " \
        f"sqlite:///{tmp_path / 'gone' / 'c.db'}; give another --results-dir" in out, out
    # An absolute marker naming some other file is another storage's, as before.
    marker.write_text(f"sqlite:///{tmp_path / 'other.db'}\n")
    assert report("--results-dir", "elsewhere")[0] == 2


def test_the_end_of_search_line_counts_a_trial_another_worker_still_trains(tmp_path):
    study = make_study(tmp_path)
    for outcome, state in (("completed", TrialState.COMPLETE), ("completed", TrialState.COMPLETE),
                           ("pruned", TrialState.PRUNED), ("failed", TrialState.FAIL),
                           ("rejected", TrialState.PRUNED)):
        study.add_trial(create_trial(state=state, value=0.9 if state == TrialState.COMPLETE else None,
                                     user_attrs={"outcome": outcome, "n_params": 3_000}))
    elsewhere = study.ask()  # running in another worker: it holds one of the --trials slots
    elsewhere.set_user_attr("outcome", Outcome.TRAINING.value)
    line = summary_line("t", count_trained(study), outcome_counts(study), 12.4)
    assert line == ("study t: 5 trained (2 completed, 1 pruned, 1 failed, 1 still training in another worker), "
                    "1 rejected; 12 s this run")
    for other in (study.ask(), study.ask()):
        other.set_user_attr("outcome", Outcome.TRAINING.value)
    assert "7 trained (2 completed, 1 pruned, 1 failed, 3 still training in other workers)" in summary_line(
        "t", count_trained(study), outcome_counts(study), 0)
    assert summary_line("t", 2, {"completed": 2}, 0) == "study t: 2 trained (2 completed, 0 pruned, 0 failed), 0 " \
                                                        "rejected; 0 s this run"


def queued(**options) -> list[str]:
    return [name for name, _ in presets_to_queue(SearchOptions(**options))]


def test_the_presets_take_at_most_half_of_the_trials():
    assert queued(trials=4) == ["baseline", "threeblock"]  # accuracy: largest first
    assert queued(trials=6) == ["baseline", "threeblock", "small"]  # the README's quick look
    assert queued(trials=12) == queued(trials=50) == ["baseline", "threeblock", "small", "compact", "tiny", "micro"]
    assert queued(trials=10, objective="pareto") == ["micro", "tiny", "compact", "small", "threeblock"]
    assert queued(trials=1) == queued(trials=3) == ["baseline"]  # at least one
    # Refused untrained, a preset takes no slot: it is queued where it falls and stored as rejected.
    assert queued(trials=4, max_params=9_000) == ["baseline", "threeblock", "small", "compact"]
    assert queued(trials=2, min_rf=17) == ["baseline", "threeblock"]  # baseline's 16 px: rejected
    assert queued(trials=2, max_params=9_000, repair=True) == ["baseline"]  # repaired, it trains


def test_a_search_of_four_trials_trains_two_presets_and_two_sampled_candidates(tmp_path, data_root):
    opts = SearchOptions(trials=4, study="half", results_dir=str(tmp_path), epochs=1, subset=200, seed=3,
                         data_dir=str(data_root), device="cpu")
    study = run_search(opts, log=lambda line: None).study
    trained = [r for r in records(study) if r.is_trained]
    # The other half is the search's own: the sampler's draws (or steps queued from trials it has, not presets).
    assert [r.preset for r in trained] == ["baseline", "threeblock", "", ""]
    assert [r.outcome for r in records(study) if r.preset] == [Outcome.COMPLETED] * 2  # no preset left queued

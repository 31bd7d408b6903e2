"""Several worker processes on one PostgreSQL study: exactly N trained trials, none twice, killed workers retried.

Needs a PostgreSQL server: BUDGETNAS_TEST_POSTGRES holds its URL (.ci/run installs, starts and sets it).
"""

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from optuna.trial import TrialState

from search.record import count_trained, trial_frame
from search.storage import load_existing_study

ROOT = Path(__file__).resolve().parent.parent
PG = os.environ.get("BUDGETNAS_TEST_POSTGRES")
pytestmark = [pytest.mark.postgres,
              pytest.mark.skipif(not PG, reason="BUDGETNAS_TEST_POSTGRES is not set (.ci/run sets it)")]


def worker(study, n, tmp_path, data_root, *extra):
    args = [sys.executable, str(ROOT / "cli.py"), "search", "--storage", PG, "--study", study, "--trials", str(n),
            "--epochs", "1", "--subset", "500", "--data-dir", str(data_root), "--results-dir", str(tmp_path),
            "--device", "cpu", "--threads", "1", *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_three_workers_train_exactly_n_trials_once_each(tmp_path, data_root):
    study_name = f"w-{uuid.uuid4().hex[:8]}"
    n = 6
    procs = [worker(study_name, n, tmp_path, data_root) for _ in range(3)]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out
    study = load_existing_study(study_name, PG)
    trials = study.get_trials()
    assert count_trained(study) == n
    trained = [t for t in trials if t.user_attrs.get("outcome") in ("completed", "pruned", "failed")]
    assert len(trained) == n
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    keys = [t.user_attrs["key"] for t in trained]
    assert len(set(keys)) == len(keys), "a candidate was trained twice"
    for t in trained:
        assert t.user_attrs["history"] and t.user_attrs["n_params"] < 20_000
        assert t.value is not None or t.intermediate_values
    # every worker reported the shared total
    assert all(f"/{n} trained" in out for out in outputs)


def test_killed_worker_trial_is_failed_and_retried(tmp_path, data_root):
    study_name = f"k-{uuid.uuid4().hex[:8]}"
    beat = ("--heartbeat", "1,4")  # heartbeat every second; stale after 4 s of silence
    # The first worker plays one on another machine: only its silent heartbeat can tell that it died.
    first = worker(study_name, 2, tmp_path, data_root, "--epochs", "3", *beat, "--worker-id", "elsewhere:1")
    for line in first.stdout:
        if line.startswith("trial 0: epoch 1/3"):  # training: two epochs to go
            first.send_signal(signal.SIGKILL)
            break
    first.wait(timeout=60)
    study = load_existing_study(study_name, PG)
    killed = study.get_trials()[0]
    assert killed.state == TrialState.RUNNING and killed.user_attrs["outcome"] == "training"
    time.sleep(5)  # past the 4 s grace: staleness is a matter of the clock, with no state to wait on

    # The retry runs first, ahead of the presets still waiting.
    second = worker(study_name, 5, tmp_path, data_root, "--epochs", "3", *beat)
    out = second.communicate(timeout=600)[0]
    assert second.returncode == 0, out
    study = load_existing_study(study_name, PG)
    trials = study.get_trials()
    assert trials[0].state == TrialState.FAIL
    retries = [t for t in trials if t.user_attrs.get("retry_of") == 0]
    assert len(retries) == 1
    assert retries[0].params == killed.params and retries[0].user_attrs["outcome"] in ("completed", "pruned")
    assert count_trained(study) == 5
    frame_reason = trial_frame(study).set_index("number").loc[0, "reason"]
    assert "its worker stopped" in frame_reason and f"queued again as trial {retries[0].number}" in frame_reason


def test_a_queued_retry_goes_to_one_worker_first_on_postgres():
    """Two workers' studies on one PostgreSQL study: the retry queued behind a preset is asked first, once."""
    import optuna

    from search.storage import open_storage
    from search.workers import RetriesFirstStudy

    name = f"r-{uuid.uuid4().hex[:8]}"
    storage = open_storage(PG, heartbeat=None)
    optuna.create_study(study_name=name, storage=storage)
    first, second = (RetriesFirstStudy(name, open_storage(PG, heartbeat=None)) for _ in range(2))
    first.enqueue_trial({"x": 1.0}, user_attrs={"preset": "p"})
    first.enqueue_trial({"x": 2.0}, user_attrs={"retry_of": 0})
    assert [first.ask().number, second.ask().number, second.ask().number] == [1, 0, 2]

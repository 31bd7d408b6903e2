"""Interruptions, faults and bad input lose nothing: each case of the reliability table, on real (tiny) runs."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from optuna.trial import TrialState
from typer.testing import CliRunner

from cli import app
from search.retrain import pick_winner
from search.record import count_trained
from search.storage import SearchError, load_existing_study
from search.options import SearchOptions
from search.study import run_search

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def opts(tmp_path, data_root, **over):
    base = dict(trials=3, study="f", results_dir=str(tmp_path), epochs=1, subset=500, data_dir=str(data_root),
                device="cpu", warm_start=True)
    return SearchOptions(**{**base, **over})


# ---- faults inside a trial ----------------------------------------------------------------------

def _fail_inside_the_first_trials_step(monkeypatch, fault):
    """Make the training step of the study's first fit go wrong as `fault(step, real_step)` says; later fits train
    as usual. Raised from inside the engine's step, where a real fault would come from."""
    from search import objective
    from search.engine.whole_step import WholeStep

    real_fit, real_step = objective.fit, WholeStep.step
    fits = []

    def counting_fit(*args, **kwargs):
        fits.append(1)
        return real_fit(*args, **kwargs)

    def step(self):
        return fault(self, real_step) if len(fits) == 1 else real_step(self)

    monkeypatch.setattr(objective, "fit", counting_fit)
    monkeypatch.setattr(WholeStep, "step", step)


def _raise(error):
    def fault(step, real_step):
        raise error
    return fault


def _weights_to_nan(step, real_step):
    real_step(step)
    step.params[0].data.fill_(float("nan"))  # as a blow-up leaves them


@pytest.mark.parametrize("fault, reason", [
    # Not memory: a message that mentions memory is no out-of-memory error; the classification goes by type.
    (_raise(RuntimeError("illegal memory access (test)")), "RuntimeError: illegal memory access (test)"),
    (_weights_to_nan, "loss became NaN or infinite in epoch 1"),
    (_raise(torch.OutOfMemoryError("Tried to allocate 2.00 GiB (test)")),
     "out of memory: OutOfMemoryError: Tried to allocate 2.00 GiB (test)"),
    (_raise(MemoryError()), "out of memory: MemoryError: "),
], ids=["error", "nan", "cuda-oom", "host-oom"])
def test_a_faulty_trial_fails_with_its_reason_and_the_study_goes_on(tmp_path, data_root, monkeypatch, fault, reason):
    # Trial 0 is the first preset, the best-scoring candidate. No pruner: whether a healthy trial completes then
    # does not hang on how its one epoch compares.
    _fail_inside_the_first_trials_step(monkeypatch, fault)
    result = run_search(opts(tmp_path, data_root, pruner="none"), log=lambda line: None)
    trials = result.study.get_trials()
    assert trials[0].state == TrialState.FAIL
    assert trials[0].user_attrs["outcome"] == "failed"
    assert trials[0].user_attrs["reason"] == reason
    assert result.trained == 3  # the failure counts as trained (it spent training), and the study went on
    assert [t.user_attrs["outcome"] for t in trials[1:3]] == ["completed", "completed"]
    assert pick_winner(result.study).number != 0  # a failed trial is never the best


# ---- set-up fingerprint -----------------------------------------------------------------------

def test_reusing_a_study_with_another_setup_is_refused(tmp_path, data_root):
    run_search(opts(tmp_path, data_root, trials=1), log=lambda line: None)
    with pytest.raises(SearchError) as info:
        run_search(opts(tmp_path, data_root, trials=1, epochs=2, max_params=15_000), log=lambda line: None)
    message = str(info.value)
    assert "study 'f' was created with a different set-up" in message
    assert "max_params was 20000, now 15000" in message and "epochs was 1, now 2" in message
    assert "give a new --study name" in message
    out = runner.invoke(app, ["search", "--trials", "1", "--epochs", "2", "--subset", "500", "--study", "f",
                              "--results-dir", str(tmp_path), "--data-dir", str(data_root), "--device", "cpu"])
    assert out.exit_code == 2 and "different set-up" in out.output


# ---- signals to a real search ---------------------------------------------------------------------

def start_search(tmp_path, data_root, study, trials=3, epochs=3, subset=1000):
    # No pruner: trial 0 trains every epoch, so a stop asked for after its first epoch finds it training.
    args = [sys.executable, str(ROOT / "cli.py"), "search", "--trials", str(trials), "--epochs", str(epochs),
            "--subset", str(subset), "--study", study, "--results-dir", str(tmp_path), "--data-dir", str(data_root),
            "--device", "cpu", "--pruner", "none"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return args, proc


def wait_for_line(proc, start: str) -> list[str]:
    """Read the search's output up to the first line starting with `start`."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(start):
            return lines
    raise AssertionError(f"no line starting {start!r}:\n" + "".join(lines))


def test_a_signal_during_a_search_only_asks_training_to_stop_at_its_next_step():
    from search.engine.runtime import StopRequested, stop_at_safe_points, stop_point

    before = signal.getsignal(signal.SIGTERM)
    with stop_at_safe_points():
        signal.raise_signal(signal.SIGTERM)  # its handler runs before this returns, and only records the request
        with pytest.raises(StopRequested) as stop:
            stop_point()  # where training and the search look between steps and trials
        assert stop.value.signal_name == "SIGTERM" and isinstance(stop.value, KeyboardInterrupt)
        with pytest.raises(StopRequested):  # a second signal: at once, wherever it lands
            signal.raise_signal(signal.SIGTERM)
    # Leaving restores the handlers and forgets the request.
    assert signal.getsignal(signal.SIGTERM) is before
    stop_point()


# Where the signal lands, known from the line the search has printed: as trial 0 starts (its stop comes at its first
# step), after its first epoch of three (it is training), after it completed (between trials, or as trial 1 starts).
SIGNAL_POINTS = {"starting": "trial 0: training", "training": "trial 0: epoch 1/3", "between": "trial 0 completed"}


@pytest.mark.parametrize("point", SIGNAL_POINTS)
def test_sigterm_closes_the_running_trial_exits_143_and_the_same_command_completes(tmp_path, data_root, point):
    args, proc = start_search(tmp_path, data_root, "term")
    wait_for_line(proc, SIGNAL_POINTS[point])
    proc.send_signal(signal.SIGTERM)
    out = proc.stdout.read()
    assert proc.wait(timeout=60) == 143, out
    assert "SIGTERM: search stopped" in out and "Run the same command to continue to 3 trials" in out
    assert "Traceback" not in out and "failed with" not in out, out  # one line of ours, none of Optuna's
    trials = load_existing_study("term", f"sqlite:///{tmp_path / 'term.db'}").get_trials()
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    interrupted = [t.number for t in trials if t.user_attrs.get("outcome") == "interrupted"]
    if point == "between":
        assert trials[0].user_attrs["outcome"] == "completed" and interrupted in ([], [1])
    else:
        assert interrupted == [0] and trials[0].state == TrialState.FAIL
        assert "and queued again" in out
    again = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    study = load_existing_study("term", f"sqlite:///{tmp_path / 'term.db'}")
    assert count_trained(study) == 3 and not [t for t in study.get_trials() if t.state == TrialState.RUNNING]


def test_after_sigkill_the_next_run_fails_the_dead_trial_and_retries_it_first(tmp_path, data_root):
    args, proc = start_search(tmp_path, data_root, "kill", trials=3)
    wait_for_line(proc, "trial 0: epoch 1/3")  # training: two epochs to go
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    url = f"sqlite:///{tmp_path / 'kill.db'}"
    assert load_existing_study("kill", url).get_trials()[0].state == TrialState.RUNNING
    again = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "trial 0: its worker on this machine is gone" in again.stdout
    study = load_existing_study("kill", url)
    trials = study.get_trials()
    assert trials[0].state == TrialState.FAIL
    retry = [t for t in trials if t.user_attrs.get("retry_of") == 0]
    assert len(retry) == 1 and retry[0].params == trials[0].params
    # The retry ran first, ahead of the presets queued before it, and says why trial 0 stopped.
    assert min(t.datetime_start for t in trials[1:] if t.datetime_start) == retry[0].datetime_start
    assert trials[0].user_attrs["outcome"] == "stale" and "its worker stopped" in trials[0].user_attrs["reason"]
    assert count_trained(study) == 3 and not [t for t in trials if t.state == TrialState.RUNNING]
    # A 3-trial search queues one preset (half of --trials, search/study.py), trial 0 itself: nothing else was queued
    # for the retry to wait behind, and the line above holds that it started first.
    assert [t.user_attrs["preset"] for t in trials if "preset" in t.user_attrs] == ["baseline"]


# ---- bad input: refused before any training, exit 2, nothing written ----------------------------

BAD_SEARCH_INPUT = [
    (["--trials", "0"], "Invalid value for '--trials': 0 must be at least 1"),
    (["--trials", "-3"], "-3 must be at least 1"),
    (["--epochs", "0"], "Invalid value for '--epochs': 0 must be from 1 to 20 (the exercise allows at most 20 epochs)"),
    (["--epochs", "21"], "21 must be from 1 to 20"),
    (["--max-params", "0"], "Invalid value for '--max-params': 0 must be at least 1"),
    (["--subset", "10"], "Invalid value for '--subset': 10 must be from 100 to 50,000 training images"),
    (["--sampler", "grid"], "Invalid value for '--sampler':"),  # typer names the value and the choices
    (["--sampler", "grid"], "'grid' is not one of 'tpe', 'random', 'nsga2'"),
    (["--pruner", "asha"], "'asha' is not one of 'sha', 'hyperband', 'median', 'envelope', 'none'"),
    (["--device", "tpu"], "'tpu' is not one of 'auto', 'cpu', 'cuda'"),
    (["--storage", "nosuchdb://x/y"], "storage 'nosuchdb://x/y' cannot be opened"),
    (["--storage", "postgresql://nobody:pw@127.0.0.1:1/none"], "cannot be opened"),
    (["--storage", "sqlite://"], "an in-memory SQLite database keeps nothing once the command ends"),
    (["--storage", "sqlite:///:memory:"], "in-memory SQLite"),
    (["--study", "../x"], "--study '../x': a study name is 1 to 100 letters, digits"),
    (["--study", ""], "--study '': a study name is"),
    (["--study", "a/b"], "--study 'a/b': a study name is"),
    (["--study", ".hidden"], "not starting with a dot"),
    (["--trials", "100000000000000000000"], "--trials=100000000000000000000: must be from 1 to 100,000"),
    (["--max-params", "99999999999"], "must be from 1 to 10,000,000"),
    (["--seed", "-1"], "--seed=-1: must be from 0 to 2,147,483,647"),
    (["--floor", "99"], "--floor=0.99: applies to --objective pareto only"),
    (["--floor", "120", "--objective", "pareto"], "must be"),
    # Not even the smallest layout fits: said at once, not after 200 rejected candidates.
    (["--max-params", "100"], "--max-params=100: the smallest network of the search space with a receptive field of "
                              "at least 12 px (--min-rf) has 132 parameters"),
]


@pytest.mark.parametrize("extra, message", BAD_SEARCH_INPUT)
def test_bad_search_input_is_refused_before_training(tmp_path, data_root, extra, message):
    results = tmp_path / "results"
    args = ["search", "--results-dir", str(results), "--data-dir", str(data_root), *extra]
    out = runner.invoke(app, args)
    assert out.exit_code == 2, out.output
    assert message in " ".join(out.output.replace("│", " ").split()), out.output  # typer draws a box
    assert not results.exists() or not any(results.rglob("*")), "something was written"


def test_missing_data_directory_is_refused_and_nothing_written(tmp_path, monkeypatch):
    from torchvision.datasets import MNIST

    def no_network(self):  # the download fails as it does offline; no test reaches the network
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://example.invalid/, got: "
                           "<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(MNIST, "download", no_network)
    monkeypatch.setattr("search.download._unreachable", lambda url: None)  # a mirror answers; the download fails
    results, data = tmp_path / "results", tmp_path / "no-data-here"
    out = runner.invoke(app, ["search", "--results-dir", str(results), "--data-dir", str(data)])
    assert out.exit_code == 2
    assert "download from" in out.output and "failed after" in out.output and "--data-dir" in out.output
    assert "Temporary failure in name resolution" in " ".join(out.output.split())  # the whole reason, not its first line
    assert not results.exists() and not data.exists()


def test_corrupted_idx_file_is_refused_and_nothing_written(tmp_path, mnist_copy):
    with open(mnist_copy / "MNIST" / "raw" / "t10k-images-idx3-ubyte", "r+b") as f:
        f.seek(5000)
        f.write(b"\xff" * 64)
    results = tmp_path / "results"
    out = runner.invoke(app, ["search", "--results-dir", str(results), "--data-dir", str(mnist_copy)])
    assert out.exit_code == 2 and "t10k-images-idx3-ubyte: md5" in out.output
    assert not results.exists()


def test_spec_file_that_does_not_parse_exits_2(tmp_path):
    bad = tmp_path / "spec.json"
    bad.write_text("{'blocks': []}")
    out = runner.invoke(app, ["check", str(bad)])
    assert out.exit_code == 2 and "spec.json: spec is not valid JSON: Expecting property name" in " ".join(out.output.split())


def test_sqlite_with_parallel_jobs_is_refused_with_advice(tmp_path, data_root):
    out = runner.invoke(app, ["search", "--jobs", "2", "--results-dir", str(tmp_path / "r"), "--data-dir", str(data_root)])
    assert out.exit_code == 2 and "use a server database" in out.output


def test_unwritable_results_dir_is_refused_before_anything_is_written(tmp_path, data_root):
    import optuna

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    url = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    optuna.create_study(study_name="mnist", storage=url)  # a stored study, whose results folder cannot be made
    for command in (["search", "--trials", "1"], ["best", "--storage", url], ["report", "--storage", url]):
        data = ["--data-dir", str(data_root)] if command[0] != "report" else []
        out = runner.invoke(app, [*command, "--results-dir", str(blocker / "results"), *data])
        assert out.exit_code == 2, out.output
        assert f"{blocker / 'results'}" in out.output and f"{blocker} is a file" in out.output, out.output
        assert "Traceback" not in out.output
    out = runner.invoke(app, ["search", "--storage", f"sqlite:///{blocker}/s.db", "--results-dir",
                              str(tmp_path / "r"), "--data-dir", str(data_root)])
    assert out.exit_code == 2 and f"{blocker} is a file" in out.output, out.output
    assert not (tmp_path / "r").exists()


def test_storage_urls_and_the_results_folder_each_study_owns(tmp_path):
    from search.storage import check_results_folder, claim_results_folder, describe_storage, storage_url

    assert storage_url(None, "results", "s") == "sqlite:///results/s.db"
    assert storage_url(str(tmp_path / "x.db"), "results", "s") == f"sqlite:///{tmp_path / 'x.db'}"  # a plain path
    assert storage_url("postgresql://u@h/db", "results", "s") == "postgresql://u@h/db"
    assert "(the file " in describe_storage("sqlite:///tmp/x") and str(Path("tmp/x").resolve()) in \
        describe_storage("sqlite:///tmp/x")  # three slashes: a relative path, said so
    one, other = f"sqlite:///{tmp_path / 'one.db'}", f"sqlite:///{tmp_path / 'other.db'}"
    claim_results_folder(str(tmp_path / "r"), "s", one)
    assert (tmp_path / "r" / "s" / ".storage").read_text().strip() == one
    check_results_folder(str(tmp_path / "r"), "s", one)  # its own storage: fine, again and again
    with pytest.raises(SearchError, match="holds the files of study 's' in .*one.db, not .*other.db"):
        check_results_folder(str(tmp_path / "r"), "s", other)


def test_a_search_whose_every_trial_failed_exits_1_and_says_why(tmp_path, data_root, monkeypatch):
    from search import objective

    def explode(*args, **kwargs):
        raise RuntimeError("every trial blows up (test)")

    monkeypatch.setattr(objective, "fit", explode)
    out = runner.invoke(app, ["search", "--trials", "2", "--epochs", "1", "--subset", "500", "--study", "boom",
                              "--results-dir", str(tmp_path), "--data-dir", str(data_root), "--device", "cpu"])
    assert out.exit_code == 1, out.output
    assert "every one of the study's 2 trained trials failed" in out.output
    assert "RuntimeError: every trial blows up (test)" in out.output

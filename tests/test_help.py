"""Every command's --help shows each option's meaning and its default (rich markup once swallowed the defaults), usage
lines a person can read, and the wording of a few lines that once read wrong."""

import pytest
import typer
from typer.testing import CliRunner

from cli import app

runner = CliRunner()
COMMANDS = sorted(typer.main.get_command(app).commands)


def test_every_command_is_listed_with_its_help():
    out = runner.invoke(app, ["--help"], env={"COLUMNS": "250"})
    assert out.exit_code == 0
    assert set(COMMANDS) == {"best", "certify", "check", "data", "export", "report", "search", "show"}
    for name, command in typer.main.get_command(app).commands.items():
        assert command.help and name in out.output


@pytest.mark.parametrize("name", COMMANDS)
def test_each_option_has_a_description_and_shows_its_default(name):
    command = typer.main.get_command(app).commands[name]
    out = runner.invoke(app, [name, "--help"], env={"COLUMNS": "250"})
    assert out.exit_code == 0
    text = " ".join(out.output.split())
    assert "<bool>" not in text  # no boolean metavar on flags
    for param in command.params:
        if getattr(param, "param_type_name", "") != "option" or param.hidden:
            continue
        assert param.help, f"{name} {param.opts[0]} has no description"
        help_text = " ".join(param.help.split())
        assert help_text in text, (name, param.opts[0])
        shown = text.split(help_text, 1)[1].lstrip()
        if param.default is not None and param.default is not False:
            assert shown.startswith("[default: "), (name, param.opts[0], shown[:60])
        elif param.default is None and not param.required:
            # No value given means something: the description says what, as "[default: ...]", or the option is a
            # selection (a trial, a target) that is simply absent by default.
            assert "[default: " in help_text or param.name in ("trial", "target", "study", "certificate", "seed"), \
                (name, param.opts[0])


def test_the_budgetnas_command_is_the_same_app():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(sys.executable).parent / "budgetnas"
    assert script.is_file(), "pip install -e . (make install) makes .venv/bin/budgetnas"
    out = subprocess.run([str(script), "check", "micro"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "PASS: 4,582 parameters" in out.stdout, out.stdout + out.stderr


def test_the_clis_defaults_bounds_and_choices_are_the_packages():
    """Declared once: the search's defaults are SearchOptions', the choice lists the package's tuples, and the help
    says the numbers they hold."""
    from search.engine.config import DEVICES, OPTIMIZERS, SCHEDULES, TrainConfig
    from search.options import OBJECTIVES, SAMPLERS, SearchOptions
    from search.pruning import PRUNERS
    from search.storage import HEARTBEAT

    commands = typer.main.get_command(app).commands
    params = {p.name: p for p in commands["search"].params}
    opts = SearchOptions()
    for name in ("trials", "epochs", "max_params", "seed", "jobs", "max_rejections", "min_rf", "results_dir",
                 "warm_start", "repair", "study", "dataset"):
        assert params[name].default == getattr(opts, name), name
    # --descend's default is the objective's (None until SearchOptions resolves it), and the help says so.
    from search.option_table import SEARCH

    assert params["descend"].default is None is SEARCH["descend"] and opts.descend is False
    for name in ("objective", "sampler", "pruner", "device"):
        assert getattr(params[name].default, "value", params[name].default) == getattr(opts, name), name
    assert params["heartbeat"].default == ",".join(map(str, HEARTBEAT))
    search_help = runner.invoke(app, ["search", "--help"], env={"COLUMNS": "250"}).output
    for choices in (OBJECTIVES, SAMPLERS, PRUNERS, DEVICES):
        assert f"<{'|'.join(choices)}>" in search_help, choices
    certify_help = " ".join(runner.invoke(app, ["certify", "--help"], env={"COLUMNS": "250"}).output.split())
    for choices in (OPTIMIZERS, SCHEDULES):
        assert f"<{'|'.join(choices)}>" in certify_help, choices
    recipe = TrainConfig()
    for name in ("lr", "batch_size", "augment", "optimizer", "schedule"):
        assert f"else {getattr(recipe, name)}]" in certify_help, name
    assert (f"else 0.0 for a net of at most 5,000 parameters, {recipe.label_smoothing} above]") in certify_help


def test_a_bound_refuses_naming_the_value_and_the_limit():
    from search.option_table import BOUNDS, PERCENT

    assert BOUNDS["subset"].refusal(10) == "10 must be from 100 to 50,000 training images"
    assert BOUNDS["trials"].refusal(0) == "0 must be at least 1"
    assert PERCENT.refusal(100.5) == "100.5 must be from 0 to 100 percent"
    assert BOUNDS["subset"].refusal(None) is None and PERCENT.refusal(99.4) is None


def test_every_parameter_of_every_command_has_a_description_and_usage_lines_have_no_braces():
    for name, command in typer.main.get_command(app).commands.items():
        for param in command.params:
            if not getattr(param, "hidden", False):  # words before the default, not the default alone
                assert (param.help or "").split("[default:")[0].strip(), f"{name} {param.name} has no description"
        usage = runner.invoke(app, [name, "--help"], env={"COLUMNS": "250"}).output.splitlines()[0]
        assert usage.startswith("Usage: ") and "{" not in usage and "}" not in usage, usage
    assert runner.invoke(app, ["check", "--help"]).output.splitlines()[0].endswith(" check [OPTIONS] TARGET")
    assert runner.invoke(app, ["certify", "--help"]).output.splitlines()[0].endswith(" certify [OPTIONS] [TARGET]")


def test_best_and_certify_say_what_their_epochs_default_to():
    def epochs_help(command):
        return next(p.help for p in typer.main.get_command(app).commands[command].params if p.name == "epochs")

    assert epochs_help("best").endswith("[default: the trial's, as searched].")
    assert epochs_help("certify").endswith("[default: the trial's with --trial, else 20].")


def test_certify_trial_without_study_is_refused_naming_the_missing_option():
    out = runner.invoke(app, ["certify", "--trial", "3"])
    assert out.exit_code == 2 and "Traceback" not in out.output
    assert " ".join(out.output.split()) == "error: --trial 3 needs --study, the study the trial is stored in " \
                                           "(--study S --trial 3)"


def test_a_one_epoch_trial_is_said_in_the_singular(tmp_path, data_root, monkeypatch):
    from search.options import SearchOptions
    from search.study import run_search
    from test_best_report import _measure_only  # `fit` without training: the line is what is tested

    run_search(SearchOptions(trials=1, study="one", results_dir=str(tmp_path), epochs=1, subset=200,
                             data_dir=str(data_root), device="cpu"), log=lambda line: None)
    monkeypatch.setattr("search.retrain.fit", _measure_only)
    out = runner.invoke(app, ["best", "--study", "one", "--results-dir", str(tmp_path), "--seeds", "1",
                              "--data-dir", str(data_root), "--device", "cpu"])
    text = " ".join(out.output.split())
    assert out.exit_code == 1, text  # untrained, it fails the accuracy rule
    assert "note: trial 0 was searched with 1 epoch and is retrained with as many" in text, text
    assert "1 seed x 1 epoch on 60,000 images" in text and "1 epochs" not in text, text

"""Every command's --help shows each option's meaning and its default (rich markup once swallowed the defaults)."""

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

"""`cli.py check` and `cli.py show`: tables, verdicts and exit codes (0 pass, 1 refused, 2 unusable input)."""

import json
import textwrap

from typer.testing import CliRunner

from cli import app

runner = CliRunner()


def test_check_baseline_passes_with_table():
    result = runner.invoke(app, ["check", "baseline"])
    assert result.exit_code == 0, result.output
    assert "b1.conv1" in result.output and "19,674" in result.output
    assert "PASS: 19,674 parameters, under the 20,000 budget" in result.output


def test_check_with_smaller_budget_refuses():
    result = runner.invoke(app, ["check", "baseline", "--max-params", "19000"])
    assert result.exit_code == 1
    assert "19,674 parameters, at or over the 19,000 budget" in result.output


def test_show_json_feeds_check(tmp_path):
    result = runner.invoke(app, ["show", "tiny", "--json"])
    assert result.exit_code == 0
    spec_file = tmp_path / "tiny.json"
    spec_file.write_text(result.output)
    assert json.loads(result.output)["head"] == {"kind": "conv_gap"}
    checked = runner.invoke(app, ["check", str(spec_file)])
    assert checked.exit_code == 0 and "5,106" in checked.output


def test_malformed_spec_json_exits_2(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"blocks": [ {"type": "conv_block", ')
    result = runner.invoke(app, ["check", str(bad)])
    assert result.exit_code == 2
    assert "spec is not valid JSON" in result.output


def test_invalid_spec_values_exit_2(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"blocks": [{"type": "conv_block", "convs": [{"out_channels": 0}]}]}))
    result = runner.invoke(app, ["check", str(bad)])
    assert result.exit_code == 2 and "out_channels=0" in result.output


def test_unknown_target_exits_2():
    result = runner.invoke(app, ["check", "no-such-thing"])
    assert result.exit_code == 2 and "neither a preset" in result.output


def test_user_module_with_linear_is_refused(tmp_path):
    source = tmp_path / "mynet.py"
    source.write_text(textwrap.dedent("""
        import torch.nn as nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.features = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
                self.fc = nn.Linear(8, 10)

            def forward(self, x):
                return self.fc(self.features(x))

        class Good(nn.Module):
            def __init__(self):
                super().__init__()
                self.body = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 10, 1),
                                          nn.AdaptiveAvgPool2d(1), nn.Flatten())

            def forward(self, x):
                return self.body(x)
    """))
    result = runner.invoke(app, ["check", f"{source}:Net"])
    assert result.exit_code == 1
    assert "layer 'fc' is a Linear" in result.output
    good = runner.invoke(app, ["check", f"{source}:Good"])
    assert good.exit_code == 0, good.output
    assert "PASS: 170 parameters" in good.output
    missing = runner.invoke(app, ["check", f"{source}:Nope"])
    assert missing.exit_code == 2 and "defines no 'Nope'" in missing.output


def test_truncated_idx_file_exits_2(mnist_copy):
    with open(mnist_copy / "MNIST" / "raw" / "train-images-idx3-ubyte", "r+b") as f:
        f.truncate(1_000_000)
    result = runner.invoke(app, ["data", "--data-dir", str(mnist_copy)])
    assert result.exit_code == 2
    assert "train-images-idx3-ubyte: 1,000,000 bytes, expected 47,040,016" in result.output

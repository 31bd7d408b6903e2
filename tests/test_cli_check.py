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


OWN_MODULES = textwrap.dedent("""
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

    class WholeImage(Good):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 10, 28), nn.Flatten())  # a 28x28 kernel on the 28x28 image
""")


def test_user_module_with_linear_is_refused(tmp_path):
    source = tmp_path / "mynet.py"
    source.write_text(OWN_MODULES)
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


def test_check_refuses_what_it_cannot_judge_and_judges_like_the_search(tmp_path):
    source = tmp_path / "things.py"
    source.write_text("NotAModule = 3\n\nclass Plain:\n    pass\n")
    for name in ("NotAModule", "Plain"):
        out = runner.invoke(app, ["check", f"{source}:{name}"])
        assert out.exit_code == 2 and f"{name} is a" in out.output and "not a torch.nn.Module class" in out.output
        assert "Traceback" not in out.output
    out = runner.invoke(app, ["check", str(source)])
    assert out.exit_code == 2 and f"{source}:ClassName" in out.output and "JSON" not in out.output

    def spec_file(name, data):
        path = tmp_path / name
        path.write_text(json.dumps(data))
        return str(path)

    block = {"type": "conv_block", "convs": [{"out_channels": 8}] * 3, "pool": True}
    # Shrinks below 1x1: a network refused by the rules (exit 1), not unusable input.
    shrinking = spec_file("shrink.json", {"blocks": [block] * 3})
    out = runner.invoke(app, ["check", shrinking])
    assert out.exit_code == 1 and "REFUSED" in out.output and "must stay at least 1x1" in out.output
    # Three classes for the ten digits: refused, naming the output shape.
    three = spec_file("three.json", {"blocks": [block], "num_classes": 3})
    out = runner.invoke(app, ["check", three])
    assert out.exit_code == 1 and "output shape (1, 3), expected (1, 10) logits" in out.output
    # A 3-px receptive field: allowed by the rules, with the search's heuristic said as a warning.
    narrow = spec_file("narrow.json", {"blocks": [{"type": "conv_block", "convs": [{"out_channels": 8}]}]})
    out = runner.invoke(app, ["check", narrow])
    assert out.exit_code == 0 and "warning: a receptive field under 12 px" in out.output, out.output
    # GAP then a 1x1 conv: allowed, and said why.
    gap_first = spec_file("gap.json", {"blocks": [block], "head": {"kind": "gap_conv"}})
    out = runner.invoke(app, ["check", gap_first])
    assert out.exit_code == 0 and "allowed, not fully connected" in out.output


def test_check_refuses_a_whole_image_conv(tmp_path):
    source = tmp_path / "fc.py"
    source.write_text(OWN_MODULES)
    out = runner.invoke(app, ["check", f"{source}:WholeImage"])
    assert out.exit_code == 1 and "28x28 kernel over its whole 28x28 input map" in out.output
    assert "PASS" not in out.output


def test_check_is_callable_from_python_with_the_clis_verdicts_and_exit_codes(tmp_path):
    import pytest

    from search.commands import check_command
    from search.refusals import CommandError, Refused

    net, verdict = check_command("baseline", 19_000)
    assert not verdict.ok and verdict.n_params == 19_674
    assert check_command("micro")[1].ok
    with pytest.raises(CommandError) as unusable:
        check_command("no-such-thing")
    assert unusable.value.code == 2 and "neither a preset" in str(unusable.value)
    block = {"type": "conv_block", "convs": [{"out_channels": 8}] * 3, "pool": True}
    shrinking = tmp_path / "shrink.json"
    shrinking.write_text(json.dumps({"blocks": [block] * 3}))
    with pytest.raises(Refused) as refused:
        check_command(str(shrinking))
    assert refused.value.code == 1 and "must stay at least 1x1" in str(refused.value)


NOT_LOGITS = textwrap.dedent("""
    import torch.nn as nn

    class Logits(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 10, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    class Pair(Logits):
        def forward(self, x):
            return self.body(x), self.body(x)

    class Listed(Logits):
        def forward(self, x):
            return [self.body(x), 3]

    class Named(Logits):
        def forward(self, x):
            return {"logits": self.body(x)}

    class Nothing(Logits):
        def forward(self, x):
            self.body(x)

    class Number(Logits):
        def forward(self, x):
            return 3.0
""")


def test_a_forward_that_returns_no_tensor_of_logits_is_refused_saying_what_it_returned(tmp_path):
    source = tmp_path / "outputs.py"
    source.write_text(NOT_LOGITS)
    expected = {
        "Pair": "output is a tuple of 2 tensors, expected one (N, 10) tensor of logits",
        "Listed": "output is a list of 2 items (Tensor, int), expected one (N, 10) tensor of logits",
        "Named": "output is a dict with 1 key ('logits'), expected one (N, 10) tensor of logits",
        "Nothing": "output is None (does forward return its result?), expected one (N, 10) tensor of logits",
        "Number": "output is a float, not a tensor, expected one (N, 10) tensor of logits",
    }
    for name, reason in expected.items():
        out = runner.invoke(app, ["check", f"{source}:{name}"])
        assert out.exit_code == 1 and f"  - {reason}\n" in out.output, (name, out.output)
        assert "output shape ()" not in out.output and "Traceback" not in out.output


def test_the_layer_table_is_whole_when_the_output_is_no_terminal():
    # CliRunner's output is no terminal, where rich assumes 80 columns: no column name or figure may be cut short.
    out = runner.invoke(app, ["check", "micro"])
    assert out.exit_code == 0 and "…" not in out.output
    header = next(line for line in out.output.splitlines() if "layer" in line and "op" in line)
    assert all(name in header for name in ("receptive field", "MACs", "activation bytes", "int8 bytes"))
    total = next(line for line in out.output.splitlines() if "total" in line)
    assert all(figure in total for figure in ("4,582", "1,132,880", "12,544", "5,060"))

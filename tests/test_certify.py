"""`certify` trains and judges any network (preset, spec JSON, a module of one's own, a stored trial); `export` writes
ONNX and torch.export (.pt2) files with BatchNorm folded, checked on the test set, an int8 ONNX file with --int8, and
a model card."""

import hashlib
import json
import textwrap

import pytest
import torch
from typer.testing import CliRunner

from cli import app

runner = CliRunner()

OWN_NET = textwrap.dedent("""
    import torch.nn as nn

    class Small(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(16, 10, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())

        def forward(self, x):
            return self.body(x)

    class WithLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, stride=3)
            self.fc = nn.Linear(4 * 9 * 9, 10)

        def forward(self, x):
            return self.fc(self.conv(x).flatten(1))
""")


def run(*args):
    out = runner.invoke(app, [str(a) for a in args])
    return out.exit_code, " ".join(out.output.split())


@pytest.fixture(scope="module")
def own_net(tmp_path_factory):
    path = tmp_path_factory.mktemp("own") / "mynet.py"
    path.write_text(OWN_NET)
    return path


@pytest.fixture(scope="module")
def certified_micro(tmp_path_factory, data_root):
    """The micro preset certified for one epoch, one seed: it fails the accuracy rule (about 97-98% after an epoch)."""
    results = tmp_path_factory.mktemp("results")
    code, out = run("certify", "micro", "--epochs", 1, "--seeds", 1, "--results-dir", results, "--data-dir",
                    data_root, "--device", "cpu")
    return results, code, out


def test_certify_a_preset_writes_its_certificate_and_judges_four_rules(certified_micro):
    results, code, out = certified_micro
    cert = json.loads((results / "certified" / "micro" / "certificate.json").read_text())
    assert cert["name"] == "micro" and cert["source"] == {"kind": "preset", "target": "micro"}
    assert cert["n_params"] == 4_582 and cert["config"]["epochs"] == 1 and len(cert["seeds"]) == 1
    assert cert["config"]["label_smoothing"] == 0.0  # the recipe by size: no smoothing at 5,000 params or fewer
    assert [r["rule"] for r in cert["rules"]] == ["fewer than 20,000 parameters", "no fully connected layer",
                                                  "at most 20 epochs",
                                                  "final-epoch test accuracy at least 99.40% (mean of 1 seed)"]
    assert 0.9 < cert["final_test_acc_mean"] < 0.994 and not cert["rules"][3]["pass"]
    assert code == 1 and "FAIL" in out  # one epoch falls short of 99.4%
    assert (results / "certified" / "micro" / "seed0.pt").is_file()


def test_certify_a_spec_json_and_refusals_before_training(tmp_path, data_root):
    spec = tmp_path / "narrow.json"
    shown = runner.invoke(app, ["show", "micro", "--json"])
    assert shown.exit_code == 0 and json.loads(shown.output)["blocks"]
    spec.write_text(shown.output)
    common = ["--results-dir", tmp_path / "r", "--data-dir", data_root, "--device", "cpu"]
    # Refused before training, exit 1 with the reason: over a budget, more than 20 epochs.
    code, out = run("certify", "baseline", "--max-params", 10_000, *common)
    assert code == 1 and "REFUSED before training" in out and "fewer than 10,000 parameters" in out
    assert "seed 1/" not in out and not (tmp_path / "r" / "certified").exists()
    code, out = run("certify", spec, "--epochs", 25, *common)
    assert code == 1 and "--epochs 25: the rules allow at most 20 epochs" in out
    # Bad input: exit 2.
    code, out = run("certify", *common)
    assert code == 2 and "give a TARGET" in out
    code, out = run("certify", "micro", "--name", "../x", *common)
    assert code == 2 and "--name '../x'" in out
    code, out = run("certify", "micro", "--lr", -1, *common)
    assert code == 2 and "lr=-1" in out
    # A spec file: named after it, trained with the overridden recipe.
    code, out = run("certify", spec, "--epochs", 1, "--seeds", 1, "--batch-size", 128, "--augment", 0, *common)
    assert code == 1 and "FAIL" in out  # trained and certified; one epoch falls short of 99.4%
    cert = json.loads((tmp_path / "r" / "certified" / "narrow" / "certificate.json").read_text())
    assert cert["source"]["kind"] == "spec" and cert["config"]["batch_size"] == 128 and cert["config"]["augment"] == 0


def test_certify_your_own_module_and_refuse_a_fully_connected_one(own_net, tmp_path, data_root):
    from search.retrain import CheckpointError, load_checkpoint

    common = ["--results-dir", tmp_path, "--data-dir", data_root, "--device", "cpu"]
    code, out = run("certify", f"{own_net}:WithLinear", *common)
    assert code == 1 and "REFUSED before training" in out and "layer 'fc' is a Linear" in out
    code, out = run("certify", f"{own_net}:Small", "--epochs", 1, "--seeds", 1, *common)
    assert code == 1 and "FAIL" in out and "REFUSED" not in out  # certified, short of 99.4% after one epoch
    cert = json.loads((tmp_path / "certified" / "Small" / "certificate.json").read_text())
    assert cert["module"]["class"] == "Small" and cert["spec"] is None
    assert cert["n_params"] == 8 * 9 + 16 + 16 * 8 * 9 + 32 + 16 * 10 + 10
    assert cert["final_test_acc_mean"] > 0.8
    assert cert["module"]["sha256"] == hashlib.sha256(own_net.read_bytes()).hexdigest()
    assert cert["seeds"][0]["checkpoint_sha256"] == hashlib.sha256(
        open(cert["seeds"][0]["checkpoint"], "rb").read()).hexdigest()
    # The file a checkpoint names is not imported unless the caller names it too.
    with pytest.raises(CheckpointError, match="imported only when the command line names it too"):
        load_checkpoint(cert["seeds"][0]["checkpoint"])
    module, payload = load_checkpoint(cert["seeds"][0]["checkpoint"], f"{own_net}:Small")
    assert type(module).__name__ == "Small" and payload["test_acc"] == cert["final_test_acc_mean"]
    # A study's front.json that names this certificate: it does not verify without the module on the command line
    # (and, were it verified, it certifies no trial and has no spec to count its figures from).
    from search.retrain import read_front

    (tmp_path / "s").mkdir()
    entry = {"trial": 0, "n_params": cert["n_params"], "val_acc": 0.5, "test_acc_mean": cert["final_test_acc_mean"],
             "test_acc_std": 0.0, "test_acc_per_seed": [cert["final_test_acc_mean"]], "certified": False,
             "failed_rules": [], "reused": True, "certificate": str(tmp_path / "certified" / "Small" / "certificate.json")}
    (tmp_path / "s" / "front.json").write_text(json.dumps({"study": "s", "floor": 0.1, "seeds": 1, "target": 0.994,
                                                            "entries": [entry]}))
    front, problems = read_front(str(tmp_path), "s")
    assert front["entries"] == [] and problems == [
        f"{tmp_path / 's' / 'front.json'}: an entry is not shown: trial 0: the certificate is of the module "
        f"{own_net}:Small; a file named inside a certificate is imported only when the command line names it too: "
        "give --module PATH.py:CLASS"], problems


def test_certify_a_stored_trial_keeps_one_certificate_per_network(tmp_path, data_root):
    from search.options import SearchOptions
    from search.study import run_search

    opts = SearchOptions(trials=2, study="two", results_dir=str(tmp_path), epochs=1, max_params=6_000,
                         subset=1_000, data_dir=str(data_root), device="cpu")
    study = run_search(opts, log=lambda line: None).study
    trained = [t.number for t in study.get_trials() if t.user_attrs.get("outcome") in ("completed", "pruned")]
    common = ["--study", "two", "--results-dir", tmp_path, "--data-dir", data_root, "--device", "cpu", "--seeds", 1]
    for number in trained:
        code, out = run("certify", "--trial", number, *common)
        assert code == 1 and "FAIL" in out, out  # one epoch on 1,000 images: certified, short of 99.4%
    for number in trained:  # one folder each: certifying the second did not overwrite the first
        cert = json.loads((tmp_path / "certified" / f"two-trial-{number}" / "certificate.json").read_text())
        assert cert["trial"] == number and cert["source"] == {"kind": "trial", "study": "two", "trial": number}
    code, out = run("best", "--study", "two", "--results-dir", tmp_path, "--data-dir", data_root, "--device", "cpu",
                    "--seeds", 1, "--max-params", 100)
    assert code == 1 and "REFUSED before training" in out and "seed 1/" not in out


def test_export_writes_onnx_pt2_and_int8_files_that_match_the_checkpoint(certified_micro, data_root):
    import onnx
    import onnxruntime

    results, _, _ = certified_micro
    folder = results / "certified" / "micro" / "export"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx.data").write_bytes(b"left by an earlier export")  # stale external data: removed
    code, out = run("export", "--int8", "--results-dir", results, "--data-dir", data_root)
    assert code == 0, out
    assert "warning: micro fails final-epoch test accuracy" in out  # failed a rule: exported, with a warning
    assert sorted(p.name for p in folder.iterdir()) == ["MODEL.md", "export.json", "model.int8.onnx", "model.onnx",
                                                         "model.pt2"]
    summary = json.loads((folder / "export.json").read_text())
    acc = summary["accuracy"]
    assert acc["onnx"] == pytest.approx(acc["checkpoint"], abs=1e-4)
    assert acc["pt2"] == pytest.approx(acc["checkpoint"], abs=1e-4)
    # BatchNorm folded: 68 channels' scale and shift (136) become 68 conv biases.
    assert summary["n_params"] == 4_582 and summary["n_params_folded"] == 4_582 - 136 + 68
    proto = onnx.load(str(folder / "model.onnx"))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["normalisation_mean"] and meta["n_params_folded"] == "4514" and meta["rules"].startswith("fails")
    assert not [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
    x = torch.zeros(37, 1, 28, 28)
    for name in ("model.onnx", "model.int8.onnx"):
        session = onnxruntime.InferenceSession(str(folder / name), providers=["CPUExecutionProvider"])
        for batch in (1, 37):  # the batch size is dynamic
            assert session.run(None, {"image": x[:batch].numpy()})[0].shape == (batch, 10)
    program = torch.export.load(str(folder / "model.pt2")).module()
    assert program(x).shape == (37, 10)
    int8 = summary["int8"]
    # micro's figures (tests/test_resources.py computes them by hand): the file's payload and its measured peak
    assert (int8["int8_payload_bytes"], int8["peak_activation_bytes"], int8["macs"]) == (5_060, 12_544, 1_132_880)
    assert int8["expected"]["int8_payload_bytes"] == 5_060
    assert int8["file_bytes"] == (folder / "model.int8.onnx").stat().st_size
    assert int8["drop_points"] == pytest.approx((acc["onnx"] - acc["int8"]) * 100)
    assert (int8["warning"] is None) == (int8["drop_points"] <= 0.1)
    card = (folder / "MODEL.md").read_text()
    assert "**Verdict: FAILS final-epoch test accuracy" in card and "| b1.conv1 | conv | 4x28x28 | 36 |" in card
    assert "python cli.py certify micro --seeds 1 --epochs 1" in card
    assert (f"ONNX (onnxruntime) {acc['onnx']:.2%}, torch.export program (model.pt2) {acc['pt2']:.2%}, int8 ONNX "
            f"{acc['int8']:.2%}.") in card
    assert f"| file size | {int8['file_bytes']:,} bytes |" in card
    assert "| MACs per image | 1,132,880 |" in card and "5,060 bytes (models/resources.py: 5,060)" in card
    assert f"int8 {acc['int8']:.2%}, float ONNX {acc['onnx']:.2%}" in card and "1 thread, median of 200 runs" in card


def test_export_fails_and_says_by_how_much_when_a_file_disagrees(certified_micro, data_root, monkeypatch, tmp_path):
    from search import export

    results, _, _ = certified_micro
    monkeypatch.setattr(export, "_onnx_accuracy", lambda path, x, y: 0.5)
    code, out = run("export", "--certificate", results / "certified" / "micro" / "certificate.json", "--out",
                    tmp_path / "x", "--data-dir", data_root)
    assert code == 1 and "the onnx network's test accuracy 50.0000% differs from the checkpoint's" in out
    code, out = run("export", "--results-dir", tmp_path / "none", "--data-dir", data_root)
    assert code == 2 and "no certificate under" in out


def test_a_mean_that_rounds_to_the_target_but_falls_short_shows_the_third_digit():
    from models.rules import RULES

    # The CPU certificate of micro: seeds 99.40, 99.44, 99.35% -> mean 99.3967%, a FAIL that "99.40%" would hide.
    assert RULES.accuracy_text(0.993967, 0.994) == "99.397%"
    assert RULES.accuracy_text(0.9941, 0.994) == "99.41%"
    assert RULES.accuracy_text(0.994, 0.994) == "99.40%"  # at the target: passes, two digits say so
    assert RULES.accuracy_text(0.9931, 0.994) == "99.31%"
    assert RULES.accuracy_text(0.993967, None) == "99.40%"  # no target, nothing to hide


def _fake_fit(stop_at_seed: int | None):
    """In place of training: each epoch at 10.0 s and a test accuracy of 50% + seed%, reported through on_epoch;
    seed `stop_at_seed` stops in its second epoch as a SIGTERM would (search.engine.runtime.StopRequested)."""
    from search.engine import EpochRecord, History
    from search.engine.runtime import StopRequested

    def fit(model, train, val, cfg, *, on_epoch, **_):
        history = History(status="completed")
        for epoch in range(1, cfg.epochs + 1):
            if cfg.seed == stop_at_seed and epoch == 2:
                raise StopRequested("SIGTERM")
            record = EpochRecord(epoch, 0.1, 0.5, 0.1, 0.5 + cfg.seed / 100, 0.01, 10.0, 1000.0)
            history.epochs.append(record)
            on_epoch(record)
        return history
    return fit


def test_certify_says_each_epoch_with_the_time_left_and_a_stop_keeps_what_was_stored(tmp_path, data_root,
                                                                                     monkeypatch):
    from search import retrain
    from search.commands import Certifying, certify_command
    from search.refusals import Interrupted

    folder = tmp_path / "certified" / "micro"
    lines: list[str] = []
    how = Certifying(3, str(data_root), "cpu", str(tmp_path), 20_000, log=lines.append, warn=lines.append)
    monkeypatch.setattr(retrain, "fit", _fake_fit(stop_at_seed=None))
    _, cert = certify_command("micro", how, epochs=2)
    assert lines[0] == "certifying micro (4,582 params): 3 seeds x 2 epochs on 60,000 images"
    # The time left: this seed's epochs and the other seeds', at the mean epoch time so far (10 s).
    assert lines[1:7] == ["seed 1/3: epoch 1/2, test 50.00%, 10.0 s, about 50 s left",
                          "seed 1/3: epoch 2/2, test 50.00%, 10.0 s, about 40 s left",
                          "seed 2/3: epoch 1/2, test 51.00%, 10.0 s, about 30 s left",
                          "seed 2/3: epoch 2/2, test 51.00%, 10.0 s, about 20 s left",
                          "seed 3/3: epoch 1/2, test 52.00%, 10.0 s, about 10 s left",
                          "seed 3/3: epoch 2/2, test 52.00%, 10.0 s"]
    assert sorted(p.name for p in folder.iterdir()) == ["certificate.json", "seed0.pt", "seed1.pt", "seed2.pt"]
    stored = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert [r["checkpoint"] for r in cert["seeds"]] == [str(folder / f"seed{k}.pt") for k in range(3)]

    # SIGTERM in seed 2's second epoch: exit 143, saying what is kept; the complete run's files untouched.
    lines.clear()
    monkeypatch.setattr(retrain, "fit", _fake_fit(stop_at_seed=1))
    with pytest.raises(Interrupted) as stop:
        certify_command("micro", how, epochs=2)
    assert stop.value.code == 143 and str(stop.value) == (
        f"SIGTERM: certification of micro interrupted during seed 2/3, epoch 2/2: seed 1 finished, checkpoint kept "
        f"in {folder / 'partial'}/ (seed0.pt; not certified, not reused by a new run); no certificate written; the "
        "earlier certificate and its checkpoints are left as they were. Run the same command again to retrain all 3 "
        "seeds.")
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == stored
    assert [p.name for p in (folder / "partial").iterdir()] == ["seed0.pt"]
    assert lines[-1] == "seed 2/3: epoch 1/2, test 51.00%, 10.0 s, about 30 s left"


def test_ctrl_c_in_certify_exits_130_with_one_line_and_no_traceback(tmp_path, data_root):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    folder = tmp_path / "certified" / "micro"
    folder.mkdir(parents=True)
    earlier = {"certificate.json": b'{"an": "earlier certificate"}', "seed0.pt": b"earlier weights"}
    for name, content in earlier.items():
        (folder / name).write_bytes(content)
    args = [sys.executable, str(root / "cli.py"), "certify", "micro", "--seeds", "2", "--epochs", "1",
            "--results-dir", str(tmp_path), "--data-dir", str(data_root), "--device", "cpu"]
    # SIGINT's default disposition, as a terminal's Ctrl-C finds it (a background shell may have set "ignore").
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=root,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = proc.stdout.readline()
    epoch_line = proc.stdout.readline()  # seed 1 has trained its only epoch: Ctrl-C
    proc.send_signal(signal.SIGINT)
    out = first + epoch_line + proc.stdout.read()
    assert proc.wait(timeout=300) == 130, out
    assert first == "certifying micro (4,582 params): 2 seeds x 1 epoch on 60,000 images\n", out
    assert epoch_line.startswith("seed 1/2: epoch 1/1, test ") and epoch_line.endswith(" s left\n"), out  # seed 2's
    assert "Traceback" not in out and out.count("Ctrl-C: certification of micro interrupted during seed 2/2, "
                                                "epoch 1/1: seed 1 finished, checkpoint kept in") == 1, out
    assert {name: (folder / name).read_bytes() for name in earlier} == earlier  # the earlier run's files
    assert [p.name for p in (folder / "partial").iterdir()] == ["seed0.pt"]


def test_a_refused_whole_map_conv_is_said_once(tmp_path, data_root):
    """A spec's whole-map conv is seen on the spec and on the module it builds: one reason, in the spec's words."""
    spec = json.loads(runner.invoke(app, ["show", "micro", "--json"]).output)
    spec["blocks"][2]["pool"] = True  # 28 -> 14 -> 7 -> 3: a 3x3 conv on the 3x3 map sees all of it
    spec["blocks"].append({"type": "conv_block", "convs": [{"out_channels": 8}], "pool": False})
    (tmp_path / "whole3.json").write_text(json.dumps(spec))
    (tmp_path / "conv28.py").write_text(textwrap.dedent("""
        import torch.nn as nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(1, 10, 28)

            def forward(self, x):
                return self.conv(x).flatten(1)
    """))
    common = ["--results-dir", tmp_path / "r", "--data-dir", data_root, "--device", "cpu"]
    code, out = run("certify", tmp_path / "whole3.json", *common)
    assert code == 1 and out.count("whole 3x3 input map") == 1, out
    assert "b4.conv1: a 3x3 kernel over its whole 3x3 input map, a fully connected layer" in out
    code, out = run("certify", f"{tmp_path / 'conv28.py'}:Net", *common)
    assert code == 1 and out.count("a 28x28 kernel over its whole 28x28 input map") == 1, out
    assert out.count("REFUSED before training") == 1 and not (tmp_path / "r" / "certified").exists()

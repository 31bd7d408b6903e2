"""Input from someone else: certificates and checkpoints that were edited or forged, spec and certificate files that
are too big, too deep, not UTF-8 or of the wrong types, module files that exit while imported. Each is refused with
exit 1 (a claim its evidence contradicts) or 2 (unusable input), a message naming the value, and no traceback.

No training here: `fit` is replaced by one that only measures the freshly built network, so that the certificates
are written by the real `certify`, with real checkpoints, in seconds."""

import hashlib
import io
import json
import math
import os
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from cli import app

runner = CliRunner()

OWN_NET = textwrap.dedent("""
    import torch.nn as nn

    class Small(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 10, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())

        def forward(self, x):
            return self.body(x)
""")


def run(*args):
    out = runner.invoke(app, [str(a) for a in args])
    assert out.exception is None or isinstance(out.exception, SystemExit), out.exception  # no traceback
    assert "Traceback" not in out.output, out.output
    return out.exit_code, " ".join(out.output.split())


def measure_only(model, train, val, cfg, *, data_on_device, **kwargs):
    """`fit` without training: the network's test accuracy as built, recorded as one epoch."""
    from search.engine import evaluate
    from search.engine.config import EpochRecord, History

    torch.manual_seed(cfg.seed)
    for m in model.modules():
        if hasattr(m, "reset_parameters") and m is not model:
            m.reset_parameters()
    loss, acc = evaluate(model, data_on_device[2], data_on_device[3], bf16=False)
    return History([EpochRecord(1, 2.3, 0.1, loss, acc, 0.0, 1.0, 1.0)], status="completed", precision="fp32")


def certify_untrained(results: Path, data_root: Path, *target: str, seeds: int = 2) -> Path:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("search.retrain.fit", measure_only)
        code, out = run("certify", *target, "--epochs", 1, "--seeds", seeds, "--results-dir", results,
                        "--data-dir", data_root, "--device", "cpu")
    assert code == 1 and "FAIL" in out, out  # an untrained net falls short of 99.4%
    return next((results / "certified").glob("*/certificate.json"))


@pytest.fixture(scope="module")
def micro_cert(tmp_path_factory, data_root) -> Path:
    """micro certified with seeds 0 and 1, untrained: a certificate and its two checkpoints."""
    return certify_untrained(tmp_path_factory.mktemp("micro"), data_root, "micro")


@pytest.fixture
def copy_cert(micro_cert, tmp_path):
    """A copy of the micro certificate's folder, to edit, and the edit as a function of the certificate dict."""
    folder = tmp_path / "micro"
    shutil.copytree(micro_cert.parent, folder)
    path = folder / "certificate.json"
    cert = json.loads(path.read_text())
    for run_ in cert["seeds"]:
        run_["checkpoint"] = str(folder / Path(run_["checkpoint"]).name)
    path.write_text(json.dumps(cert))

    def edit(change):
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))
        return path
    return path, edit


def export(path, data_root, *more):
    return run("export", "--certificate", path, "--data-dir", data_root, *more)


def resave_checkpoint(path: Path, change) -> str:
    """Edit a checkpoint's payload, save it again, and return its new sha256 (what a forger would write)."""
    payload = torch.load(path, weights_only=True)
    change(payload)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    path.write_bytes(buffer.getvalue())
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- certificates carry their evidence -------------------------------------------------------------------------

def test_the_certificate_records_the_digests_of_its_checkpoints_and_spec(micro_cert):
    from models.presets import PRESETS
    from search.certificate import spec_digest

    cert = json.loads(micro_cert.read_text())
    assert cert["spec_sha256"] == spec_digest(PRESETS["micro"])
    for run_ in cert["seeds"]:
        assert run_["checkpoint_sha256"] == hashlib.sha256(Path(run_["checkpoint"]).read_bytes()).hexdigest()


def test_an_edited_accuracy_is_refused_naming_the_field_and_both_values(copy_cert, data_root):
    path, edit = copy_cert
    edit(lambda c: c["seeds"][0].update(final_test_acc=0.9952))
    code, out = export(path, data_root)
    assert code == 1 and "seeds[0].final_test_acc: the certificate says 99.52%, but seed0.pt recorded" in out, out
    assert "nothing written" in out and not (path.parent / "export").exists()


def forge_accuracy(cert: dict, folder: Path, acc: float) -> None:
    """What a careful forger does: seed 0's accuracy edited in its checkpoint and the certificate, the digest, the
    mean, the spread and the accuracy rule's figure recomputed, so that only a measurement can tell."""
    from search.certificate import accuracy_row

    new = resave_checkpoint(folder / "seed0.pt", lambda p: p.update(test_acc=acc))
    cert["seeds"][0].update(final_test_acc=acc, checkpoint_sha256=new)
    row, mean, std = accuracy_row([r["final_test_acc"] for r in cert["seeds"]], cert["target"], "mnist")
    cert.update(final_test_acc_mean=mean, final_test_acc_std=std)
    cert["rules"][3] = row


def test_an_accuracy_edited_in_the_checkpoint_too_is_measured_again(copy_cert, data_root):
    path, edit = copy_cert
    edit(lambda c: forge_accuracy(c, path.parent, 0.9952))
    code, out = export(path, data_root)
    assert code == 1 and "seeds[0].final_test_acc: the certificate says 99.52%, but seed0.pt measures" in out, out
    assert "on the 10,000 test images" in out and not (path.parent / "export").exists()


def test_a_forged_pass_on_every_rule_is_judged_again(copy_cert, data_root):
    path, edit = copy_cert

    def forge(c):
        for rule in c["rules"]:
            rule["pass"] = True
        c["certified"] = True
    edit(forge)
    code, out = export(path, data_root)
    assert code == 1 and "rules[3]: the certificate says 'final-epoch test accuracy at least 99.40% (mean of 2 " \
                         "seeds)' PASS" in out and "judged from the evidence: " in out and "FAIL" in out, out
    assert not (path.parent / "export").exists()


def test_an_edited_parameter_count_and_a_tampered_checkpoint_are_refused(copy_cert, data_root):
    path, edit = copy_cert
    edit(lambda c: c.update(n_params=1234))
    code, out = export(path, data_root)
    assert code == 1 and "n_params: the certificate says 1,234, but the rebuilt network counts 4,582" in out, out
    edit(lambda c: c.update(n_params=4582))
    with open(path.parent / "seed1.pt", "ab") as f:
        f.write(b"\0")
    code, out = export(path, data_root)
    assert code == 1 and "seeds[1].checkpoint_sha256: the certificate says" in out and "has the sha256" in out, out


def test_a_certificate_naming_micro_beside_another_nets_checkpoint(copy_cert, data_root, tmp_path):
    from models.presets import PRESETS
    from search.engine import TrainConfig
    from search.retrain import Certifiable, save_checkpoint

    path, edit = copy_cert
    other = PRESETS["tiny"] if "tiny" in PRESETS else PRESETS["baseline"]
    c = Certifiable("other", {"kind": "preset", "target": "other"}, TrainConfig(epochs=1), spec=other)
    cert = json.loads(path.read_text())
    save_checkpoint(path.parent / "seed0.pt", c.build(), c, TrainConfig(epochs=1, seed=0),
                    cert["seeds"][0]["final_test_acc"])
    new = hashlib.sha256((path.parent / "seed0.pt").read_bytes()).hexdigest()
    edit(lambda c: c["seeds"][0].update(checkpoint_sha256=new))
    code, out = export(path, data_root)
    assert code == 1 and "spec: the certificate says a spec of sha256" in out and "seed0.pt holds a spec of " \
                                                                                  "sha256" in out, out


def test_an_edited_config_is_refused(copy_cert, data_root):
    path, edit = copy_cert
    edit(lambda c: c["config"].update(epochs=20))
    code, out = export(path, data_root)
    assert code == 1 and "config.epochs: the certificate says 20, but seed0.pt was trained with 1" in out, out


def test_reuse_verifies_the_certificate_first(micro_cert, copy_cert, data_root):
    from models.presets import PRESETS
    from search.engine import TrainConfig
    from search.retrain import Certifiable, reusable_certificate

    path, edit = copy_cert
    results = path.parent.parent / "results"
    (results / "certified").mkdir(parents=True)
    shutil.move(path.parent, results / "certified" / "micro")
    path = results / "certified" / "micro" / "certificate.json"
    cert = json.loads(path.read_text())
    c = Certifiable("micro", cert["source"], TrainConfig(**cert["config"]), spec=PRESETS["micro"])
    reused, why = reusable_certificate(str(results), c, 2, cert["target"], cert["max_params"], str(data_root))
    assert reused is not None and why is None
    forge_accuracy(cert, path.parent, 0.9952)
    path.write_text(json.dumps(cert))
    reused, why = reusable_certificate(str(results), c, 2, cert["target"], cert["max_params"], str(data_root))
    assert reused is None and "seeds[0].final_test_acc: the certificate says 99.52%, but seed0.pt measures" in why


# ---- module certificates: nothing named inside is imported -------------------------------------------------------

@pytest.fixture(scope="module")
def module_cert(tmp_path_factory, data_root) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("own")
    net = folder / "mynet.py"
    net.write_text(OWN_NET)
    return certify_untrained(folder / "results", data_root, f"{net}:Small", seeds=1), net


def test_a_module_certificate_needs_the_module_on_the_command_line(module_cert, data_root, tmp_path):
    cert, net = module_cert
    code, out = export(cert, data_root, "--out", tmp_path / "x")
    assert code == 2 and "imported only when the command line names it too: give --module PATH.py:CLASS" in out, out
    changed = tmp_path / "mynet.py"
    changed.write_text(OWN_NET + "\n# edited\n")
    code, out = export(cert, data_root, "--module", f"{changed}:Small", "--out", tmp_path / "x")
    assert code == 1 and "module.sha256: the certificate says" in out and "has the source sha256" in out, out
    code, out = export(cert, data_root, "--module", f"{net}:Other", "--out", tmp_path / "x")
    assert code == 1 and "module.class: the certificate says 'Small', but --module names 'Other'" in out, out
    assert not (tmp_path / "x").exists()


def test_a_checkpoint_naming_a_python_file_does_not_run_it(module_cert, data_root, tmp_path):
    from search.certificate import CheckpointError, load_checkpoint

    cert_path, _ = module_cert
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.py"
    evil.write_text(f"open({str(marker)!r}, 'w').write('ran')\nimport torch.nn as nn\nSmall = nn.Module\n")
    ckpt = tmp_path / "seed0.pt"
    shutil.copy(cert_path.parent / "seed0.pt", ckpt)
    new = resave_checkpoint(ckpt, lambda p: p["module"].update(path=str(evil)))
    with pytest.raises(CheckpointError, match="imported only when the command line names it too"):
        load_checkpoint(ckpt)
    cert = json.loads(cert_path.read_text())
    cert["module"]["path"] = str(evil)
    cert["seeds"][0].update(checkpoint=str(ckpt), checkpoint_sha256=new)
    forged = tmp_path / "certificate.json"
    forged.write_text(json.dumps(cert))
    code, out = export(forged, data_root)
    assert code == 2 and "give --module PATH.py:CLASS" in out and not marker.exists(), out


# ---- certificate fields with their types -----------------------------------------------------------------------

@pytest.mark.parametrize("change, code, message", [
    (lambda c: c.update(seeds=[]), 2, "seeds: must be a list of 1 to 100 entries"),
    (lambda c: c["rules"][0].pop("pass"), 2, "rules[0].pass: missing"),
    (lambda c: c.update(n_params="4582"), 2, "n_params: must be an integer of at least 0, got '4582'"),
    (lambda c: c["seeds"][0].update(final_test_acc="0.99"), 2, "seeds[0].final_test_acc: must be a number, got '0.99'"),
    (lambda c: c["seeds"][0].update(final_test_acc=7), 2, "seeds[0].final_test_acc: must be from 0 to 1, got 7"),
    (lambda c: c["seeds"][0].pop("checkpoint_sha256"), 2, "seeds[0].checkpoint_sha256: missing"),
    (lambda c: c.pop("spec_sha256"), 2, "spec_sha256: missing (a certificate from before budgetnas recorded digests"),
    (lambda c: c["seeds"].append(dict(c["seeds"][0])), 2, "seeds: seed numbers repeat (0, 1, 0)"),
    (lambda c: c["config"].update(lr="fast"), 2, "config:"),
    (lambda c: c["spec"]["blocks"].clear(), 2, "spec: network: no blocks"),
    (lambda c: c.update(rules="all pass"), 2, "rules: must be a list of 1 to 20 entries, got 'all pass'"),
    (lambda c: c["seeds"][0].update(checkpoint="/nonexistent/seed9.pt"), 2,
     "seeds[0].checkpoint: /nonexistent/seed9.pt not found (nor beside the certificate)"),
    (lambda c: c["rules"][0].update(figure="1,234"), 1, "rules[0]: the certificate says 'fewer than 20,000 parameters' "
                                                        "PASS (1,234), but judged from the evidence:"),
    (lambda c: c.update(macs=1), 1, "macs: the certificate says 1, but the spec of seed0.pt gives"),
    (lambda c: c["dataset"].update(mean=5.0), 1, "dataset.mean: the certificate says 5.0, but the mnist files under"),
    (lambda c: c["dataset"]["md5"].update({"t10k-labels-idx1-ubyte": "0" * 32}), 1, "dataset.md5: the certificate says"),
])
def test_certificate_fields_are_checked_with_their_types(copy_cert, data_root, change, code, message):
    path, edit = copy_cert
    edit(change)
    got, out = export(path, data_root)
    assert got == code and message in out, out


def test_a_seed_the_certificate_does_not_have_is_exit_2(micro_cert, data_root):
    code, out = export(micro_cert, data_root, "--seed", 5)
    assert code == 2 and "--seed 5: the certificate has seeds 0, 1" in out, out


def test_certificate_files_that_are_too_big_too_deep_or_not_utf8(tmp_path, data_root):
    from search.certificate import MAX_CERTIFICATE_BYTES

    cases = {"deep.json": ("[" * 100_000 + "]" * 100_000).encode(), "latin1.json": b'{"name": "caf\xe9"}',
             "big.json": b" " * (MAX_CERTIFICATE_BYTES + 1), "list.json": b"[1, 2]", "nan.json": b"NaN"}
    messages = {"deep.json": "JSON nested more than 32 deep, the most allowed for a certificate",
                "latin1.json": "not UTF-8 text (byte 0xe9 at offset 13)",
                "big.json": f"{MAX_CERTIFICATE_BYTES + 1:,} bytes, over the {MAX_CERTIFICATE_BYTES:,} allowed for a "
                            "certificate",
                "list.json": "must be an object, got [1, 2]", "nan.json": "must be an object"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        code, out = export(tmp_path / name, data_root)
        assert code == 2 and messages[name] in out, (name, out)


# ---- the report and best --front show only what verifies ---------------------------------------------------------

def test_the_report_leaves_out_a_forged_best_json(micro_cert, tmp_path):
    from search.retrain import read_best, read_front

    study = tmp_path / "s"
    study.mkdir()
    cert = json.loads(micro_cert.read_text())
    (study / "best.json").write_text(json.dumps(cert))
    shown, problem = read_best(str(tmp_path), "s")
    assert shown is not None and problem is None
    cert["seeds"][0]["final_test_acc"] = 0.9952
    (study / "best.json").write_text(json.dumps(cert))
    shown, problem = read_best(str(tmp_path), "s")
    assert shown is None and "best.json is not shown: seeds[0].final_test_acc: the certificate says 99.52%" in problem
    entry = {"trial": 0, "n_params": 4582, "val_acc": 0.5, "test_acc_mean": 0.9952, "test_acc_std": 0.0,
             "test_acc_per_seed": [0.9952], "certified": True, "failed_rules": [], "reused": True,
             "certificate": str(micro_cert)}
    (study / "front.json").write_text(json.dumps({"study": "s", "floor": 0.1, "seeds": 2, "target": 0.994,
                                                  "entries": [entry]}))
    front, problems = read_front(str(tmp_path), "s")
    assert front["entries"] == [] and "an entry is not shown: trial 0:" in problems[0], problems


# ---- spec files: bounds and encodings ----------------------------------------------------------------------------

def spec_with(blocks: int, **more) -> dict:
    return {"blocks": [{"type": "conv_block", "convs": [{"out_channels": 4, "padding": 1}], "pool": False}]
            + [{"type": "transition", "out_channels": 4}] * (blocks - 1), **more}


@pytest.mark.parametrize("data, code, message", [
    (("[" * 100_000 + "]" * 100_000).encode(), 2, "JSON nested more than 32 deep, the most allowed for a spec "
                                                  "(refused before parsing)"),
    (b'{"blocks": [\xff]}', 2, "not UTF-8 text (byte 0xff at offset 12)"),
    (json.dumps(spec_with(200_000)).encode(), 2, "bytes, over the 1,000,000 allowed for a spec"),
    (json.dumps(spec_with(65)).encode(), 2, "network: 65 blocks, more than the 64 allowed"),
    (json.dumps({"blocks": [{"type": "conv_block", "convs": [{"out_channels": 4}] * 20_000}]}).encode(), 2,
     "conv block: 20,000 convs, must have 1 to 3"),
    (b'{"blocks": [{"type": "conv_block", "convs": [{"out_channels": ' + b"9" * 5000 + b"}]}]}", 2,
     "is not usable JSON: Exceeds the limit (4300 digits)"),
    (json.dumps(spec_with(1, num_classes=10 ** 9)).encode(), 2, "num_classes=1000000000, must be an integer from 1 "
                                                                "to 512"),
    (json.dumps(spec_with(1, input_size=100_000)).encode(), 2, "input_size=100000, must be an integer from 1 to 1,024"),
    # 64 blocks of 512 channels: 450 million parameters counted on the spec, refused without building them.
    (json.dumps({"blocks": [{"type": "conv_block", "convs": [{"out_channels": 512, "padding": 1}] * 3,
                             "pool": False}] * 64}).encode(), 1,
     "450,831,882 parameters, at or over the 20,000 budget"),
])
def test_spec_files_have_bounds_and_a_clear_refusal(tmp_path, data, code, message):
    import time

    path = tmp_path / "spec.json"
    path.write_bytes(data)
    start = time.perf_counter()
    got, out = run("check", path)
    assert got == code and message in out, out
    assert time.perf_counter() - start < 20  # refused before anything that grows with the spec


def test_the_spec_limits_are_documented():
    from models import spec

    doc = " ".join((Path(__file__).resolve().parent.parent / "docs" / "spec.md").read_text().split())
    assert f"at most {spec.MAX_BLOCKS} blocks" in doc and f"{spec.MAX_SPEC_BYTES:,} bytes" in doc
    assert f"nested at most {spec.MAX_JSON_DEPTH} deep" in doc and f"{spec.MAX_INPUT_SIZE:,} pixels" in doc


# ---- module files that exit or raise while imported ------------------------------------------------------------

EXITS = textwrap.dedent("""
    import os, sys
    import torch.nn as nn
    HOW = {how!r}
    if HOW == "sys.exit": sys.exit(7)
    if HOW == "os._exit": os._exit(0)
    if HOW == "posix": __import__("posix")._exit(3)
    if HOW == "raise": raise RuntimeError("no GPU here")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            if HOW == "init": sys.exit(5)
            self.conv = nn.Conv2d(1, 10, 3)
            self.pool = nn.AdaptiveAvgPool2d(1)

        def forward(self, x):
            return self.pool(self.conv(x)).flatten(1)
""")


@pytest.mark.parametrize("how, message", [
    ("sys.exit", "net.py: importing it called sys.exit(7) (SystemExit); refused"),
    ("os._exit", "net.py: importing it called os._exit(0); refused"),
    ("posix", "net.py: importing it called os._exit(3); refused"),
    ("raise", "net.py: importing it raised RuntimeError: no GPU here"),
    ("init", "net.py:Net() (made without arguments) called sys.exit(5) (SystemExit); refused"),
])
def test_a_module_that_exits_or_raises_while_imported_is_exit_2(tmp_path, how, message):
    path = tmp_path / "net.py"
    path.write_text(EXITS.format(how=how))
    code, out = run("check", f"{path}:Net")
    assert code == 2 and message in out, out
    assert os._exit.__module__ in ("posix", "nt", "os")  # put back


def test_a_module_file_too_big_or_not_utf8(tmp_path):
    big = tmp_path / "big.py"
    big.write_bytes(b"#" * 1_000_001)
    code, out = run("check", f"{big}:Net")
    assert code == 2 and "1,000,001 bytes, over the 1,000,000 allowed for a module file" in out, out
    latin = tmp_path / "latin.py"
    latin.write_bytes(b"x = 'caf\xe9'\n")
    code, out = run("check", f"{latin}:Net")
    assert code == 2 and "importing it raised SyntaxError" in out, out


def test_check_help_says_a_module_target_is_run():
    out = runner.invoke(app, ["check", "--help"])
    assert "imports that file, running its code" in " ".join(out.output.split())


# ---- fuzz --------------------------------------------------------------------------------------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)


def paths_of(value, prefix=()):
    """Every path into a JSON value (keys and indices), the value itself first."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from paths_of(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from paths_of(v, prefix + (i,))


@st.composite
def mutated(draw, base):
    """`base` with one to three edits: a value replaced by any JSON, a field dropped, or a field added."""
    data = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, 3))):
        paths = list(paths_of(data))[1:]  # the whole document replaced: JSON itself, drawn beside these
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        how = draw(st.sampled_from(["replace", "drop", "add", "nudge"]))
        if how == "replace":
            parent[path[-1]] = draw(JSON)
        elif how == "drop" and isinstance(parent, dict):
            del parent[path[-1]]
        elif how == "add" and isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(JSON)
        elif how == "nudge" and isinstance(parent[path[-1]], (int, float)) and not isinstance(parent[path[-1]], bool):
            parent[path[-1]] = parent[path[-1]] + draw(st.sampled_from([1, -1, 0.5, 1e-3]))
    return data


def as_bytes(value) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


def spec_inputs():
    from models.presets import PRESETS

    bases = [json.loads(s.to_json()) for s in PRESETS.values()]
    return st.one_of(st.sampled_from(bases).flatmap(mutated).map(as_bytes), JSON.map(as_bytes), st.binary(max_size=64),
                     st.integers(1, 200).map(lambda n: b"[" * n + b"]" * n))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=spec_inputs())
def test_fuzz_check_on_spec_json_ends_in_0_1_or_2_without_a_traceback(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz", numbered=True) / "spec.json"
    path.write_bytes(data)
    code, _ = run("check", path)
    assert code in (0, 1, 2)


# Fields whose change the evidence contradicts without measuring anything: refused before the test images are read.
BOUND = ("n_params", "spec", "spec_sha256", "certified", "final_test_acc_mean", "final_test_acc_std",
         "receptive_field", "macs", "target", "max_params")
BOUND_PER_SEED = ("seed", "final_test_acc", "checkpoint_sha256")


def bound_changes(cert, base) -> list[str]:
    """The evidence-bound fields `cert` changed from `base`."""
    if not isinstance(cert, dict):
        return ["the whole certificate"]
    changed = [k for k in BOUND if _differs(cert.get(k), base.get(k))
               and not (k == "spec" and _same_spec(cert.get(k), base[k]))]
    config = cert.get("config")
    if not isinstance(config, dict) or _differs({k: v for k, v in config.items() if k != "seed"},
                                                {k: v for k, v in base["config"].items() if k != "seed"}):
        changed.append("config")
    seeds, rules = cert.get("seeds"), cert.get("rules")
    if not isinstance(seeds, list) or len(seeds) != len(base["seeds"]):
        return changed + ["seeds"]
    changed += [f"seeds[{i}].{k}" for i, (s, b) in enumerate(zip(seeds, base["seeds"])) for k in BOUND_PER_SEED
                if not isinstance(s, dict) or _differs(s.get(k), b[k])]
    if not isinstance(rules, list) or len(rules) != len(base["rules"]):
        return changed + ["rules"]
    changed += [f"rules[{i}].{k}" for i, (r, b) in enumerate(zip(rules, base["rules"]))
                for k in ("rule", "pass", "figure")
                if not isinstance(r, dict) or (_differs(r.get(k), b[k]) and not (i == 1 and k == "figure"))]
    return changed


def test_fuzz_export_on_certificate_json_refuses_before_any_heavy_work(micro_cert, data_root, tmp_path_factory):
    """Every edit of a real certificate ends in exit 0, 1 or 2 without a traceback, and an edit of a field its
    checkpoints bear out is refused before the test images are read (the measuring stage is replaced by a stub
    that counts its calls and returns too few images to match)."""
    from search.data import Split

    base = json.loads(micro_cert.read_text())
    reads = []

    def fake_load_data(*args, **kwargs):
        reads.append(1)
        images = torch.zeros(10, 28, 28, dtype=torch.uint8)
        return type("Data", (), {"test": Split(images, torch.zeros(10, dtype=torch.long)), "root": Path("/fake"),
                                 "stats": (base["dataset"]["mean"], base["dataset"]["std"]),
                                 "record": lambda self: base["dataset"]})()

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(cert=st.one_of(mutated(base), JSON))
    def one(cert):
        path = tmp_path_factory.mktemp("cfuzz", numbered=True) / "certificate.json"
        path.write_bytes(as_bytes(cert))
        reads.clear()
        code, out = export(path, data_root, "--out", path.parent / "out")
        assert code in (1, 2), out  # the stub's ten images never match the certificate's figures
        changed = bound_changes(cert, base)
        assert not (changed and reads), (changed, out)
        assert not (path.parent / "out").exists(), out

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("search.certificate.load_data", fake_load_data)
        one()


def _same_spec(a, b) -> bool:
    """Specs that are the same network (a field left out that has its default)."""
    from models.spec import NetSpec, SpecError

    try:
        return NetSpec.from_dict(a) == NetSpec.from_dict(b)
    except (SpecError, TypeError):
        return False


def _differs(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return False
    return json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True)

"""Other 28x28 sets under the same rules (Fashion-MNIST from Debian's package, an `idx` set made from MNIST), studies
made before --dataset, and optuna-dashboard reading what budgetnas stores."""

import gzip
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from typer.testing import CliRunner

from cli import app
from search.data import FILES, KNOWN, DataError, load_data

runner = CliRunner()
FASHION = Path(KNOWN["fashion-mnist"].also[0])
needs_fashion = pytest.mark.skipif(not FASHION.is_dir(), reason="Debian's dataset-fashion-mnist is not installed "
                                                                "(.ci/run installs it)")


def run(*args):
    out = runner.invoke(app, [str(a) for a in args])
    return out.exit_code, " ".join(out.output.split())


def write_idx(path: Path, tensor, gz: bool) -> None:
    dims = tensor.dim()
    magic = 0x0800 + dims
    body = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in tensor.shape)
    body += bytes(tensor.to(dtype=__import__("torch").uint8).flatten().tolist())
    (path.with_name(path.name + ".gz").write_bytes(gzip.compress(body, 1)) if gz else path.write_bytes(body))


@pytest.fixture(scope="module")
def inverted(tmp_path_factory, data_root):
    """An IDX set made from MNIST by a transform: every image inverted (white background), 12,000 training digits of 0-4
    (five classes; 2,000 to train on after the 10,000 held out) and 1,000 to test; two files gzipped."""
    folder = tmp_path_factory.mktemp("inverted")
    mnist = load_data(data_root, with_test=True, full_train=True)
    train_keep = (mnist.train.labels < 5).nonzero().flatten()[:12_000]
    test_keep = (mnist.test.labels < 5).nonzero().flatten()[:1_000]
    write_idx(folder / "train-images-idx3-ubyte", 255 - mnist.train.images[train_keep], gz=True)
    write_idx(folder / "train-labels-idx1-ubyte", mnist.train.labels[train_keep], gz=False)
    write_idx(folder / "t10k-images-idx3-ubyte", 255 - mnist.test.images[test_keep], gz=False)
    write_idx(folder / "t10k-labels-idx1-ubyte", mnist.test.labels[test_keep], gz=True)
    return folder


def test_an_idx_set_is_checked_and_its_classes_and_statistics_come_from_it(inverted):
    data = load_data(inverted, dataset="idx", with_test=True)
    assert data.classes == 5 and len(data.train) == 2_000 and len(data.val) == 10_000 and len(data.test) == 1_000
    assert data.mean > 0.8  # inverted digits: mostly white, so not MNIST's 0.1307
    assert set(data.md5) == set(FILES) and all(len(d) == 32 for d in data.md5.values())
    code, out = run("data", "--dataset", "idx", "--data-dir", inverted)
    assert code == 0 and "5 classes" in out and "md5 sums, computed now: t10k-images-idx3-ubyte " in out
    # A known set's name on these files: refused, they are no MNIST.
    with pytest.raises(DataError, match="header says 12,000 items, expected 60,000"):
        load_data(inverted, dataset="mnist")


def test_search_certify_and_report_on_an_idx_set(inverted, tmp_path, data_root):
    common = ["--results-dir", tmp_path, "--data-dir", inverted, "--device", "cpu"]
    code, out = run("search", "--dataset", "idx", "--trials", 2, "--epochs", 1, "--subset", 1_000, "--study", "inv",
                    "--max-params", 6_000, *common)
    assert code == 0, out
    study = optuna.load_study(study_name="inv", storage=f"sqlite:///{tmp_path / 'inv.db'}")
    setup = study.user_attrs["setup"]
    assert setup["dataset"]["name"] == "idx" and setup["dataset"]["classes"] == 5
    assert setup["dataset"]["md5"] == load_data(inverted, dataset="idx").md5
    assert study.user_attrs["target"] is None  # no target for a set of one's own unless given
    specs = [json.loads(t.user_attrs["spec"]) for t in study.get_trials() if "spec" in t.user_attrs]
    assert specs and all(s["num_classes"] == 5 for s in specs)
    # Continuing with another set is refused like any other set-up change.
    code, out = run("search", "--dataset", "mnist", "--trials", 3, "--epochs", 1, "--subset", 1_000, "--study", "inv",
                    "--max-params", 6_000, "--results-dir", tmp_path, "--device", "cpu",
                    "--data-dir", data_root)
    assert code == 2 and "dataset was 'idx', now 'mnist'" in out
    code, out = run("best", "--study", "inv", "--seeds", 1, *common)
    cert = json.loads((tmp_path / "inv" / "best.json").read_text())
    assert cert["dataset"]["name"] == "idx" and cert["dataset"]["md5"] == setup["dataset"]["md5"]
    assert cert["target"] is None and "not judged" in cert["rules"][3]["rule"] and code == 0, out
    code, out = run("report", "--study", "inv", "--results-dir", tmp_path)
    page = (tmp_path / "inv" / "report.html").read_text()
    assert code == 0 and "data idx" in page and "no target" in page


@needs_fashion
def test_fashion_mnist_from_debians_package_end_to_end(tmp_path):
    common = ["--results-dir", tmp_path, "--data-dir", tmp_path / "no-root-here", "--device", "cpu"]
    code, out = run("search", "--dataset", "fashion-mnist", "--trials", 3, "--epochs", 2, "--subset", 2_000,
                    "--study", "fashion", "--target", 85, *common)
    assert code == 0, out
    study = optuna.load_study(study_name="fashion", storage=f"sqlite:///{tmp_path / 'fashion.db'}")
    assert study.user_attrs["setup"]["dataset"]["md5"] == KNOWN["fashion-mnist"].md5
    assert study.user_attrs["setup"]["dataset"]["mean"] == pytest.approx(0.2860, abs=1e-4)
    assert study.user_attrs["target"] == 0.85
    code, out = run("certify", "micro", "--dataset", "fashion-mnist", "--epochs", 1, "--seeds", 1, "--target", 80,
                    *common)
    cert = json.loads((tmp_path / "certified" / "micro" / "certificate.json").read_text())
    assert cert["dataset"]["name"] == "fashion-mnist" and cert["target"] == 0.80 and cert["final_test_acc_mean"] > 0.7
    code, out = run("report", "--study", "fashion", "--results-dir", tmp_path)
    assert code == 0 and "data fashion-mnist" in (tmp_path / "fashion" / "report.html").read_text()


def test_a_study_made_before_datasets_opens_as_mnist(tmp_path, data_root, inverted):
    from search.options import SearchOptions
    from search.storage import SearchError
    from search.study import run_search

    opts = SearchOptions(trials=1, study="old", results_dir=str(tmp_path), epochs=1, subset=500,
                         data_dir=str(data_root), device="cpu", warm_start=False)
    study = run_search(opts, log=lambda line: None).study
    setup = dict(study.user_attrs["setup"])
    setup.pop("dataset"), setup.pop("precision")  # as an older budgetnas wrote it
    study.set_user_attr("setup", setup)
    more = run_search(SearchOptions(**{**opts.__dict__, "trials": 2}), log=lambda line: None)
    assert more.trained == 2
    with pytest.raises(SearchError, match="dataset was 'mnist', now 'idx'"):  # another set: refused as before
        run_search(SearchOptions(**{**opts.__dict__, "trials": 3, "dataset": "idx", "data_dir": str(inverted)}),
                   log=lambda line: None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dashboard_reads(storage_url: str, study_name: str) -> None:
    port = _free_port()
    binary = Path(sys.executable).parent / "optuna-dashboard"
    proc = subprocess.Popen([str(binary), storage_url, "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                studies = json.load(urllib.request.urlopen(f"{base}/api/studies", timeout=2))
                break
            except OSError:
                time.sleep(0.2)
        else:
            raise AssertionError(f"optuna-dashboard did not answer: {proc.stdout.read() if proc.poll() else ''}")
        found = [s for s in studies["study_summaries"] if s["study_name"] == study_name]
        assert len(found) == 1
        detail = json.load(urllib.request.urlopen(f"{base}/api/studies/{found[0]['study_id']}", timeout=10))
        stored = optuna.load_study(study_name=study_name, storage=storage_url).get_trials()
        assert len(detail["trials"]) == len(stored)
        for shown, trial in zip(detail["trials"], stored):
            attrs = {a["key"]: a["value"] for a in shown["user_attrs"]}
            assert attrs.get("outcome") == trial.user_attrs.get("outcome")  # queued presets have none yet
            if trial.values:
                assert [float(v) for v in shown["values"]] == pytest.approx(trial.values)
            if "spec" in trial.user_attrs:  # readable there: the spec whole, the curve as text
                assert json.loads(attrs["spec"]) == json.loads(trial.user_attrs["spec"])
                assert int(attrs["n_params"]) == trial.user_attrs["n_params"]
            if trial.user_attrs.get("history"):
                assert [float(v) for v in attrs["val_acc_curve"].split()] == pytest.approx(
                    [e["val_acc"] * 100 for e in trial.user_attrs["history"]], abs=0.006)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_optuna_dashboard_reads_a_budgetnas_study(tmp_path, data_root):
    from search.options import SearchOptions
    from search.study import run_search

    opts = SearchOptions(trials=2, study="dash", results_dir=str(tmp_path), epochs=2, subset=1_000,
                         data_dir=str(data_root), device="cpu", objective="pareto", max_params=8_000)
    run_search(opts, log=lambda line: None)
    _dashboard_reads(opts.storage_url, "dash")


@pytest.mark.postgres
@pytest.mark.skipif(not os.environ.get("BUDGETNAS_TEST_POSTGRES"), reason="BUDGETNAS_TEST_POSTGRES is not set")
def test_optuna_dashboard_reads_a_budgetnas_study_in_postgresql(tmp_path, data_root):
    import uuid

    from search.options import SearchOptions
    from search.study import run_search

    name = f"dash-{uuid.uuid4().hex[:8]}"
    opts = SearchOptions(trials=1, study=name, storage=os.environ["BUDGETNAS_TEST_POSTGRES"],
                         results_dir=str(tmp_path), epochs=1, subset=500, data_dir=str(data_root), device="cpu")
    run_search(opts, log=lambda line: None)
    _dashboard_reads(opts.storage_url, name)

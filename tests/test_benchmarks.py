"""The fidelity benchmark keeps every trained curve, resumes a stopped run without training a net twice, and reads the
full-length curves of stored searches."""

import subprocess
import sys

import pandas as pd

from conftest import ROOT


def run_fidelity(data_root, curves, nets: int) -> str:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fidelity.py"), "--nets", str(nets),
                          "--epochs", "2", "--subset", "256", "--val", "256", "--device", "cpu",
                          "--data-dir", str(data_root), "--curves", str(curves)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_fidelity_resumes_from_its_curves_file(data_root, tmp_path):
    curves = tmp_path / "curves.csv"
    first = run_fidelity(data_root, curves, nets=3)
    assert sum(line.startswith("net ") for line in first.splitlines()) == 3
    assert "3 of 3 nets trained to epoch 2 on 256 images" in first
    assert "Spearman rank correlation" in first
    stored = pd.read_csv(curves)
    assert list(stored.net) == [0, 1, 2] and set(stored.status) == {"completed"}
    assert stored[["e1", "e2"]].notna().all().all()

    again = run_fidelity(data_root, curves, nets=4)  # the three stored nets are read back, one more is trained
    assert [line.split(":")[0] for line in again.splitlines() if line.startswith("net ")] == ["net 3"]
    assert "4 of 4 nets trained" in again
    assert list(pd.read_csv(curves).net) == [0, 1, 2, 3]
    assert list(pd.read_csv(curves).spec[:3]) == list(stored.spec)


def test_fidelity_reads_the_full_length_curves_of_stored_searches(data_root, tmp_path):
    from search.options import SearchOptions
    from search.record import records
    from search.study import run_search

    opts = SearchOptions(trials=3, study="stored", results_dir=str(tmp_path), epochs=2, subset=500, pruner="none",
                         data_dir=str(data_root), device="cpu")
    full = [r for r in records(run_search(opts, log=lambda _: None).study) if r.epochs_trained == 2]
    assert len(full) == 3  # no pruner: the three trained trials (the first three presets) ran both epochs
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fidelity.py"), "--studies", "stored",
                          "--results-dir", str(tmp_path), "--epochs", "2"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"{len(full)} distinct trials of stored that trained all 2 epochs")
    # baseline (19,674 parameters), small (7,860), tiny (5,106)
    assert "Spearman rank correlation" in out.stdout and "nets: 2 under 8,000 parameters, 1 at or over" in out.stdout

"""The fidelity benchmark keeps every trained curve, resumes a stopped run without training a net twice, and reads the
full-length curves of stored searches."""

import subprocess
import sys

import pandas as pd
import torch

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
    assert len(full) == 3  # no pruner: the three trained trials (a preset, then the search's own) ran both epochs
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fidelity.py"), "--studies", "stored",
                          "--results-dir", str(tmp_path), "--epochs", "2"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"{len(full)} distinct trials of stored that trained all 2 epochs")
    under = sum(r.n_params < 8_000 for r in full)  # baseline (19,674 parameters) is one of them: at least 1 over
    assert "Spearman rank correlation" in out.stdout
    assert f"nets: {under} under 8,000 parameters, {3 - under} at or over" in out.stdout


def run_recipe(data_root, runs, limit: int, *extra: str, returncode: int = 0) -> str:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "recipe.py"), "--runs", str(runs), "--epochs",
                          "1", "--subset", "256", "--val", "256", "--limit", str(limit), "--device", "cpu",
                          "--data-dir", str(data_root), *extra], capture_output=True, text=True, timeout=600)
    assert out.returncode == returncode, out.stderr
    return out.stdout if returncode == 0 else out.stderr


def test_recipe_benchmark_screens_only_the_factors_named_and_trains_fp32_when_asked(data_root, tmp_path):
    runs = tmp_path / "runs.csv"
    run_recipe(data_root, runs, 4, "--factors", "precision")
    stored = pd.read_csv(runs)
    # The three defaults, then the first run of the named factor, skipping every factor before it in the plan.
    assert list(zip(stored.layout, stored.recipe)) == [("p3702", "default"), ("p2510", "default"),
                                                         ("micro", "default"), ("p3702", "precision=fp32")]
    assert stored.precision.iloc[3] == "fp32"
    from search.engine.runtime import use_bf16

    if use_bf16(torch.device("cpu")):  # where "auto" is bfloat16, the default runs say so and the factor differs
        assert set(stored.precision.iloc[:3]) == {"bf16"}
    refused = run_recipe(data_root, runs, 1, "--factors", "precision,colour", returncode=2)
    assert "--factors precision,colour: colour is not a factor" in refused and "Traceback" not in refused


def test_the_precision_factor_reaches_fit(monkeypatch):
    from types import SimpleNamespace

    import benchmarks.recipe as recipe

    seen = []

    def fake_fit(model, train, val, cfg, **kwargs):
        seen.append(kwargs.get("precision"))
        return SimpleNamespace(epochs=[SimpleNamespace(val_acc=0.5)], status="completed", shards=1, precision="x")

    monkeypatch.setattr(recipe, "fit", fake_fit)
    recipe.train_run("p3702", {"precision": "fp32"}, 0, 1, None, torch.device("cpu"))
    recipe.train_run("p3702", {}, 0, 1, None, torch.device("cpu"))
    assert seen == ["fp32", "auto"]


def test_recipe_benchmark_screens_in_order_and_resumes_without_training_a_run_twice(data_root, tmp_path):
    from benchmarks.recipe import FACTORS, LAYOUTS, planned_runs, recipe_name

    runs = tmp_path / "runs.csv"
    first = run_recipe(data_root, runs, limit=4)
    stored = pd.read_csv(runs)
    # The default recipe on each of the three layouts first, then the first variant on the 3,702-parameter one.
    assert list(zip(stored.layout, stored.recipe)) == [("p3702", "default"), ("p2510", "default"),
                                                         ("micro", "default"), ("p3702", "lr=0.05")]
    assert list(stored.n_params) == [3_702, 2_510, 4_582, 3_702] and set(stored.status) == {"completed"}
    assert stored.e1.between(0, 1).all() and (stored.final_val_acc == stored.e1).all()
    assert "4 runs trained" in first and "vs_default" in first
    again = run_recipe(data_root, runs, limit=1)
    resumed = pd.read_csv(runs)
    assert list(resumed.recipe[:4]) == list(stored.recipe) and list(resumed.wall_s[:4]) == list(stored.wall_s)
    assert resumed.recipe[4] == "lr=0.2" and "1 runs trained" in again and "5 stored" in again
    # Once a layout's screening is complete, its confirmation runs the default and each winner with more seeds.
    screened = [{"layout": layout, "recipe": recipe_name(changes), "seed": 0,
                 "final_val_acc": 0.99 if changes == {"lr": 0.2} else 0.98}
                for layout, changes, _ in planned_runs(pd.DataFrame(), seeds=3)]
    plan = planned_runs(pd.DataFrame(screened), seeds=3)
    confirm = [(layout, recipe_name(changes), seed) for layout, changes, seed in plan[len(screened):]]
    assert len(screened) == len(LAYOUTS) * (1 + sum(map(len, FACTORS.values())))
    assert confirm[:6] == [("p3702", "default", 0), ("p3702", "default", 1), ("p3702", "default", 2),
                           ("p3702", "lr=0.2", 0), ("p3702", "lr=0.2", 1), ("p3702", "lr=0.2", 2)]


def test_a_benchmark_pointed_at_a_missing_root_exits_2_with_one_line(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")  # where no download can go: none is tried, offline or not
    missing = tmp_path / "a-file" / "root"
    for script in ("accuracy.py", "width_cost.py"):
        out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--data-dir", str(missing),
                              "--device", "cpu"], capture_output=True, text=True, timeout=300)
        assert out.returncode == 2 and out.stdout == "", (script, out.stderr)
        assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
        assert out.stderr.startswith(f"error: MNIST not found: looked in {missing} (--data-dir)")
        assert "download not tried" in out.stderr and "Point --data-dir or $BUDGETNAS_DATA" in out.stderr

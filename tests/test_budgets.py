"""The search's budgets beside --max-params: MACs, peak activation memory and int8 model size, refused before
training, repaired, stored on every trial, and a pareto search trading accuracy against one of them."""

import time

import pandas as pd
import pytest
from typer.testing import CliRunner

from cli import app
from models.presets import PRESETS
from search.budgets import Budget, figures
from search.errors import SearchError
from search.objective import repair_spec
from search.options import SearchOptions
from search.record import TrialRecord
from search.report import collect, trial_rows
from search.study import run_search, trials_csv_path

runner = CliRunner()
UNMEETABLE = "the smallest network of the search space with a receptive field of at least 12 px (--min-rf) has"


def quiet(_line: str) -> None:
    pass


def flat(text: str) -> str:
    return " ".join(text.replace("│", " ").split())  # typer draws a box round errors


def test_micro_figures_and_the_reason_naming_figure_and_bound():
    # micro's padded 8-channel convs read and write 28x28x8 maps: 2 x 6,272 bytes (models/resources.py).
    assert figures(PRESETS["micro"])["activation-bytes"] == 12_544
    budget = Budget({"params": 20_000, "macs": 1_000_000, "activation-bytes": 2_500, "model-bytes": 4_500})
    assert budget.over(PRESETS["micro"]) == [
        "MACs 1,132,880 per image, at or over --max-macs 1,000,000",
        "peak activation memory 12,544 bytes, at or over --max-activation-bytes 2,500",
        "int8 model size 5,060 bytes, at or over --max-model-bytes 4,500"]


@pytest.mark.parametrize("extra, message", [
    (["--max-activation-bytes", "100"], f"--max-activation-bytes=100: {UNMEETABLE} peak activation memory 1,460 "
                                        "bytes; give a budget above 1,460"),
    (["--max-model-bytes", "238"], f"--max-model-bytes=238: {UNMEETABLE} int8 model size 238 bytes"),
    (["--max-macs", "1000"], f"--max-macs=1,000: {UNMEETABLE} MACs 16,868 per image"),
    (["--max-macs", "0"], "Invalid value for '--max-macs': 0 must be from 1 to 1,000,000,000,000"),
    (["--objective", "pareto", "--size-metric", "macs"], "--size-metric='macs': needs --max-macs"),
    (["--size-metric", "model-bytes", "--max-model-bytes", "4500"],
     "--size-metric='model-bytes': applies to --objective pareto only"),
])
def test_an_unusable_or_unmeetable_bound_is_refused_at_once(tmp_path, data_root, extra, message):
    results = tmp_path / "results"
    start = time.perf_counter()
    out = runner.invoke(app, ["search", "--results-dir", str(results), "--data-dir", str(data_root), *extra])
    assert out.exit_code == 2, out.output
    assert message in flat(out.output), out.output
    assert "training" not in out.output and "Traceback" not in out.output
    assert time.perf_counter() - start < 5  # seconds: the data's checks and one walk of the narrowest layouts
    assert not results.exists() or not any(results.rglob("*")), "something was written"


def test_repair_under_an_activation_bound_fits_every_bound():
    budget = Budget({"params": 20_000, "activation-bytes": 2_500, "model-bytes": 4_500})
    repaired = repair_spec(PRESETS["micro"], budget)
    assert repaired is not None and budget.fits(repaired)
    assert figures(repaired)["activation-bytes"] < 2_500 and figures(repaired)["model-bytes"] < 4_500
    assert repaired.blocks[0].convs[0].out_channels <= 2  # 3 channels at 26x26 already hold 784 + 2,028 bytes


def test_a_mu_nas_bounded_pareto_search_trades_accuracy_for_activation_bytes(tmp_path, data_root):
    opts = SearchOptions(trials=3, study="mu", results_dir=str(tmp_path), epochs=1, subset=2_000,
                         objective="pareto", size_metric="activation-bytes", max_activation_bytes=2_500,
                         max_model_bytes=4_500, data_dir=str(data_root), device="cpu", seed=0)
    result = run_search(opts, log=quiet)
    recs = [TrialRecord(t) for t in result.study.get_trials()]
    trained = [r for r in recs if r.is_trained]
    assert len(trained) == result.trained == 3
    for r in recs:  # every stored candidate has all four figures, the spec's own
        if r.has_spec:
            assert (r.n_params, r.macs, r.activation_bytes, r.model_bytes) == tuple(figures(r.spec).values())
    for r in trained:  # nothing at or over a bound trained
        assert r.activation_bytes < 2_500 and r.model_bytes < 4_500 and r.n_params < 20_000
    for r in (r for r in trained if r.values):  # the second objective is the activation memory
        assert r.values[1] == r.activation_bytes
    rejected = [r for r in recs if r.outcome.value == "rejected" and "--max-activation-bytes 2,500" in r.reason]
    assert rejected and all(r.activation_bytes >= 2_500 and r.epochs_trained == 0 for r in rejected)
    assert "micro" in {r.preset for r in rejected}  # 12,544 bytes: the presets are over, stored untrained
    frame = pd.read_csv(trials_csv_path(str(tmp_path), "mu"))
    assert {"n_params", "macs", "activation_bytes", "model_bytes"} <= set(frame.columns)
    assert frame["activation_bytes"].notna().sum() == sum(r.has_spec for r in recs)

    rows = trial_rows(collect(result.study).frame)  # the report's trials table
    assert [(r["peak activation (int8 bytes)"], r["int8 model (bytes)"]) for r in rows] == [
        (f"{r.activation_bytes:,}", f"{r.model_bytes:,}") if r.has_spec else ("", "") for r in recs]

    other = SearchOptions(**{**opts.__dict__, "size_metric": "model-bytes"})
    with pytest.raises(SearchError, match="size_metric was 'activation-bytes', now 'model-bytes'"):
        run_search(other, log=quiet)


def test_a_study_made_before_the_budgets_is_continued_only_without_them(tmp_path):
    import optuna

    from search.setup import check_setup

    storage = f"sqlite:///{tmp_path / 'old.db'}"
    optuna.create_study(study_name="old", storage=storage).set_user_attr("setup", {"max_params": 20_000, "epochs": 2})
    now = SearchOptions(results_dir=str(tmp_path), epochs=2).setup()
    check_setup(storage, "old", {k: now[k] for k in ("max_params", "epochs", "max_macs", "size_metric")})  # as it was
    with pytest.raises(SearchError, match="max_macs was None, now 1000000"):
        check_setup(storage, "old", {"max_params": 20_000, "epochs": 2, "max_macs": 1_000_000})

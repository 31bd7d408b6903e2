"""The report's figures, asserted on their data (plotly figure objects), not on pixels: every trained trial inside
the axes, the rejected candidates drawn, percent everywhere, importances only from enough completed trials, the
layout's labels clear of its boxes, and no Optuna chatter on stderr."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution

from search.record import TRAINED
from search.report_data import collect, with_last_accuracy
from search.report_figures import ERROR_FLOOR_PCT, fig_certification, fig_layout, fig_params_vs_accuracy
from search.report_optuna import (MIN_COMPLETED_FOR_IMPORTANCES, fig_history, fig_parallel, linear_dimension,
                                  optuna_figures)
from test_best_report import tiny_study  # noqa: F401  (the fixture: a budget of 6,000, two trained, the rest rejected)

ROOT = Path(__file__).resolve().parent.parent


def inside(value: float, axis_range) -> bool:
    return min(axis_range) <= value <= max(axis_range)


def traces(fig, name_start: str) -> list:
    """The figure's traces whose legend name starts so (plotly objects: to_dict() packs arrays as base64)."""
    return [t for t in fig.data if (t.name or "").startswith(name_start)]


def spread_accuracies(data, accuracies):
    """The study's data with its trained trials' accuracies replaced: the quick study's spread (2 of its 6 trials fell
    off the old chart) on a real frame."""
    frame = data.frame.copy()
    rows = frame.index[frame["outcome"].isin([o.value for o in TRAINED])]
    frame.loc[rows, "val_acc"] = accuracies[:len(rows)]
    data.frame = frame
    return data


@pytest.mark.parametrize("accuracies", [None, [0.9962, 0.10], [1.0, 0.5]], ids=["as trained", "99.6 and 10",
                                                                               "no error and 50"])
def test_every_trained_trial_lies_inside_the_axes_and_the_rejected_are_drawn(tiny_study, accuracies):
    _, study = tiny_study
    data = collect(study) if accuracies is None else spread_accuracies(collect(study), accuracies)
    fig = fig_params_vs_accuracy(data)
    layout = fig.layout
    trained = data.frame[data.frame["outcome"].isin([o.value for o in TRAINED])]
    assert len(trained) == 2
    drawn = [(x, y) for t in traces(fig, "completed") for x, y in zip(t.x, t.y)]
    for n_params, acc in zip(trained["n_params"], trained["val_acc"]):
        error = max(100 - acc * 100, ERROR_FLOOR_PCT)
        assert (n_params, pytest.approx(error)) in drawn
        assert inside(math.log10(error), layout.yaxis.range), (acc, layout.yaxis.range)
        assert inside(math.log10(n_params), layout.xaxis.range)
    # Rejected: never trained, drawn in their own row at their parameter counts, counted in the legend.
    rejected = data.frame[data.frame["outcome"] == "rejected"]
    assert len(rejected) == data.counts["rejected"] >= 2  # the presets over 6,000
    [strip] = traces(fig, f"rejected, never trained ({len(rejected)})")
    assert sorted(strip.x) == sorted(rejected["n_params"]) and strip.yaxis == "y2"
    assert all(inside(math.log10(x), layout.xaxis2.range) for x in strip.x)
    # The budget and target lines, labelled, their labels inside the axes (log axes: log10 coordinates).
    labels = {a.text.strip(): a for a in layout.annotations}
    assert inside(labels["budget: fewer than 6,000 parameters"].x, layout.xaxis.range)
    assert inside(labels["target 99.4%"].y, layout.yaxis.range)
    assert labels["target 99.4%"].y == pytest.approx(math.log10(0.6))
    assert [s.x0 for s in layout.shapes if s.line.color == "red"] == [6_000, 6_000]  # through both rows


def test_a_study_of_another_size_metric_is_drawn_against_that_metric(tiny_study):
    from search.report import _header

    _, study = tiny_study
    setup = study.user_attrs["setup"]  # the fixture's study, shared: its set-up is put back below
    study.set_user_attr("setup", {**setup, "size_metric": "activation-bytes", "max_activation_bytes": 40_000,
                                  "max_macs": 5_000_000})
    try:
        data = collect(study)
    finally:
        study.set_user_attr("setup", setup)
    assert (data.size_metric, data.size_bound) == ("activation-bytes", 40_000)
    assert data.other_bounds == {"activation-bytes": 40_000, "macs": 5_000_000}
    trained = data.frame[data.frame["outcome"] == "completed"]
    first = trained.iloc[0]
    data.front_certified = {"seeds": 3, "entries": [{"trial": int(first["number"]), "n_params": int(first["n_params"]),
                                                     "activation_bytes": int(first["activation_bytes"]),
                                                     "test_acc_mean": 0.9958, "test_acc_std": 0.0007}]}
    fig = fig_params_vs_accuracy(data)
    drawn = sorted(x for t in traces(fig, "completed") for x in t.x)
    assert drawn == sorted(trained["activation_bytes"]) and drawn != sorted(trained["n_params"])
    [certified] = traces(fig, "certified test accuracy")  # at front.json's figure of the metric
    assert list(certified.x) == [first["activation_bytes"]]
    assert fig.layout.xaxis2.title.text == "peak activation memory, int8 bytes (log scale)"
    labels = {a.text.strip(): a for a in fig.layout.annotations}
    assert inside(labels["budget: fewer than 40,000 bytes"].x, fig.layout.xaxis.range)
    [strip] = traces(fig, "rejected, never trained")
    assert sorted(strip.x) == sorted(data.frame[data.frame["outcome"] == "rejected"]["activation_bytes"])
    assert "under MACs 5,000,000 per image, peak activation memory 40,000 bytes" in _header(data)


def test_best_reads_the_size_metric_from_the_study_set_up():
    from optuna.trial import create_trial

    from search.choose import front_to_certify, pick_winner

    def trial(number, acc, params, activation_bytes):
        made = create_trial(values=[acc, float(activation_bytes)], user_attrs={
            "n_params": params, "activation_bytes": activation_bytes, "outcome": "completed", "constraint": 0})
        made.number = number
        return made

    # Trial 0 has fewer parameters, trial 1 less activation memory; both within the seed spread of each other.
    for metric, winner in (("params", 0), ("activation-bytes", 1)):
        study = optuna.create_study(directions=["maximize", "minimize"])
        study.add_trials([trial(0, 0.9850, 2_000, 2_400), trial(1, 0.9855, 3_000, 1_500)])
        study.set_user_attr("setup", {"size_metric": metric})
        assert pick_winner(study).number == winner, metric
        assert pick_winner(study, target=0.985).number == winner, metric
        assert [r.number for r in front_to_certify(study, 0.98)] == ([0, 1] if metric == "params" else [1])


def test_the_certified_front_is_drawn_inside_the_axes_in_percent(tiny_study):
    _, study = tiny_study
    data = collect(study)
    trial = data.frame[data.frame["outcome"] == "completed"].iloc[0]
    data.front_certified = {"seeds": 3, "entries": [{"trial": int(trial["number"]), "n_params": int(trial["n_params"]),
                                                     "test_acc_mean": 0.9958, "test_acc_std": 0.0007}]}
    fig = fig_params_vs_accuracy(data)
    [certified] = traces(fig, "certified test accuracy (3 seeds)")
    assert list(certified.y) == pytest.approx([0.42]) and list(certified.error_y.array) == pytest.approx([0.07])
    assert certified.customdata[0][1] == pytest.approx(99.58)
    assert inside(math.log10(0.42), fig.layout.yaxis.range)


def test_a_trained_trial_with_no_accuracy_is_counted_on_the_figure(tiny_study):
    _, study = tiny_study
    data = collect(study)
    first = data.frame.index[data.frame["outcome"] == "completed"][0]
    data.frame.loc[first, ["outcome", "val_acc"]] = ["failed", np.nan]
    texts = [a.text for a in fig_params_vs_accuracy(data).layout.annotations]
    assert "1 trained trial(s) not drawn: no validation accuracy measured (still training, or failed in the first " \
           "epoch)" in texts


def test_a_trial_pruned_without_an_optuna_value_is_drawn_at_its_last_epoch(tiny_study):
    """A pareto search's pruned trial has no value or intermediate value, only its history: that is what is drawn."""
    _, study = tiny_study
    frame = collect(study).frame
    first = frame.index[frame["outcome"] == "completed"][0]
    frame.loc[first, ["outcome", "val_acc"]] = ["pruned", np.nan]
    filled = with_last_accuracy(frame)
    last_epoch = json.loads(frame.loc[first, "history"])[-1]["val_acc"]
    assert filled.loc[first, "val_acc"] == last_epoch > 0.1
    assert filled["val_acc"].isna().sum() == (frame["outcome"] == "rejected").sum()  # only the never trained


def test_accuracy_is_in_percent_in_every_figure(tiny_study):
    _, study = tiny_study
    data = collect(study)
    completed = data.frame[data.frame["outcome"] == "completed"].sort_values("number")
    percent = list(completed["val_acc"] * 100)
    for fig in (fig_params_vs_accuracy(data), fig_history(data)):
        [points] = traces(fig, "completed")
        hover_accuracy = [float(np.atleast_1d(row)[-1]) for row in points.customdata]
        assert hover_accuracy == pytest.approx(percent) and list(points.y) == pytest.approx([100 - p for p in percent])
        assert all(text.endswith("%)") for text in fig.layout.yaxis.ticktext)
    [parcoords] = fig_parallel(data).data
    assert parcoords.dimensions[-1].label == "accuracy (%)"
    assert list(parcoords.dimensions[-1].values) == pytest.approx(percent)


def test_parallel_coordinates_keep_to_a_readable_few_axes_without_repeated_ticks(tiny_study):
    _, study = tiny_study
    [parcoords] = fig_parallel(collect(study)).data
    labels = [d.label for d in parcoords.dimensions]
    assert len(labels) == 9 and max(map(len, labels)) <= 20
    for dim in parcoords.dimensions:  # every axis's ticks chosen here: plotly's own repeat under a fixed format
        assert dim.ticktext and len(set(dim.ticktext)) == len(dim.ticktext) == len(dim.tickvals), dim
    # Label smoothing drawn from 0.03 to 0.05 printed 0.03, 0.03, 0.04, 0.04, 0.05 with two decimals.
    assert linear_dimension("smoothing", [0.03, 0.05, 0.041])["ticktext"] == ["0.030", "0.035", "0.040", "0.045",
                                                                                "0.050"]
    assert linear_dimension("receptive field (px)", [12, 12])["ticktext"] == ["12"]


def synthetic_study(n_completed: int) -> optuna.Study:
    """An in-memory study of n completed trials over two hyperparameters, accuracy rising with the learning rate."""
    study = optuna.create_study(direction="maximize")
    rng = np.random.default_rng(0)
    distributions = {"lr": FloatDistribution(1e-3, 1.0, log=True), "head": CategoricalDistribution(["a", "b"])}
    for _ in range(n_completed):
        lr = float(10 ** rng.uniform(-3, 0))
        study.add_trial(optuna.trial.create_trial(params={"lr": lr, "head": str(rng.choice(["a", "b"]))},
                                                  distributions=distributions, value=0.9 + lr / 20))
    return study


def test_importances_need_enough_completed_trials_and_are_in_percent(tiny_study):
    _, study = tiny_study
    data = collect(study)
    notes = dict(optuna_figures(study, data))
    assert notes["Hyperparameter importances"].startswith(
        f"needs at least {MIN_COMPLETED_FOR_IMPORTANCES} completed trials")
    assert notes["Hyperparameter importances"].endswith("this study has 2")
    below = dict(optuna_figures(synthetic_study(MIN_COMPLETED_FOR_IMPORTANCES - 1), data))
    assert isinstance(below["Hyperparameter importances"], str)
    enough = dict(optuna_figures(synthetic_study(MIN_COMPLETED_FOR_IMPORTANCES), data))
    [bars] = enough["Hyperparameter importances"].data
    assert sum(bars.x) == pytest.approx(100) and all(t.endswith("%") for t in bars.text)
    # The evaluator ranks for a lower target: given the accuracy negated, the learning rate (what the accuracy
    # follows) comes first.
    assert bars.y[list(bars.x).index(max(bars.x))] == "lr"


def test_the_layout_s_labels_stand_clear_of_its_boxes(tiny_study):
    _, study = tiny_study
    layout = fig_layout(collect(study)).layout
    lowest_box = min(s.y0 for s in layout.shapes)
    labels = layout.annotations
    assert len(labels) == len(layout.shapes) and all(a.font.size >= 12 for a in labels)
    assert all(a.y < lowest_box and a.yanchor == "top" for a in labels)
    assert inside(min(a.y for a in labels) - 5, layout.yaxis.range)  # two lines of text: about 5 units
    # Neighbours alternate between two rows, so labels in one row are two boxes apart.
    assert labels[0].y != labels[1].y and labels[0].y == labels[2].y


def test_the_certification_figure_fits_its_curves():
    epochs = [{"epoch": e, "train_acc": 0.93 + e / 100, "test_acc": 0.97 + e / 400, "train_loss": 1.2 - e / 10,
               "test_loss": 0.3 - e / 40} for e in range(1, 5)]
    cert = {"trial": 3, "target": 0.994, "seeds": [{"seed": 0, "epochs": epochs}]}
    layout = fig_certification(cert).layout
    accuracies = [e[k] * 100 for e in epochs for k in ("train_acc", "test_acc")] + [99.4]
    assert all(inside(a, layout.yaxis.range) for a in accuracies)
    assert layout.yaxis.range[0] == 93.0  # whole percents, half a point under the lowest (94%)
    losses = [e[k] for e in epochs for k in ("train_loss", "test_loss")]
    assert all(inside(v, layout.yaxis2.range) for v in losses) and layout.yaxis2.tickformat == ".2f"
    assert layout.yaxis2.tick0 == 0 and layout.yaxis2.dtick == 0.25  # 0 to 1.21 in five steps or fewer


def test_report_prints_no_optuna_study_creation_on_stderr(tiny_study):
    results, _ = tiny_study
    run = subprocess.run([sys.executable, "cli.py", "report", "--study", "tiny", "--results-dir", str(results)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "report: " in run.stdout and "(2 trained, " in run.stdout
    assert "created in memory" not in run.stderr and run.stderr.strip() == "", run.stderr
    page = (results / "tiny" / "report.html").read_text()
    assert 'id="importances"><h2>Hyperparameter importances</h2><p class="note">needs at least 11' in page


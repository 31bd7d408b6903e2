"""The report's figures of the search as Optuna sees it: the optimisation history, parallel coordinates,
hyperparameter importances and the timeline. The first two are drawn here from `ReportData`, in percent and on the
report's error axis (Optuna's own draw fractions, and its parallel coordinates put every conditional width of the
space side by side, unreadable at the page's width); importances and the timeline are Optuna's."""

from __future__ import annotations

import copy
import json
import math
import warnings

import numpy as np
import optuna
import pandas as pd
import plotly.graph_objects as go
from optuna.distributions import IntDistribution
from optuna.trial import FrozenTrial, TrialState

from search.record import Outcome
from search.report_data import ReportData
from search.report_figures import PARAM_TICKS, FigureFailed, error_axis, error_pct, trained_points

# Importances are drawn from this many completed trials on. Optuna's evaluator (PED-ANOVA) compares the top 10% of
# the completed trials (ceil(0.1 n)) with the rest: below 11 the top is a single trial, and the "importances" only
# say how far that one trial's values sit from the others'. 11 is the first count with two trials at the top.
MIN_COMPLETED_FOR_IMPORTANCES = 11


def fig_history(data: ReportData) -> go.Figure:
    """Each trained trial's validation accuracy in the order the trials ran, and the best completed one so far."""
    trained = trained_points(data.frame).sort_values("number")
    fig = go.Figure()
    for outcome, symbol in ((Outcome.COMPLETED, "circle"), (Outcome.PRUNED, "x"), (Outcome.FAILED, "square-open")):
        part = trained[trained["outcome"] == outcome]
        if len(part):
            fig.add_trace(go.Scatter(x=part["number"], y=error_pct(part["val_acc"]), mode="markers",
                                     name=outcome.value + (" (accuracy when stopped)" if outcome == Outcome.PRUNED
                                                           else ""),
                                     marker={"symbol": symbol, "size": 9}, customdata=part["val_acc"] * 100,
                                     hovertemplate="trial %{x}: %{customdata:.2f}%<extra></extra>"))
    completed = trained[trained["outcome"] == Outcome.COMPLETED]
    if len(completed):
        best = completed["val_acc"].cummax()
        fig.add_trace(go.Scatter(x=completed["number"], y=error_pct(best), mode="lines", name="best completed so far",
                                 line={"shape": "hv"}, customdata=best * 100,
                                 hovertemplate="after trial %{x}: best %{customdata:.2f}%<extra></extra>"))
    fig.update_layout(xaxis={"title": "trial", "tickformat": "d"}, yaxis=error_axis(error_pct(trained["val_acc"])))
    return fig


def _log_dimension(label: str, values: pd.Series, ticks, text) -> dict:
    """A log axis (log10 values) with the given ticks inside its range; the extremes too where fewer than two are."""
    low, high = math.log10(values.min()), math.log10(values.max())
    shown = [t for t in ticks if low - 1e-9 <= math.log10(t) <= high + 1e-9]
    if len(shown) < 2:
        shown = sorted({*shown, values.min(), values.max()})
    return {"label": label, "values": np.log10(values.astype(float)), "tickvals": [math.log10(t) for t in shown],
            "ticktext": [text(t) for t in shown], "range": [low, high] if high > low else [low - 0.1, high + 0.1]}


def linear_dimension(label: str, values) -> dict:
    """Ticks 1, 2 or 5 times a power of ten apart (at most six), printed with the digits that step needs: plotly's
    own ticks under a fixed format print 0.03, 0.03, 0.04 for a range of 0.03 to 0.05."""
    values = np.asarray(values, dtype=float)
    low, high = float(values.min()), float(values.max())
    if high == low:  # one value: one tick, at it
        return {"label": label, "values": values, "tickvals": [low], "ticktext": [f"{low:g}"]}
    span = high - low
    step = next(m * 10 ** e for e in range(math.floor(math.log10(span / 6)), 99) for m in (1, 2, 5)
                if span / (m * 10 ** e) <= 5)
    digits = max(0, -math.floor(math.log10(step) + 1e-9))
    ticks = np.arange(math.ceil(low / step - 1e-9), math.floor(high / step + 1e-9) + 1) * step
    return {"label": label, "values": values, "tickvals": list(ticks), "ticktext": [f"{t:.{digits}f}" for t in ticks],
            "tickformat": f".{digits}f"}


def _category_dimension(label: str, values: pd.Series) -> dict:
    """One tick per value present, in order (batch sizes by size, names alphabetically), evenly spaced."""
    names = sorted(values.unique())
    return {"label": label, "values": values.map(names.index), "tickvals": list(range(len(names))),
            "ticktext": [str(n) for n in names], "range": [-0.2, len(names) - 0.8] if len(names) > 1 else [-1, 1]}


def fig_parallel(data: ReportData) -> go.Figure:
    """The completed trials' size and training recipe, one line each, coloured by validation accuracy (%): the
    recipe's choices and the parameter count, not each layer's width (the count sums those up), so that every axis
    keeps room for its labels."""
    done = data.frame[(data.frame["outcome"] == Outcome.COMPLETED) & data.frame["val_acc"].notna()]
    config = pd.DataFrame([json.loads(c) for c in done["config"]])
    accuracy = done["val_acc"].to_numpy() * 100
    dims = [_log_dimension("parameters", done["n_params"], PARAM_TICKS, lambda t: f"{t:,}"),
            linear_dimension("receptive field (px)", done["receptive_field"]),
            _category_dimension("optimizer", config["optimizer"]),
            _log_dimension("learning rate", config["lr"], (1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1),
                           lambda t: f"{t:g}"),
            _category_dimension("batch size", config["batch_size"]),
            _category_dimension("schedule", config["schedule"]),
            linear_dimension("augmentation", config["augment"]),
            linear_dimension("smoothing", config["label_smoothing"]),
            linear_dimension("accuracy (%)", accuracy)]
    # No colour bar: the last axis is the accuracy the colours stand for.
    fig = go.Figure(go.Parcoords(dimensions=dims, labelfont={"size": 13}, tickfont={"size": 11}, labelangle=-10,
                                 line={"color": accuracy, "colorscale": "Viridis"}))
    fig.update_layout(margin={"l": 70, "r": 70, "t": 70, "b": 30})
    return fig


def _importances(study: optuna.Study) -> go.Figure:
    """Optuna's importances (for a higher accuracy: its evaluator ranks for a lower target), in percent of the
    total, largest on top."""
    from optuna import visualization as vis

    fig = vis.plot_param_importances(study, target=lambda t: -t.values[0], target_name="validation accuracy")
    for bar in fig.data:
        share = np.asarray(bar.x, dtype=float) * 100
        bar.update(x=share, text=[f"{s:.0f}%" if s >= 1 else "<1%" for s in share], texttemplate="%{text}",
                   hovertemplate="%{y}: %{x:.1f}% of the total<extra></extra>")
    fig.update_layout(xaxis_title="importance (% of the total, for a higher validation accuracy)",
                      yaxis_title="", height=max(400, 24 * sum(len(bar.y) for bar in fig.data)))
    return fig


def _trials_that_ran(study: optuna.Study) -> optuna.Study:
    """An in-memory copy of the study without the trials still queued (WAITING: never started, nothing to draw).
    Optuna logs the copy's creation at INFO ("A new study created in memory"): silenced for that call alone."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        copied = optuna.create_study(directions=study.directions)
    finally:
        optuna.logging.set_verbosity(verbosity)
    copied.add_trials([_on_own_grid(t) for t in study.get_trials(deepcopy=False) if t.state != TrialState.WAITING])
    return copied


def _on_own_grid(trial: FrozenTrial) -> FrozenTrial:
    """The trial with each parameter's distribution widened to hold its value. A preset enqueued into an accuracy
    search keeps widths off its multiples of 8 (`small`: 10 and 20; search/space.py), which Optuna stores with the
    grid's distribution; `add_trials` refuses such a trial."""
    distributions = dict(trial.distributions)
    for name, value in trial.params.items():
        dist = distributions[name]
        if isinstance(dist, IntDistribution) and not (dist.low <= value <= dist.high
                                                      and (value - dist.low) % dist.step == 0):
            distributions[name] = IntDistribution(min(dist.low, value), max(dist.high, value), log=dist.log)
    if distributions == trial.distributions:
        return trial
    widened = copy.copy(trial)  # the same trial (number, times, attributes), its own distributions
    widened.distributions = distributions
    return widened


def optuna_figures(study: optuna.Study, data: ReportData) -> list[tuple[str, go.Figure | str]]:
    """(title, figure or note) for the history, parallel coordinates, importances and timeline, in that order."""
    from optuna import visualization as vis

    n_completed = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    makers = [("Optimisation history", 2, lambda: fig_history(data)),
              ("Parallel coordinates (completed trials)", 2, lambda: fig_parallel(data)),
              ("Hyperparameter importances", MIN_COMPLETED_FOR_IMPORTANCES, lambda: _importances(study)),
              ("Timeline of trials", 0, lambda: vis.plot_timeline(_trials_that_ran(study)))]
    out: list[tuple[str, go.Figure | str]] = []
    for title, needed, make in makers:
        if n_completed < needed:
            why = (" (Optuna's evaluator compares the top tenth of them with the rest: fewer, and the top is a "
                   "single trial)" if needed == MIN_COMPLETED_FOR_IMPORTANCES else "")
            out.append((title, f"needs at least {needed} completed trials{why}; this study has {n_completed}"))
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out.append((title, make()))
        except Exception as exc:  # a failure is shown as one, never as a figure drawn
            out.append((title, FigureFailed(f"{type(exc).__name__}: {exc}")))
    return out

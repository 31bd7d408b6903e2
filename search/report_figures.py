"""The report's figures, drawn from `ReportData` alone (and, for Optuna's own plots, the study): parameters
against accuracy, the parameter spread, learning curves, the winner's layout, the certification curves, and
Optuna's history, parallel coordinates, importances and timeline. A figure that cannot be drawn is a `FigureFailed`
note, never a figure drawn."""

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

from search.record import TRAINED, Outcome
from search.report_data import ReportData


def seeds_text(n: int) -> str:
    return f"{n} seed{'s' if n != 1 else ''}"


def fig_params_vs_accuracy(data: ReportData) -> go.Figure:
    f = data.frame
    fig = go.Figure()
    trained = f[f["outcome"].isin([Outcome.COMPLETED, Outcome.PRUNED, Outcome.FAILED]) & f["val_acc"].notna()]
    for outcome, symbol in ((Outcome.COMPLETED, "circle"), (Outcome.PRUNED, "x")):
        part = trained[trained["outcome"] == outcome]
        fig.add_trace(go.Scatter(x=part["n_params"], y=part["val_acc"] * 100, mode="markers", name=outcome.value,
                                 marker={"symbol": symbol, "size": 9}, text=part["number"].map(lambda n: f"trial {n}"),
                                 hovertemplate="%{text}<br>%{x:,} params<br>%{y:.2f}%<extra></extra>"))
    front = f[f["number"].isin(data.pareto)].sort_values("n_params")
    if len(front):
        fig.add_trace(go.Scatter(x=front["n_params"], y=front["val_acc"] * 100, mode="lines+markers",
                                 name="Pareto front", line={"dash": "dot"}, marker={"size": 12, "symbol": "star"}))
    certified = (data.front_certified or {}).get("entries", [])
    if certified:  # the test accuracy of the front's trials, retrained on 60,000 images: mean and spread over seeds
        fig.add_trace(go.Scatter(
            x=[e["n_params"] for e in certified], y=[e["test_acc_mean"] * 100 for e in certified],
            error_y={"type": "data", "array": [e["test_acc_std"] * 100 for e in certified]},
            mode="lines+markers", name=f"certified test accuracy ({seeds_text(data.front_certified['seeds'])})",
            marker={"size": 11, "symbol": "diamond"}, line={"dash": "dash"},
            text=[f"trial {e['trial']}" for e in certified],
            hovertemplate="%{text}<br>%{x:,} params<br>test %{y:.2f}%<extra></extra>"))
    rejected = f[f["outcome"] == Outcome.REJECTED]
    if len(rejected):
        y_floor = (trained["val_acc"].min() * 100 - 0.5) if len(trained) else 90
        fig.add_trace(go.Scatter(x=rejected["n_params"], y=[y_floor] * len(rejected), mode="markers",
                                 name="rejected (never trained)", marker={"symbol": "triangle-down", "color": "grey"},
                                 text=rejected["reason"], hovertemplate="%{x:,} params<br>%{text}<extra></extra>"))
    fig.add_vline(x=data.max_params, line={"color": "red", "dash": "dash"},
                  annotation_text=f"budget {data.max_params:,}", annotation_position="bottom left")
    if data.target is not None:
        fig.add_hline(y=data.target * 100, line={"color": "green", "dash": "dash"},
                      annotation_text=f"target {data.target:.1%}", annotation_position="top left")
    # Parameters on a log axis (the small end is what users come for); accuracy on the range where trials differ:
    # from just under the target, or lower where a quarter of the trained trials lie, to 100%.
    accuracies = pd.concat([trained["val_acc"].dropna() * 100,
                            pd.Series([e["test_acc_mean"] * 100 for e in certified], dtype=float)])
    floor = float(accuracies.quantile(0.25)) - 0.5 if len(accuracies) else 90.0
    low = min(data.target * 100 - 1.0, floor) if data.target is not None else floor
    fig.update_layout(title="Parameters against validation accuracy", xaxis_title="parameters (log scale)",
                      yaxis_title="validation accuracy (%)", xaxis_type="log",
                      yaxis_range=[max(0.0, low), 100.05])
    return fig


def fig_parameter_spread(data: ReportData) -> go.Figure:
    """How the trials spread over the parameter axis: trained and rejected apart, on log-spaced bins."""
    f = data.frame[data.frame["n_params"].notna()]
    fig = go.Figure()
    bins = np.logspace(2, math.log10(max(data.max_params, 100) * 2), 25)
    centres = np.sqrt(bins[:-1] * bins[1:])
    for label, part in (("trained", f[f["outcome"].isin([o.value for o in TRAINED])]),
                        ("rejected (never trained)", f[f["outcome"] == Outcome.REJECTED])):
        counts, _ = np.histogram(part["n_params"].astype(float), bins=bins)
        fig.add_trace(go.Bar(x=centres, y=counts, name=label, width=np.diff(bins) * 0.9))
    fig.add_vline(x=data.max_params, line={"color": "red", "dash": "dash"})
    fig.update_layout(barmode="stack", xaxis_type="log", xaxis_title="parameters (log scale)", yaxis_title="trials")
    return fig


def fig_learning_curves(data: ReportData) -> go.Figure:
    fig = go.Figure()
    for _, row in data.frame.iterrows():
        history = json.loads(row["history"]) if isinstance(row["history"], str) else []
        if history:
            fig.add_trace(go.Scatter(x=[e["epoch"] for e in history], y=[e["val_acc"] * 100 for e in history],
                                     mode="lines+markers", name=f"trial {row['number']} ({row['outcome']})",
                                     opacity=1.0 if row["outcome"] == "completed" else 0.5))
    if data.target is not None:
        fig.add_hline(y=data.target * 100, line={"color": "green", "dash": "dash"})
    fig.update_layout(title="Learning curves: validation accuracy per epoch", xaxis_title="epoch",
                      yaxis_title="validation accuracy (%)", xaxis={"tickformat": "d", "dtick": 1})
    return fig


def fig_layout(data: ReportData) -> go.Figure:
    """The winner drawn as a row of boxes: height is the feature map's side, width grows with its channels."""
    fig = go.Figure()
    x = 0.0
    centres, hovers = [], []
    for row in data.winner_layers:
        if row["op"] == "bn":
            continue
        channels, side = row["out_shape"][0], row["out_shape"][-1] if len(row["out_shape"]) > 1 else 1
        width = 0.4 + channels / 16
        colour = {"conv": "#4C78A8", "pool": "#F58518", "gap": "#54A24B"}.get(row["op"], "#999")
        fig.add_shape(type="rect", x0=x, x1=x + width, y0=-side / 2, y1=side / 2, fillcolor=colour, opacity=0.8,
                      line={"width": 1})
        fig.add_annotation(x=x + width / 2, y=side / 2 + 1.5, text=f"{row['name']}<br>{'x'.join(map(str, row['out_shape']))}",
                           showarrow=False, font={"size": 9})
        centres.append(x + width / 2)
        hovers.append(f"{row['name']} ({row['op']})<br>{'x'.join(map(str, row['out_shape']))}<br>"
                      f"{row['n_params']:,} params, {row['macs']:,} MACs")
        x += width + 0.6
    # One point per box, for its hover text: parameters and MACs of the layer.
    fig.add_trace(go.Scatter(x=centres, y=[0] * len(centres), mode="markers", marker={"size": 6, "color": "white"},
                             hovertext=hovers, hoverinfo="text"))
    fig.update_xaxes(visible=False, range=[-0.5, x + 0.5])  # shapes alone do not size the axes
    fig.update_yaxes(visible=False, range=[-18, 20])
    fig.update_layout(title="The winner's layout (box height: map side in pixels; width: channels)", height=320,
                      showlegend=False)
    return fig


def fig_certification(cert: dict) -> go.Figure:
    fig = go.Figure()
    for run in cert["seeds"]:
        epochs = [e["epoch"] for e in run["epochs"]]
        fig.add_trace(go.Scatter(x=epochs, y=[e["train_acc"] * 100 for e in run["epochs"]], mode="lines",
                                 name=f"seed {run['seed']} train acc", line={"dash": "dot"}))
        fig.add_trace(go.Scatter(x=epochs, y=[e["test_acc"] * 100 for e in run["epochs"]], mode="lines+markers",
                                 name=f"seed {run['seed']} test acc"))
        fig.add_trace(go.Scatter(x=epochs, y=[e["train_loss"] for e in run["epochs"]], mode="lines", yaxis="y2",
                                 name=f"seed {run['seed']} train loss", line={"dash": "dot"}, visible="legendonly"))
        fig.add_trace(go.Scatter(x=epochs, y=[e["test_loss"] for e in run["epochs"]], mode="lines", yaxis="y2",
                                 name=f"seed {run['seed']} test loss", visible="legendonly"))
    if cert.get("target") is not None:
        fig.add_hline(y=cert["target"] * 100, line={"color": "green", "dash": "dash"})
    fig.update_layout(title=f"Certification of trial {cert['trial']}: train against test, per seed "
                            "(train figures are on the augmented, label-smoothed batches)",
                      xaxis={"title": "epoch", "tickformat": "d", "dtick": 1},
                      yaxis={"title": "accuracy (%)", "range": [97, 100]},
                      yaxis2={"title": "loss", "overlaying": "y", "side": "right", "rangemode": "tozero"})
    return fig


def _trials_that_ran(study: optuna.Study) -> optuna.Study:
    """An in-memory copy of the study without the trials still queued (WAITING: never started, nothing to draw)."""
    copy = optuna.create_study(directions=study.directions)
    copy.add_trials([_on_own_grid(t) for t in study.get_trials(deepcopy=False) if t.state != TrialState.WAITING])
    return copy


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


class FigureFailed(str):
    """A figure that could not be made: drawn as an error note (class 'error'), which the report's tests look for."""


def optuna_figures(study: optuna.Study, data: ReportData) -> list[tuple[str, go.Figure | str]]:
    from optuna import visualization as vis

    completed = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    target = (lambda t: t.values[0]) if data.objective == "pareto" else None
    name = "validation accuracy"
    out: list[tuple[str, go.Figure | str]] = []
    makers = [
        ("Optimisation history", lambda: vis.plot_optimization_history(study, target=target, target_name=name)),
        ("Parallel coordinates", lambda: vis.plot_parallel_coordinate(study, target=target, target_name=name)),
        ("Hyperparameter importances", lambda: vis.plot_param_importances(study, target=target, target_name=name)),
        ("Timeline of trials", lambda: vis.plot_timeline(_trials_that_ran(study))),
    ]
    for title, make in makers:
        if title != "Timeline of trials" and len(completed) < 2:
            out.append((title, f"needs at least two completed trials; this study has {len(completed)}"))
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out.append((title, make()))
        except Exception as exc:  # a failure is shown as one, never as a figure drawn
            out.append((title, FigureFailed(f"{type(exc).__name__}: {exc}")))
    return out

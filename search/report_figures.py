"""The report's own figures, drawn from `ReportData` alone: parameters against accuracy (with the rejected
candidates in a strip of their own), the parameter spread, learning curves, the winner's layout and the certification
curves; Optuna's figures are in search/report_optuna.py. A figure that cannot be drawn is a `FigureFailed` note,
never a figure drawn.

Accuracy is drawn as the error rate, 100 - accuracy in percent, on a log axis turned upside down (better is up):
0.5% and 30% error both show with room between them, where a linear accuracy axis either squeezes the 99s into one
line or cuts off the weak trials (a quick study's small nets, after one epoch, sit at 40-80%). A broken axis or an
inset would hide how far apart the two groups are; the log axis keeps one scale. Ticks and hover give accuracy."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from search.budgets import ATTRS
from search.record import TRAINED, Outcome
from search.report_data import ReportData

# A trial with no validation error is drawn at this error (%): one image in 10,000, the validation split's size; the
# log axis has no zero. Its hover still says 100.00%.
ERROR_FLOOR_PCT = 0.01
# Error ticks (%), where they fall inside the range: 1-2-3-5 steps, at least 0.18 decades apart (2 to 3), so their
# labels do not crowd on the log axis and a range of half a decade still has two.
ERROR_TICKS_PCT = (0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 3, 5, 10, 20, 30, 50, 100)
# Parameter-count ticks (log axes): 1-2-3-5 steps, written out, where plotly's own log ticks print bare digits.
PARAM_TICKS = tuple(m * 10**e for e in range(1, 9) for m in (1, 2, 3, 5))  # 10 to 500,000,000: MACs reach millions
MARGIN = 1.4  # the axis reaches this factor past the extreme points (log axes), so no marker sits on the edge
OUTCOME_SYMBOLS = {Outcome.COMPLETED: "circle", Outcome.PRUNED: "x", Outcome.FAILED: "square-open"}


class FigureFailed(str):
    """A figure that could not be made: drawn as an error note (class 'error'), which the report's tests look for."""


def seeds_text(n: int) -> str:
    return f"{n} seed{'s' if n != 1 else ''}"


def error_pct(accuracy) -> np.ndarray:
    """Validation or test accuracy (a fraction) -> error in percent, clipped to ERROR_FLOOR_PCT for the log axis."""
    return np.maximum(100.0 - np.asarray(accuracy, dtype=float) * 100.0, ERROR_FLOOR_PCT)


def error_axis(errors, extra=()) -> dict:
    """A y axis for errors (%): log, reversed (better up), its range from the data so that every point is inside,
    ticks labelled with the error and the accuracy it means."""
    values = [float(e) for e in [*errors, *extra] if e is not None and not pd.isna(e)] or [1.0, 10.0]
    low, high = max(min(values) / MARGIN, ERROR_FLOOR_PCT / MARGIN), min(max(values) * MARGIN, 100.0)
    high = max(high, low * MARGIN)
    ticks = [t for t in ERROR_TICKS_PCT if low <= t <= high]
    return {"type": "log", "range": [math.log10(high), math.log10(low)],  # high first: the axis runs reversed
            "tickvals": ticks, "ticktext": [f"{t:g}% ({100 - t:g}%)" for t in ticks],
            "title": "validation error, log scale (accuracy in brackets)"}


def parameter_axis(values) -> dict:
    """A log x axis for parameter counts (log10 range, as plotly takes it) holding every positive value with room
    either side, its ticks written out."""
    positive = [float(v) for v in values if v is not None and not pd.isna(v) and v > 0] or [1.0]
    low, high = min(positive) / MARGIN, max(positive) * MARGIN
    ticks = [t for t in PARAM_TICKS if low <= t <= high]
    return {"type": "log", "range": [math.log10(low), math.log10(high)], "tickvals": ticks,
            "ticktext": [f"{t:,}" for t in ticks]}


def trained_points(frame: pd.DataFrame) -> pd.DataFrame:
    """Trials that trained and measured a validation accuracy: each is drawn, whatever its outcome."""
    return frame[frame["outcome"].isin([o.value for o in TRAINED]) & frame["val_acc"].notna()]


# The main figure's x axis by --size-metric: (axis title, unit in hovers and the budget label); its trial_frame
# column is the metric's stored attribute, search.budgets.ATTRS.
SIZE_AXES = {"params": ("parameters", "parameters"), "macs": ("MACs per image", "MACs"),
             "activation-bytes": ("peak activation memory, int8 bytes", "bytes"),
             "model-bytes": ("int8 model size, bytes", "bytes")}


def _accuracy_scatter(part: pd.DataFrame, name: str, marker: dict, accuracy_column: str = "val_acc",
                      mode: str = "markers", metric: str = "params", **extra) -> go.Scatter:
    column, unit = ATTRS[metric], SIZE_AXES[metric][1]
    return go.Scatter(x=part[column], y=error_pct(part[accuracy_column]), mode=mode, name=name, marker=marker,
                      customdata=np.stack([part["number"], part[accuracy_column] * 100], axis=-1),
                      hovertemplate=f"trial %{{customdata[0]}}<br>%{{x:,}} {unit}<br>accuracy %{{customdata[1]:.2f}}%"
                                    "<extra></extra>", **extra)


def _rejected_strip(fig: go.Figure, rejected: pd.DataFrame, metric: str = "params") -> None:
    """The candidates the budget checker refused, at their size figures in a row of their own: never trained, so
    they have no accuracy to place them by."""
    column, unit = ATTRS[metric], SIZE_AXES[metric][1]
    counted = rejected[rejected[column].notna()]
    fig.add_trace(go.Scatter(x=counted[column], y=[0] * len(counted), mode="markers",
                             name=f"rejected, never trained ({len(rejected)})",
                             marker={"symbol": "triangle-down", "color": "grey", "size": 10},
                             customdata=np.stack([counted["number"], counted["reason"]], axis=-1),
                             hovertemplate=f"trial %{{customdata[0]}}: %{{x:,}} {unit}<br>%{{customdata[1]}}"
                                           "<extra></extra>"), row=2, col=1)
    uncounted = len(rejected) - len(counted)
    if uncounted:
        fig.add_annotation(text=f"{uncounted} more rejected with no {unit} figure", xref="x2 domain", x=0.01,
                           yref="y2", y=0.6, showarrow=False, xanchor="left", font={"size": 12})


def fig_params_vs_accuracy(data: ReportData) -> go.Figure:
    """Every trained trial by size (parameters, or the study's --size-metric) and validation error, the front, the
    certified test accuracies, the budget and target lines; below, the rejected candidates. Trained trials with no
    accuracy to draw are counted above."""
    f, metric = data.frame, data.size_metric
    column, title = ATTRS[metric], SIZE_AXES[metric][0]
    trained, rejected = trained_points(f), f[f["outcome"] == Outcome.REJECTED]
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.84, 0.16], vertical_spacing=0.03)
    for outcome, symbol in OUTCOME_SYMBOLS.items():
        part = trained[trained["outcome"] == outcome]
        if len(part):
            fig.add_trace(_accuracy_scatter(part, outcome.value, {"symbol": symbol, "size": 9}, metric=metric),
                          row=1, col=1)
    front = trained[trained["number"].isin(data.pareto)].sort_values(column)
    if len(front):
        fig.add_trace(_accuracy_scatter(front, "Pareto front", {"size": 13, "symbol": "star", "color": "#AB63FA"},
                                        mode="lines+markers", metric=metric, line={"dash": "dot"}), row=1, col=1)
    certified = pd.DataFrame((data.front_certified or {}).get("entries", []))
    if len(certified):  # the front's test accuracy, retrained on 60,000 images: mean and spread over seeds
        certified = certified.rename(columns={"trial": "number"})  # with every size figure (front.json)
        fig.add_trace(_accuracy_scatter(
            certified, f"certified test accuracy ({seeds_text(data.front_certified['seeds'])})",
            {"size": 11, "symbol": "diamond", "color": "#FFA15A"}, accuracy_column="test_acc_mean",
            mode="lines+markers", metric=metric, line={"dash": "dash"},
            error_y={"type": "data", "array": certified["test_acc_std"] * 100}), row=1, col=1)
    if len(rejected):
        _rejected_strip(fig, rejected, metric)
    _budget_and_target(fig, data)
    target_error = [100 - data.target * 100] if data.target is not None else []
    y_axis = error_axis(error_pct(trained["val_acc"]),
                        [*error_pct(certified["test_acc_mean"]), *target_error] if len(certified) else target_error)
    x_values = [*f[column], *([data.size_bound] if data.size_bound else [])]
    missing = len(f[f["outcome"].isin([o.value for o in TRAINED]) & f["val_acc"].isna()])
    if missing:  # said on the figure itself (the page replaces a figure's title with its heading)
        fig.add_annotation(text=f"{missing} trained trial(s) not drawn: no validation accuracy measured (still "
                                "training, or failed in the first epoch)", xref="paper", x=0, yref="paper", y=1.0,
                           yanchor="bottom", xanchor="left", showarrow=False, yshift=24)
    fig.update_layout(height=620, yaxis=y_axis, legend={"orientation": "h", "y": -0.14},
                      margin={"t": 60 if missing else 30})  # room for that line above the plot (px)
    fig.update_xaxes(**parameter_axis(x_values))
    fig.update_xaxes(title=f"{title} (log scale)", row=2, col=1)
    fig.update_yaxes(range=[-1, 1], tickvals=[0], ticktext=["rejected"], row=2, col=1)
    return fig


def _budget_and_target(fig: go.Figure, data: ReportData) -> None:
    """The size metric's bound as a line through both rows, labelled at the top, left of it; the target as a line
    across, labelled at the left, above it (annotations on a log axis take log10 coordinates)."""
    if data.size_bound:
        unit = SIZE_AXES[data.size_metric][1]
        fig.add_vline(x=data.size_bound, line={"color": "red", "dash": "dash"}, row="all", col=1)
        fig.add_annotation(x=math.log10(data.size_bound), xref="x", y=1.0, yref="y domain", xanchor="right",
                           yanchor="top", text=f"budget: fewer than {data.size_bound:,} {unit} ", showarrow=False,
                           font={"color": "red"})
    if data.target is not None:
        target_error = 100 - data.target * 100
        fig.add_hline(y=target_error, line={"color": "green", "dash": "dash"}, row=1, col=1)
        fig.add_annotation(x=0.0, xref="x domain", y=math.log10(target_error), yref="y", xanchor="left",
                           yanchor="bottom", text=f"target {data.target:.1%}", showarrow=False,
                           font={"color": "green"})


def fig_parameter_spread(data: ReportData) -> go.Figure:
    """How the trials spread over the parameter axis: trained and rejected apart, on log-spaced bins."""
    f = data.frame[data.frame["n_params"].notna()]
    fig = go.Figure()
    # From half the smallest count (at least 100) to twice the budget: the axis covers where trials are.
    smallest = max(float(f["n_params"].min()) / 2, 100.0) if len(f) else 100.0
    bins = np.logspace(math.log10(smallest), math.log10(max(data.max_params, 100) * 2), 25)
    centres = np.sqrt(bins[:-1] * bins[1:])
    for label, part in (("trained", f[f["outcome"].isin([o.value for o in TRAINED])]),
                        ("rejected (never trained)", f[f["outcome"] == Outcome.REJECTED])):
        counts, _ = np.histogram(part["n_params"].astype(float), bins=bins)
        fig.add_trace(go.Bar(x=centres, y=counts, name=label, width=np.diff(bins) * 0.9))
    fig.add_vline(x=data.max_params, line={"color": "red", "dash": "dash"})
    fig.update_layout(barmode="stack", xaxis={**parameter_axis([bins[0], bins[-1]]), "title": "parameters (log scale)"},
                      yaxis_title="trials",
                      yaxis={"tickformat": "d", "rangemode": "tozero"})
    return fig


def fig_learning_curves(data: ReportData) -> go.Figure:
    fig = go.Figure()
    errors = []
    for _, row in data.frame.iterrows():
        history = json.loads(row["history"]) if isinstance(row["history"], str) else []
        if history:
            accuracy = np.array([e["val_acc"] for e in history])
            errors += list(error_pct(accuracy))
            fig.add_trace(go.Scatter(x=[e["epoch"] for e in history], y=error_pct(accuracy), customdata=accuracy * 100,
                                     mode="lines+markers", name=f"trial {row['number']} ({row['outcome']})",
                                     opacity=1.0 if row["outcome"] == "completed" else 0.5,
                                     hovertemplate="epoch %{x}: %{customdata:.2f}%<extra></extra>"))
    target_error = [] if data.target is None else [100 - data.target * 100]
    for error in target_error:
        fig.add_hline(y=error, line={"color": "green", "dash": "dash"})
    fig.update_layout(title="Learning curves: validation accuracy per epoch", xaxis_title="epoch",
                      yaxis=error_axis(errors, target_error), xaxis={"tickformat": "d", "dtick": 1})
    return fig


def fig_layout(data: ReportData) -> go.Figure:
    """The winner drawn as a row of boxes: height is the feature map's side, width grows with its channels. Labels
    stand under the boxes in two staggered rows, so that neighbours never overlap and no label covers a box."""
    fig = go.Figure()
    x, centres, hovers = 0.0, [], []
    layers = [row for row in data.winner_layers if row["op"] != "bn"]
    top = max([row["out_shape"][-1] if len(row["out_shape"]) > 1 else 1 for row in layers] or [1]) / 2
    for i, row in enumerate(layers):
        channels, side = row["out_shape"][0], row["out_shape"][-1] if len(row["out_shape"]) > 1 else 1
        width = 0.6 + channels / 12  # channels -> box width (axis units); 0.6 keeps a 1-channel box visible
        colour = {"conv": "#4C78A8", "pool": "#F58518", "gap": "#54A24B"}.get(row["op"], "#999")
        fig.add_shape(type="rect", x0=x, x1=x + width, y0=-side / 2, y1=side / 2, fillcolor=colour, opacity=0.8,
                      line={"width": 1})
        shape_text = "x".join(map(str, row["out_shape"]))
        fig.add_annotation(x=x + width / 2, y=-top - 1 - (i % 2) * 7, yanchor="top", showarrow=False,
                           text=f"{row['name']}<br>{shape_text}", font={"size": 12})
        centres.append(x + width / 2)
        hovers.append(f"{row['name']} ({row['op']})<br>{shape_text}<br>{row['n_params']:,} params, "
                      f"{row['macs']:,} MACs")
        x += width + 1.0
    # One point per box, for its hover text: parameters and MACs of the layer.
    fig.add_trace(go.Scatter(x=centres, y=[0] * len(centres), mode="markers", marker={"size": 6, "color": "white"},
                             hovertext=hovers, hoverinfo="text"))
    fig.update_xaxes(visible=False, range=[-1.0, x])  # shapes alone do not size the axes
    fig.update_yaxes(visible=False, range=[-top - 13, top + 1])
    fig.update_layout(title="The winner's layout (box height: map side in pixels; width: channels)", height=400,
                      showlegend=False)
    return fig


def fig_certification(cert: dict) -> go.Figure:
    """Train and test accuracy per seed on an axis that fits them all; the losses (hidden until clicked in the
    legend) on a second axis from 0."""
    fig = go.Figure()
    accuracies, losses = [], []
    for run in cert["seeds"]:
        epochs = [e["epoch"] for e in run["epochs"]]
        for key, kind in (("train_acc", "train acc"), ("test_acc", "test acc")):
            accuracies += [e[key] * 100 for e in run["epochs"]]
            fig.add_trace(go.Scatter(x=epochs, y=[e[key] * 100 for e in run["epochs"]], name=f"seed {run['seed']} "
                                     f"{kind}", mode="lines" if key == "train_acc" else "lines+markers",
                                     line={"dash": "dot"} if key == "train_acc" else None,
                                     hovertemplate="epoch %{x}: %{y:.2f}%<extra></extra>"))
        for key, kind in (("train_loss", "train loss"), ("test_loss", "test loss")):
            losses += [e[key] for e in run["epochs"]]
            fig.add_trace(go.Scatter(x=epochs, y=[e[key] for e in run["epochs"]], mode="lines", yaxis="y2",
                                     name=f"seed {run['seed']} {kind}", visible="legendonly",
                                     line={"dash": "dot"} if key == "train_loss" else None))
    if cert.get("target") is not None:
        accuracies.append(cert["target"] * 100)
        fig.add_hline(y=cert["target"] * 100, line={"color": "green", "dash": "dash"},
                      annotation_text=f"target {cert['target']:.1%}", annotation_position="top left")
    low = math.floor(min(accuracies or [90.0]) - 0.5)  # whole percents below the lowest curve, half a point clear
    loss_top = max(losses or [1.0]) * 1.1
    # The loss axis's own ticks, 0.05 to 1 apart (5 or fewer), not the accuracy axis's grid carried over.
    loss_step = next((step for step in (0.05, 0.1, 0.2, 0.25, 0.5, 1.0) if loss_top / step <= 5), 2.0)
    fig.update_layout(title=f"Certification of trial {cert['trial']}: train against test, per seed "
                            "(train figures are on the augmented, label-smoothed batches)",
                      xaxis={"title": "epoch", "tickformat": "d", "dtick": 1},
                      yaxis={"title": "accuracy (%)", "range": [max(low, 0), 100.2]},
                      yaxis2={"title": "loss (cross-entropy)", "overlaying": "y", "side": "right",
                              "range": [0, loss_top], "tickmode": "linear", "tick0": 0, "dtick": loss_step,
                              "tickformat": ".2f", "showgrid": False},
                      legend={"orientation": "h", "y": -0.2})
    return fig

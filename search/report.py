"""`report`: the study as one self-contained HTML page (plotly.js inlined), readable offline with no server.

Two steps, as in Optuna's own plots: `collect(study, best)` turns storage into plain data (`ReportData`), tested on
its own; `render(data, study)` turns that data into figures and HTML. Optuna's plot functions draw the history,
parallel coordinates, importances and timeline; the rest are Plotly figures over the trial frame.
"""

from __future__ import annotations

import html
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import plotly.graph_objects as go
from optuna.distributions import IntDistribution
from optuna.trial import FrozenTrial, TrialState

from models.budget import analyze
from models.rules import RULES
from search.fsio import atomic_write_text
from search.record import (TRAINED, Outcome, best_of, candidates, outcome_counts, pareto_front, study_dataset,
                           study_target, trial_frame)


@dataclass
class ReportData:
    study_name: str
    frame: pd.DataFrame  # one row per trial (search.record.trial_frame)
    counts: dict[str, int]  # outcome -> trials
    n_trained: int
    best: dict | None  # number, val_acc, n_params of the best feasible completed trial
    pareto: list[int]  # trial numbers on the (accuracy up, parameters down) front
    time_spent_s: float  # sum of trial wall times
    winner_layers: list[dict] = field(default_factory=list)  # the best trial's layer table
    winner_spec: dict | None = None
    certification: dict | None = None  # best.json, when `best` has run
    max_params: int = RULES.max_params
    target: float | None = RULES.target_accuracy  # None: no target line (another set, none given)
    objective: str = "accuracy"
    front_certified: dict | None = None  # front.json, when `best --front` has run
    dataset: str = "mnist"


def collect(study: optuna.Study, certification: dict | None = None, front: dict | None = None) -> ReportData:
    frame = trial_frame(study)
    counts = outcome_counts(study)
    setup = study.user_attrs.get("setup", {})
    done = candidates(study)
    best = None
    winner_layers: list[dict] = []
    winner_spec = None
    if done:
        top = best_of(done)
        best = {"number": top.number, "val_acc": top.values[0], "n_params": top.n_params,
                "receptive_field": top.receptive_field}
        winner_spec = json.loads(top.spec.to_json())
        winner_layers = [dict(row.__dict__) for row in analyze(top.spec).layers]
    n_trained = sum(counts.get(k.value, 0) for k in TRAINED)
    time_spent = float(frame["wall_s"].fillna(0).sum()) if "wall_s" in frame else 0.0
    return ReportData(study.study_name, frame, counts, n_trained, best, sorted(r.number for r in pareto_front(done)),
                      time_spent,
                      winner_layers, winner_spec, certification, setup.get("max_params", RULES.max_params),
                      study_target(study), setup.get("objective", "accuracy"), front, study_dataset(study))


# ---- figures ----------------------------------------------------------------------------------

def _seeds(n: int) -> str:
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
            mode="lines+markers", name=f"certified test accuracy ({_seeds(data.front_certified['seeds'])})",
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
    return FrozenTrial(number=trial.number, state=trial.state, value=None, values=trial.values,
                       datetime_start=trial.datetime_start, datetime_complete=trial.datetime_complete,
                       params=trial.params, distributions=distributions, user_attrs=trial.user_attrs,
                       system_attrs=trial.system_attrs, intermediate_values=trial.intermediate_values,
                       trial_id=trial._trial_id)


class FigureFailed(str):
    """A figure that could not be made: drawn as an error note (class 'error'), which the report's tests look for."""


def _optuna_figures(study: optuna.Study, data: ReportData) -> list[tuple[str, go.Figure | str]]:
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


# ---- HTML -------------------------------------------------------------------------------------

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; color: #222; }
h1 { margin-bottom: 0.2rem; } .muted { color: #666; }
.cards { display: flex; gap: 1rem; flex-wrap: wrap; margin: 1rem 0; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 0.6rem 1rem; min-width: 8rem; }
.card b { display: block; font-size: 1.4rem; }
table { border-collapse: collapse; font-size: 0.85rem; } th, td { border-bottom: 1px solid #eee; padding: 3px 8px; }
th { cursor: pointer; background: #f6f6f6; position: sticky; top: 0; } td.num { text-align: right; }
.pass { color: #1a7f37; font-weight: bold; } .fail { color: #cf222e; font-weight: bold; }
.note { padding: 1rem; background: #fff8e1; border-radius: 6px; }
.scroll { max-height: 600px; overflow: auto; }
"""

_SORT_JS = """
document.querySelectorAll('table.sortable th').forEach((th, col) => th.addEventListener('click', () => {
  const body = th.closest('table').tBodies[0];
  const asc = th.dataset.asc !== 'true'; th.dataset.asc = asc;
  const key = r => { const t = r.cells[col].dataset.v ?? r.cells[col].textContent; const n = parseFloat(t);
                     return isNaN(n) ? t : n; };
  Array.from(body.rows).sort((a, b) => { const x = key(a), y = key(b);
    return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1); }).forEach(r => body.appendChild(r));
}));
"""


# The trials table: column heading -> (frame column, format of a number); counts print as integers.
TRIAL_COLUMNS = {"trial": ("number", "{:,.0f}"), "from": ("origin", None), "outcome": ("outcome", None),
                 "validation accuracy (%)": ("val_acc", "{:.2f}"), "parameters": ("n_params", "{:,.0f}"),
                 "receptive field (px)": ("receptive_field", "{:,.0f}"), "MACs per image": ("macs", "{:,.0f}"),
                 "epochs trained": ("epochs_trained", "{:,.0f}"), "seconds": ("wall_s", "{:,.1f}"),
                 "reason": ("reason", None)}


def trial_rows(frame: pd.DataFrame) -> list[dict]:
    """The trials table's cells as text (sort keys beside them): integers without decimals, sensible digits."""
    rows = []
    for record in frame.to_dict("records"):
        row = {}
        for heading, (column, fmt) in TRIAL_COLUMNS.items():
            value = record.get(column)
            if column == "val_acc" and value is not None and not pd.isna(value):
                value = value * 100
            missing = value is None or (isinstance(value, float) and pd.isna(value))
            row[heading] = "" if missing else (fmt.format(value) if fmt else str(value))
            row[heading + "\0sort"] = None if missing or fmt is None else float(value)
        rows.append(row)
    return rows


def _table(rows: list[dict], columns: list[str], sortable: bool = False, table_id: str = "") -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c)
            sort_key = row.get(c + "\0sort")
            if sort_key is not None:  # preformatted text with a numeric sort key
                cells.append(f'<td class="num" data-v="{sort_key}">{html.escape(v)}</td>')
            elif isinstance(v, float) and not pd.isna(v):
                text = f"{v:,.4f}" if abs(v) < 10 else f"{v:,.1f}"
                cells.append(f'<td class="num" data-v="{v}">{text}</td>')
            elif isinstance(v, int) and not isinstance(v, bool):
                cells.append(f'<td class="num" data-v="{v}">{v:,}</td>')
            else:
                cells.append(f"<td>{html.escape('' if v is None or (isinstance(v, float) and pd.isna(v)) else str(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    cls = ' class="sortable"' if sortable else ""
    ident = f' id="{table_id}"' if table_id else ""
    return f"<table{cls}{ident}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render(data: ReportData, study: optuna.Study) -> str:  # long: the page's sections, in the order they appear
    parts: list[str] = []
    plotly_included = False

    def figure(title: str, fig: go.Figure | str, fig_id: str) -> None:
        nonlocal plotly_included
        if isinstance(fig, str):
            kind, text = ("note error", f"could not be drawn: {fig}") if isinstance(fig, FigureFailed) else ("note", fig)
            parts.append(f'<section id="{fig_id}"><h2>{html.escape(title)}</h2><p class="{kind}">{html.escape(text)}</p>'
                         "</section>")
            return
        fig.update_layout(template="plotly_white", margin={"t": 30}, title_text="")  # the h2 above is the title
        div = fig.to_html(full_html=False, include_plotlyjs=not plotly_included, div_id=fig_id,
                          config={"displaylogo": False})
        plotly_included = True
        parts.append(f'<section class="figure"><h2>{html.escape(title)}</h2>{div}</section>')

    c = data.counts
    best = (f"{data.best['val_acc']:.2%} validation accuracy at {data.best['n_params']:,} parameters "
            f"(trial {data.best['number']})" if data.best else "no completed trial yet")
    cards = [("trained", data.n_trained), ("completed", c.get("completed", 0)), ("pruned", c.get("pruned", 0)),
             ("rejected", c.get("rejected", 0)), ("failed", c.get("failed", 0) + c.get("stale", 0)),
             ("queued (not run yet)", c.get("queued", 0)), ("time spent", f"{data.time_spent_s / 60:,.1f} min")]
    parts.append(f"<h1>budgetnas study <code>{html.escape(data.study_name)}</code></h1>"
                 f"<p class='muted'>Best: {html.escape(best)}. Budget: fewer than {data.max_params:,} parameters; "
                 f"{'target ' + format(data.target, '.1%') if data.target is not None else 'no target'}; "
                 f"objective {html.escape(data.objective)}; data {html.escape(data.dataset)}.</p>"
                 "<div class='cards'>" + "".join(f"<div class='card'>{k}<b>{v}</b></div>" for k, v in cards) + "</div>")

    n_trials = len(data.frame)
    if data.best is None or n_trials < 2:
        parts.append(f"<p class='note' id='too-few'>This study has {data.n_trained} trained trial(s) and "
                     f"{c.get('completed', 0)} completed: figures need more. Run <code>cli.py search</code> "
                     "for more trials, then <code>cli.py report</code> again.</p>")
    if data.n_trained:  # an empty study (or one of rejections only) has nothing to plot: the note above says so
        figure("Parameters against validation accuracy", fig_params_vs_accuracy(data), "params-vs-accuracy")
        figure("Trials over the parameter axis", fig_parameter_spread(data), "parameter-spread")
        figure("Learning curves", fig_learning_curves(data), "learning-curves")
        for i, (title, fig) in enumerate(_optuna_figures(study, data)):
            figure(title, fig, ["history", "parallel", "importances", "timeline"][i])
    if data.winner_layers:
        parts.append(f"<section id='winner'><h2>The winner: trial {data.best['number']}</h2>")
        rows = [{**r, "out_shape": "x".join(map(str, r["out_shape"])),
                 "receptive_field": "-" if r["receptive_field"] is None else r["receptive_field"]}
                for r in data.winner_layers]
        parts.append(_table(rows, ["name", "op", "out_shape", "n_params", "receptive_field", "jump", "macs"]))
        parts.append("</section>")
        figure("The winner's layout (box height: map side in pixels; width: channels)", fig_layout(data),
               "winner-layout")
    if data.certification:
        cert = data.certification
        rules = "".join(f"<tr><td>{html.escape(r['rule'])}</td><td>{html.escape(r['figure'])}</td>"
                        f"<td class='{'pass' if r['pass'] else 'fail'}'>{'PASS' if r['pass'] else 'FAIL'}</td></tr>"
                        for r in cert["rules"])
        parts.append(f"<section id='certification'><h2>Certification (cli.py best): trial {cert['trial']}</h2>"
                     f"<table><tbody>{rules}</tbody></table></section>")
        figure("Train against test, per seed (train figures: on the augmented, label-smoothed batches)",
               fig_certification(cert), "certification-curves")
    if data.front_certified and data.front_certified.get("entries"):
        fc = data.front_certified
        rows = [{"trial": e["trial"], "parameters": f"{e['n_params']:,}", "validation": f"{e['val_acc']:.2%}",
                 "test (mean +- sd)": f"{RULES.accuracy_text(e['test_acc_mean'], fc.get('target'))} "
                                      f"+- {e['test_acc_std']:.2%}",
                 "rules": "all pass" if e["certified"] else "fails: " + "; ".join(e["failed_rules"])}
                for e in fc["entries"]]
        parts.append(f"<section id='certified-front'><h2>The certified front (cli.py best --front): "
                     f"{_seeds(fc['seeds'])} each, validation at or above {fc['floor']:.2%}</h2>"
                     + _table(rows, list(rows[0])) + "</section>")
    if n_trials:
        parts.append("<section id='trials'><h2>Every trial (click a column to sort)</h2><div class='scroll'>"
                     + _table(trial_rows(data.frame), list(TRIAL_COLUMNS), sortable=True, table_id="trial-table")
                     + "</div></section>")
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>budgetnas: {html.escape(data.study_name)}</title><style>{_STYLE}</style></head><body>"
            + "\n".join(parts) + f"<script>{_SORT_JS}</script></body></html>")


def write_report(study: optuna.Study, results_dir: str, certification: dict | None = None,
                 front: dict | None = None) -> Path:
    data = collect(study, certification, front)
    path = Path(results_dir) / study.study_name / "report.html"
    return atomic_write_text(path, render(data, study))

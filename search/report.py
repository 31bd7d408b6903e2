"""`report`: the study as one self-contained HTML page (plotly.js inlined), readable offline with no server.

Two steps, as in Optuna's own plots: `collect(study, best)` turns storage into plain data (`ReportData`,
search/report_data.py), tested on its own; `render(data, study)` turns that data into figures
(search/report_figures.py, search/report_optuna.py) and this module's HTML: the header and its cards, the sections,
the sortable trials table.
"""

from __future__ import annotations

import html
from pathlib import Path

import optuna
import pandas as pd
import plotly.graph_objects as go

from models.rules import RULES
from search.budgets import describe, front_columns
from search.fsio import atomic_write_text
from search.report_data import ReportData, collect
from search.report_figures import (SIZE_AXES, FigureFailed, fig_certification, fig_layout, fig_learning_curves,
                                   fig_parameter_spread, fig_params_vs_accuracy, seeds_text)
from search.report_optuna import optuna_figures

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
                 "peak activation (int8 bytes)": ("activation_bytes", "{:,.0f}"),
                 "int8 model (bytes)": ("model_bytes", "{:,.0f}"),
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


class _Page:
    """The page's sections in order; plotly.js goes inline with the first figure only."""

    def __init__(self):
        self.parts: list[str] = []
        self.plotly_included = False

    def add(self, part: str) -> None:
        self.parts.append(part)

    def figure(self, title: str, fig: go.Figure | str, fig_id: str) -> None:
        if isinstance(fig, str):
            kind, text = ("note error", f"could not be drawn: {fig}") if isinstance(fig, FigureFailed) else ("note", fig)
            self.parts.append(f'<section id="{fig_id}"><h2>{html.escape(title)}</h2><p class="{kind}">'
                              f'{html.escape(text)}</p></section>')
            return
        # The h2 above is the title; a figure that needs more top margin (axis labels above the plot) keeps its own.
        fig.update_layout(template="plotly_white", margin={"t": max(30, fig.layout.margin.t or 0)}, title_text="")
        div = fig.to_html(full_html=False, include_plotlyjs=not self.plotly_included, div_id=fig_id,
                          config={"displaylogo": False})
        self.plotly_included = True
        self.parts.append(f'<section class="figure"><h2>{html.escape(title)}</h2>{div}</section>')


def _header(data: ReportData) -> str:
    """The title, the best trial, the budget, and one card per count."""
    c = data.counts
    bounds = ("; under " + ", ".join(describe(m, b) for m, b in data.other_bounds.items())  # a microcontroller's
              if data.other_bounds else "")
    best = (f"{data.best['val_acc']:.2%} validation accuracy at {data.best['n_params']:,} parameters "
            f"(trial {data.best['number']})" if data.best else "no completed trial yet")
    cards = [("trained", data.n_trained), ("completed", c.get("completed", 0)), ("pruned", c.get("pruned", 0)),
             ("rejected", c.get("rejected", 0)), ("failed", c.get("failed", 0) + c.get("stale", 0)),
             ("queued (not run yet)", c.get("queued", 0)), ("time spent", f"{data.time_spent_s / 60:,.1f} min")]
    return (f"<h1>budgetnas study <code>{html.escape(data.study_name)}</code></h1>"
            f"<p class='muted'>Best: {html.escape(best)}. Budget: fewer than {data.max_params:,} parameters"
            f"{html.escape(bounds)}; "
            f"{'target ' + format(data.target, '.1%') if data.target is not None else 'no target'}; "
            f"objective {html.escape(data.objective)}; data {html.escape(data.dataset)}.</p>"
            "<div class='cards'>" + "".join(f"<div class='card'>{k}<b>{v}</b></div>" for k, v in cards) + "</div>")


def _search_figures(page: _Page, data: ReportData, study: optuna.Study) -> None:
    """The note when there is too little to draw, then the search's figures (none for a study that trained none)."""
    if data.best is None or len(data.frame) < 2:
        page.add(f"<p class='note' id='too-few'>This study has {data.n_trained} trained trial(s) and "
                 f"{data.counts.get('completed', 0)} completed: figures need more. Run <code>cli.py search</code> "
                 "for more trials, then <code>cli.py report</code> again.</p>")
    if data.n_trained:  # an empty study (or one of rejections only) has nothing to plot: the note above says so
        size = SIZE_AXES[data.size_metric][0]
        page.figure(f"{size[0].upper()}{size[1:]} against validation accuracy", fig_params_vs_accuracy(data),
                    "params-vs-accuracy")
        page.figure("Trials over the parameter axis", fig_parameter_spread(data), "parameter-spread")
        page.figure("Learning curves", fig_learning_curves(data), "learning-curves")
        for i, (title, fig) in enumerate(optuna_figures(study, data)):
            page.figure(title, fig, ["history", "parallel", "importances", "timeline"][i])


def _winner(page: _Page, data: ReportData) -> None:
    page.add(f"<section id='winner'><h2>The winner: trial {data.best['number']}</h2>")
    rows = [{**r, "out_shape": "x".join(map(str, r["out_shape"])),
             "receptive_field": "-" if r["receptive_field"] is None else r["receptive_field"]}
            for r in data.winner_layers]
    page.add(_table(rows, ["name", "op", "out_shape", "n_params", "receptive_field", "jump", "macs"]))
    page.add("</section>")
    page.figure("The winner's layout (box height: map side in pixels; width: channels)", fig_layout(data),
                "winner-layout")


def _certification(page: _Page, cert: dict) -> None:
    rules = "".join(f"<tr><td>{html.escape(r['rule'])}</td><td>{html.escape(r['figure'])}</td>"
                    f"<td class='{'pass' if r['pass'] else 'fail'}'>{'PASS' if r['pass'] else 'FAIL'}</td></tr>"
                    for r in cert["rules"])
    page.add(f"<section id='certification'><h2>Certification (cli.py best): trial {cert['trial']}</h2>"
             f"<table><tbody>{rules}</tbody></table></section>")
    page.figure("Train against test, per seed (train figures: on the augmented, label-smoothed batches)",
                fig_certification(cert), "certification-curves")


def _certified_front(fc: dict) -> str:
    sizes = front_columns(fc.get("size_metric", "params"))
    rows = [{"trial": e["trial"], **{heading: f"{e[key]:,}" for heading, key in sizes},
             "validation": f"{e['val_acc']:.2%}",
             "test (mean +- sd)": f"{RULES.accuracy_text(e['test_acc_mean'], fc.get('target'))} "
                                  f"+- {e['test_acc_std']:.2%}",
             "rules": "all pass" if e["certified"] else "fails: " + "; ".join(e["failed_rules"])}
            for e in fc["entries"]]
    return (f"<section id='certified-front'><h2>The certified front (cli.py best --front): "
            f"{seeds_text(fc['seeds'])} each, validation at or above {fc['floor']:.2%}</h2>"
            + _table(rows, list(rows[0])) + "</section>")


def render(data: ReportData, study: optuna.Study) -> str:
    """The page: its sections in the order they appear."""
    page = _Page()
    page.add(_header(data))
    _search_figures(page, data, study)
    if data.winner_layers:
        _winner(page, data)
    if data.certification:
        _certification(page, data.certification)
    if data.front_certified and data.front_certified.get("entries"):
        page.add(_certified_front(data.front_certified))
    if len(data.frame):
        page.add("<section id='trials'><h2>Every trial (click a column to sort)</h2><div class='scroll'>"
                 + _table(trial_rows(data.frame), list(TRIAL_COLUMNS), sortable=True, table_id="trial-table")
                 + "</div></section>")
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>budgetnas: {html.escape(data.study_name)}</title><style>{_STYLE}</style></head><body>"
            + "\n".join(page.parts) + f"<script>{_SORT_JS}</script></body></html>")


def write_report(study: optuna.Study, results_dir: str, certification: dict | None = None,
                 front: dict | None = None) -> Path:
    data = collect(study, certification, front)
    path = Path(results_dir) / study.study_name / "report.html"
    return atomic_write_text(path, render(data, study))

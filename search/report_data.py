"""The report's first step: a pure function from a stored study (and the certificates `best` wrote) to plain data,
`ReportData`, which search/report_figures.py and search/report.py draw and tested on its own."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import optuna
import pandas as pd

from models.budget import analyze
from models.rules import RULES
from search.budgets import ATTRS
from search.record import (TRAINED, accuracy, best_of, candidates, outcome_counts, pareto_front, runs_of,
                           study_dataset, study_size_metric, study_target, trial_frame)


@dataclass
class ReportData:
    study_name: str
    frame: pd.DataFrame  # one row per trial (search.record.trial_frame)
    counts: dict[str, int]  # outcome -> trials
    n_trained: int
    best: dict | None  # number, val_acc, n_params of the best feasible completed trial
    pareto: list[int]  # trial numbers on the (accuracy up, size down) front; size: the study's size_metric
    time_spent_s: float  # sum of trial wall times
    winner_layers: list[dict] = field(default_factory=list)  # the best trial's layer table
    winner_spec: dict | None = None
    certification: dict | None = None  # best.json, when `best` has run
    max_params: int = RULES.max_params
    target: float | None = RULES.target_accuracy  # None: no target line (another set, none given)
    objective: str = "accuracy"
    front_certified: dict | None = None  # front.json, when `best --front` has run
    dataset: str = "mnist"
    size_metric: str = "params"  # the x axis of the main figure and the front: the study's --size-metric
    size_bound: int | None = None  # that metric's bound (--max-params, --max-activation-bytes, ...); None: none given
    other_bounds: dict = field(default_factory=dict)  # metric -> bound of --max-macs, --max-activation-bytes, ...


def with_last_accuracy(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame with each trained trial's empty `val_acc` taken from the last epoch of its stored history. A pareto
    search prunes by its own rule and reports no intermediate value to Optuna (a multi-objective study takes none),
    so its pruned trials have no value: their accuracy when stopped is in the history alone."""
    def last(history: str) -> float:
        epochs = json.loads(history) if isinstance(history, str) and history else []
        return epochs[-1]["val_acc"] if epochs and epochs[-1].get("val_acc") is not None else float("nan")

    frame = frame.copy()
    empty = frame["val_acc"].isna() & frame["outcome"].isin([o.value for o in TRAINED])
    if empty.any():
        frame.loc[empty, "val_acc"] = frame.loc[empty, "history"].map(last).astype(float)
    return frame


def collect(study: optuna.Study, certification: dict | None = None, front: dict | None = None) -> ReportData:
    frame = trial_frame(study)
    if len(frame):
        frame = with_last_accuracy(frame)
    counts = outcome_counts(study)
    metric = study_size_metric(study)
    setup = study.user_attrs.get("setup", {})
    done = candidates(study)
    best = None
    winner_layers: list[dict] = []
    winner_spec = None
    if done:
        top = best_of(done)
        best = {"number": top.number, "val_acc": accuracy(top, runs_of(done)), "n_params": top.n_params,
                "receptive_field": top.receptive_field}
        winner_spec = json.loads(top.spec.to_json())
        winner_layers = [dict(row.__dict__) for row in analyze(top.spec).layers]
    n_trained = sum(counts.get(k.value, 0) for k in TRAINED)
    time_spent = float(frame["wall_s"].fillna(0).sum()) if "wall_s" in frame else 0.0
    return ReportData(study.study_name, frame, counts, n_trained, best, sorted(r.number for r in pareto_front(done, metric)),
                      time_spent,
                      winner_layers, winner_spec, certification, setup.get("max_params", RULES.max_params),
                      study_target(study), setup.get("objective", "accuracy"), front, study_dataset(study),
                      metric, setup.get(_bound_key(metric), RULES.max_params if metric == "params" else None),
                      {m: setup[_bound_key(m)] for m in ATTRS if m != "params" and setup.get(_bound_key(m))})


def _bound_key(metric: str) -> str:
    """The set-up key of a metric's bound: max_params, max_macs, max_activation_bytes, max_model_bytes."""
    return "max_" + ATTRS[metric].removeprefix("n_")

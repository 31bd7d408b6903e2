"""Front descent: a pareto search walks its front down towards the small end.

Random draws seldom land a small net with a good recipe (docs/search.md has the pareto searches that showed it).
So after each trial, for each level (the target, then the floor), the smallest completed trial at or above it is
queued again with a smaller parameter target: the same layout and training recipe (every choice of the space fixed
through Optuna's `enqueue_trial`), its widths fitted by the space (`search/widths.py`, `fit_widths`) to SHRINK[0] of
its parameters. If that descendant reaches the level it is the next source; if not,
a milder shrink (SHRINK[1]) is tried once, and the level waits for the sampler to find a smaller net there.

One descendant at a time is queued or training, and never two in a row: descents take at most every other training
slot and the sampler keeps exploring; workers sharing the storage do not queue the same step twice
(`skip_if_exists` guards the rest). Descendants are ordinary trials: they count towards --trials,
are pruned like any other, and carry `shrunk_from` and `shrink` user attributes. The search calls it through the
evolution step (search/evolution.py, `next_step`): descents and the evolution's children take turns in those slots.
"""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from search.record import TrialRecord
from search.space import MIN_TARGET

SHRINK = (0.8, 0.9)  # a descendant's parameter target, as a fraction of its source's parameters: first, then milder


def next_descent(trials: list[TrialRecord], levels: list[float]) -> tuple[dict, dict] | None:
    """(params, user_attrs) of the descendant to queue now, or None.

    At most one descendant is queued or training at a time, and never right after one: descents take at most every
    other training slot, the sampler the rest. Of the levels with a source left, the one descended least goes first.
    """
    children: dict[int, list[TrialRecord]] = {}
    per_level: dict[float, int] = {}
    for r in trials:
        if r.shrunk_from is not None:
            if r.state in (TrialState.WAITING, TrialState.RUNNING):
                return None
            children.setdefault(r.shrunk_from, []).append(r)
            per_level[r.attrs.get("descent_level")] = per_level.get(r.attrs.get("descent_level"), 0) + 1
    trained = [r for r in trials if r.is_trained and r.trial.datetime_complete is not None]
    if trained and max(trained, key=lambda r: r.trial.datetime_complete).shrunk_from is not None:
        return None
    done = [r for r in trials if r.is_candidate and r.n_params is not None and "param_target" in r.params]
    for level in sorted(levels, key=lambda lv: (per_level.get(lv, 0), -lv)):
        at_level = [r for r in done if r.values[0] >= level]
        if not at_level:
            continue
        source = min(at_level, key=lambda r: (r.n_params, -r.values[0], r.number))
        tried = {k.attrs.get("shrink") for k in children.get(source.number, [])}
        shrink = next((f for f in SHRINK if f not in tried), None)
        if shrink is None or int(source.n_params * shrink) < MIN_TARGET:
            continue
        return ({**source.params, "param_target": int(source.n_params * shrink)},
                {"shrunk_from": source.number, "shrink": shrink, "descent_level": level})
    return None


def queue_descent(study: optuna.Study, levels: list[float]) -> None:
    """Queue the descendant `next_descent` names, if any."""
    if not levels:
        return
    step = next_descent([TrialRecord(t) for t in study.get_trials(deepcopy=False)], levels)
    if step is not None:
        study.enqueue_trial(step[0], user_attrs=step[1], skip_if_exists=True)

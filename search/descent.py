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

An accuracy search can descend its winner instead (`next_winner_descent`, `--winner-descent`, off by default): once
the best has reached the target, the winner (the smallest completed net within the seed spread of the best,
search/choose.py) is queued again with its widths fitted to WINNER_SHRINK[0] of its parameters, then, if that did
not become the winner, to WINNER_SHRINK[1]. Sampled draws seldom reach the end of a 20-epoch training among good
nets (successive halving at epoch 1 is chance there: docs/search.md), so such a descendant is not halved; it stops
early only when the study's completed curves say it cannot come within the seed spread of the best
(search/pruning.py, `envelope_stop_reason`), judged from epoch 3. Before a best of one run bars a smaller net
within BAR_RERUN_SPREADS seed spreads of it, the best is re-run with the next seed (`bar_rerun`), and the mean of
its runs is the bar.
"""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from models.budget import count_params
from search.budgets import Budget
from search.choose import accuracy, rerun_seed, runs_of, smallest_within_spread
from search.record import TrialRecord, params_key
from search.space import ACCURACY_CHANNELS, MIN_TARGET, encode
from search.widths import fit_widths

SHRINK = (0.8, 0.9)  # a descendant's parameter target, as a fraction of its source's parameters: first, then milder
# Winner descent (accuracy searches): the incumbent's parameter targets, as fractions of its parameters: first,
# then milder. The winner is the smallest net within the seed spread of the best, and sampled nets larger than it
# are refused (the winner bound), so the next winner is smaller unless the best's bar moves (a re-run of the best
# lowers or raises the mean, a net that beats the best raises it); 0.6 asks for about 40% fewer
# parameters, the step from a 19,674-parameter preset to the 11,000-12,000 winners of the seed-1 searches
# (docs/search.md), 0.8 a milder one once that failed. Widths stay on the accuracy space's grid of 8.
WINNER_SHRINK = (0.6, 0.8)
# The best of a search is the highest of many one-seed figures, so it is the figure most likely to lie high: the
# `baseline` preset's validation accuracy was 99.59% with seed 0 and 99.50% with seed 1 (the default searches of
# docs/search.md). Before a single-run best keeps a smaller net out of the winner's place, it is re-run with the
# next seed, once, when that net lies within BAR_RERUN_SPREADS seed spreads of it: the difference of two single
# runs has a standard deviation of about 1.4 spreads, so within 2 the best's own noise may be what bars it.
BAR_RERUN_SPREADS = 2


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


def next_winner_descent(records: list[TrialRecord], target: float | None, slot_free: bool,
                        budget: Budget | None = None, taken: frozenset = frozenset()) -> tuple[dict, dict] | None:
    """(params, user_attrs) of the accuracy search's next winner descendant, or None; first, where `bar_rerun`
    says so, a re-run of the best with the seed after its own. None while `slot_free` is
    false (a step queued or training, or the trial completed last was one: every other slot at most), none before
    the best has reached `target`, and none once the winner has been shrunk by every WINNER_SHRINK fraction (a
    descendant that becomes the winner is shrunk in its turn). `records`: the study's finished candidates and
    evolution steps (search/tally.py, `evolution_records`); `taken`: the parameter keys (record.params_key) of every
    trial of the study (search/tally.py, `params_keys`), which no step repeats: Optuna would not queue it."""
    done = [r for r in records if r.is_candidate]
    if not slot_free or target is None or not done:
        return None
    winner, top, spread = smallest_within_spread(done)[:3]
    runs = runs_of(done)
    if accuracy(top, runs) < target:  # under the target the best is no bar (as the winner bound)
        return None
    rerun = bar_rerun(records, top, winner, runs, spread)
    if rerun is not None and params_key(rerun[0]) not in taken:
        return rerun
    tried = {r.attrs.get("shrink") for r in records if r.shrunk_from == winner.number}
    known = {params_key(r.params) for r in records} | taken
    low, _, step = ACCURACY_CHANNELS
    for fraction in WINNER_SHRINK:
        if fraction in tried:
            continue
        goal = int(winner.n_params * fraction)
        spec = fit_widths(winner.spec, goal, step=step, narrowest=low, shrink_only=True,
                          fits=None if budget is None or budget.only_params else budget.fits)
        if count_params(spec) > goal:  # even the narrowest widths are over: no descendant of this size
            continue
        try:
            params = encode(spec, winner.config)
        except ValueError:  # a repaired or hand-made spec outside the space: no descendant of it
            return None
        if params_key(params) not in known:
            return params, {"shrunk_from": winner.number, "shrink": fraction}
    return None


def bar_rerun(records: list[TrialRecord], top: TrialRecord, winner: TrialRecord, runs: dict[int, list[float]],
              spread: float) -> tuple[dict, dict] | None:
    """(params, user_attrs) re-running the best network `top` with the seed after its own (trained to the end, never
    pruned; its accuracy then the mean of its runs), or None: only while it has one run and was never queued again,
    and only when a completed net smaller than the `winner` lies outside the seed `spread` of it but within
    BAR_RERUN_SPREADS spreads."""
    if len(runs.get(top.number, ())) != 1 or any(r.attrs.get("rerun_of") == top.number for r in records):
        return None
    best = accuracy(top, runs)
    barred = [r for r in records if r.number in runs and r.is_candidate and r.n_params < winner.n_params
              and best - BAR_RERUN_SPREADS * spread <= accuracy(r, runs) < best - spread]
    if not barred:
        return None
    return {**top.params, "seed": rerun_seed(top)}, {"rerun_of": top.number, "seed": rerun_seed(top)}

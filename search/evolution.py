"""Evolution near the front (regularised, or aging, evolution): the search spends training slots on one-change
children of its best trials instead of waiting for random draws to land near them.

The population is the POPULATION most recently completed trials (re-runs count with their original, not alone):
older members age out and are no parents any more. A pareto search picks a parent by tournament: TOURNAMENT
members of the population's front are sampled and the smallest of them at the highest level any reached (the
target, then the floor; the most accurate where none reached one) wins. An accuracy search's parent is its
incumbent, the smallest member within the seed spread of the best (search/choose.py), and its children never add
parameters. A child changes ONE thing (search/space.py `mutations`: a width by the space's step, a conv added or
removed, a pool moved, one recipe value nudged) of the parent's encoding, so it is an ordinary enqueued trial with
fixed parameters, gated like any other (budget, receptive field, duplicate), with user attributes `parent` and
`mutation` ("width block 2 conv 1: 8 -> 6").

Ties are not improvements: a member is displaced from the front by a smaller or more accurate one only when the
other is ahead by the seed spread or more, or after the member has been re-run with another seed (its accuracy
then the mean of its runs, search/choose.py). A member that only a tie would displace is queued again first, with
the next seed (user attributes `rerun_of` and `seed`, which the objective trains with; the seed is also a fixed
parameter that the space never asks for, so that `skip_if_exists` tells one re-run from another).

Evolution steps (children, re-runs, front descendants) take at most every other training slot, one at a time, as
front descent's did: the sampler keeps exploring, and workers sharing a storage do not queue the same step twice
(`skip_if_exists`).
"""

from __future__ import annotations

import random
from typing import Callable

from models.budget import count_params
from models.spec import SpecError
from search.choose import accuracy, rerun_seed, runs_of, seed_spread, smallest_within_spread
from search.budgets import METRICS, Budget, figure_function, target_name
from search.record import TrialRecord, params_key
from search.space import ACCURACY_CHANNELS, PARETO_CHANNELS, decode, encode, mutations

# Completed trials in the population: about the completed trials of a 50-trial search, so that the presets and the
# sampler's first draws age out within a longer one. TOURNAMENT: members sampled per parent, a quarter of it as in
# regularised evolution (Real et al. 2019, population 100, sample 25). Neither is tuned on this search yet.
POPULATION = 20
TOURNAMENT = 5
STEP_ATTRS = ("parent", "rerun_of", "shrunk_from")  # user attributes that make a trial an evolution step


def is_step(r: TrialRecord) -> bool:
    return any(r.attrs.get(k) is not None for k in STEP_ATTRS)


def slot_free(records: list[TrialRecord]) -> bool:
    """No step waiting or training, and the trained trial completed last was not one: steps take every other slot."""
    if any(is_step(r) and not r.state.is_finished() for r in records):
        return False
    trained = [r for r in records if r.is_trained and r.trial.datetime_complete is not None]
    return not trained or not is_step(max(trained, key=lambda r: (r.trial.datetime_complete, -r.number)))


def has_size_target(params: dict) -> bool:
    """A pareto trial of the space: its parameters hold a drawn size target, of parameters or of another metric
    (a hand-made or repaired spec has none, and no child can be made of it)."""
    return any(target_name(metric) in params for metric in METRICS)


def population(records: list[TrialRecord], pareto: bool) -> list[TrialRecord]:
    """The POPULATION completed candidates finished last (re-runs are their original's runs, not members)."""
    members = [r for r in records if r.is_candidate and r.attrs.get("rerun_of") is None
               and r.trial.datetime_complete is not None and (not pareto or has_size_target(r.params))]
    return sorted(members, key=lambda r: (r.trial.datetime_complete, r.number))[-POPULATION:]


def front(members: list[TrialRecord], runs: dict[int, list[float]], spread: float,
          metric: str = "params") -> tuple[list, list]:
    """(the front, its members that only a tie displaces): `a` displaces `b` when it has no more of `metric` (the
    study's size metric) and no lower accuracy (one of them strictly better), and is ahead by `spread` or more, or
    `b` has been re-run."""
    kept, tied = [], []
    for b in members:
        acc_b, beaten, tie = accuracy(b, runs), False, False
        for a in members:
            acc_a = accuracy(a, runs)
            size_a, size_b = a.size(metric), b.size(metric)
            if a is b or size_a > size_b or acc_a < acc_b or (size_a == size_b and acc_a == acc_b):
                continue
            if acc_a - acc_b >= spread or len(runs.get(b.number, ())) >= 2:
                beaten = True
            else:
                tie = True
        if not beaten:
            kept.append(b)
            if tie:
                tied.append(b)
    return kept, tied


def tournament(members: list[TrialRecord], runs: dict, levels: list[float], rng: random.Random,
               metric: str = "params") -> TrialRecord:
    """The parent among TOURNAMENT sampled front members: the smallest at the highest level one of them reached,
    or the most accurate where none reached a level."""
    sample = rng.sample(members, min(TOURNAMENT, len(members)))
    for level in sorted(levels, reverse=True):
        reached = [r for r in sample if accuracy(r, runs) >= level]
        if reached:
            return min(reached, key=lambda r: (r.size(metric), -accuracy(r, runs), r.number))
    return max(sample, key=lambda r: (accuracy(r, runs), -r.size(metric), -r.number))


def rerun_step(records: list[TrialRecord], tied: list[TrialRecord], metric: str = "params") -> tuple[dict, dict] | None:
    """(params, user_attrs) re-running the smallest tied member (by `metric`) with the next seed, or None if each
    has one."""
    rerun = {r.attrs["rerun_of"] for r in records if r.attrs.get("rerun_of") is not None}
    for r in sorted(tied, key=lambda r: (r.size(metric), r.number)):
        if r.number not in rerun:
            return {**r.params, "seed": rerun_seed(r)}, {"rerun_of": r.number, "seed": rerun_seed(r)}
    return None


def child_step(parent: TrialRecord, pareto: bool, max_params: int, rng: random.Random,
               known: set, budget: Budget | None = None) -> tuple[dict, dict] | None:
    """(params, user_attrs) of a random one-change child of `parent` under `max_params` and every bound of `budget`,
    or None. In a pareto search the child's size target is its own figure of the budget's size metric, so that the
    space fits it no further."""
    channels = PARETO_CHANNELS if pareto else ACCURACY_CHANNELS
    metric = budget.size_metric if budget is not None else "params"
    try:
        base = encode(parent.spec, parent.config, param_target=pareto, size_metric=metric)
    except ValueError:  # a repaired or hand-made spec outside the space: no child of it
        return None
    options = mutations(base, channels, fewer=not pareto)
    rng.shuffle(options)
    for params, what in options:
        try:
            spec, _ = decode(params, channels, parent.spec.num_classes)
        except SpecError:
            continue  # a pool moved where the map would shrink below 1x1
        n_params = count_params(spec)
        if n_params >= max_params or (budget is not None and not budget.fits(spec)):
            continue
        if pareto:  # fit_widths leaves a spec of its own target as it is
            params = {**params, target_name(metric): figure_function(metric)(spec)}
        if params_key(params) not in known:
            return params, {"parent": parent.number, "mutation": what}
    return None


def next_step(records: list[TrialRecord], pareto: bool, levels: list[float], max_params: int,
              rng: random.Random, descend: Callable[[], tuple | None] | None = None,
              budget: Budget | None = None, taken: frozenset = frozenset()) -> tuple[dict, dict] | None:
    """(params, user_attrs) of the step to queue now, or None: a re-run of a tied front member first, else, in
    turns with front descent where `descend` gives its step (search/descent.py), a child of the parent. `taken`:
    the parameter keys (record.params_key) of every trial of the study, which no step repeats."""
    if not slot_free(records):
        return None
    done = [r for r in records if r.is_candidate]
    members = population(records, pareto)
    if not members:
        return descend() if descend else None
    runs, spread = runs_of(done), seed_spread(done)[0]
    metric = budget.size_metric if budget is not None else "params"
    kept, tied = front(members, runs, spread, metric)
    step = rerun_step(records, tied, metric)
    if step is not None and params_key(step[0]) not in taken:
        return step
    last = max((r for r in records if is_step(r)), key=lambda r: r.number, default=None)
    descent_first = descend is not None and (last is None or last.shrunk_from is None)
    if descent_first and (step := descend()) is not None:
        return step
    parent = tournament(kept, runs, levels, rng, metric) if pareto else smallest_within_spread(done)[0]
    known = {params_key(r.params) for r in records} | taken
    step = child_step(parent, pareto, max_params, rng, known, budget)
    if step is None and descend is not None and not descent_first:
        return descend()
    return step

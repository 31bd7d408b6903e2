"""Which stored trials `best` certifies: the winner (`--trial N`, the smallest net reaching a target, or the smallest
net within the seed spread of the best validation accuracy), or the accuracy/size front above a floor.

The seed spread: validation figures closer than it are one figure, as far as one training run can tell. A trial
re-run with other seeds (user attribute `rerun_of`: the evolution's re-runs of tied members, search/evolution.py,
and winner descent's re-run of the best, search/descent.py) counts as one network whose accuracy is the mean of
its runs."""

from __future__ import annotations

import statistics

import optuna

from search.budgets import describe
from search.record import (Outcome, TrialRecord, accuracy, best_of, candidates, network_rank, networks,  # noqa: F401
                           pareto_front, records, runs_of, smallest_reaching, study_size_metric)
from search.storage import SearchError

# Fraction: the largest 3-seed sample standard deviation of final-epoch test accuracy among the certified networks
# in the README's table (docs/search.md has their commands), the spread until the study has its own.
SEED_SPREAD = 0.001
SPREAD_MIN_GROUPS = 3  # networks trained with two or more seeds in the study before its own spread replaces it


def rerun_seed(r: TrialRecord) -> int:
    """The seed a re-run of `r` trains with: the one after its own (its stored config's), not after the worker's
    --seed, so that a resumed study or a worker with another --seed never re-runs it with the seed it was trained
    with (that run would be answered as a duplicate of it, and the re-run lost)."""
    return r.config.seed + 1


def seed_spread(done: list[TrialRecord]) -> tuple[float, str]:
    """(spread as a fraction, where it comes from): the pooled standard deviation of the study's own re-run
    networks once SPREAD_MIN_GROUPS have two runs or more, else SEED_SPREAD."""
    groups = [v for v in runs_of(done).values() if len(v) >= 2]
    if len(groups) < SPREAD_MIN_GROUPS:
        return SEED_SPREAD, "the measured 3-seed spread"
    pooled = statistics.fmean(statistics.variance(v) for v in groups) ** 0.5
    return pooled, f"the spread of the study's {len(groups)} re-run networks"


def smallest_within_spread(done: list[TrialRecord], metric: str = "params") -> tuple[TrialRecord, TrialRecord,
                                                                                    float, str]:
    """(winner, best, spread, where the spread comes from): the winner is the network smallest by `metric` (the
    study's size metric: parameters unless a pareto search was given another) whose accuracy is within the seed
    spread of the best network's (higher accuracy, then the lower number, break ties); re-runs count with their
    original, never alone."""
    nets, runs = networks(done)
    spread, source = seed_spread(done)
    top = max(nets, key=lambda r: network_rank(r, runs))
    bar = accuracy(top, runs) - spread - 1e-12  # a figure exactly `spread` under the best is within it
    within = [r for r in nets if accuracy(r, runs) >= bar]
    winner = min(within, key=lambda r: (r.size(metric), -accuracy(r, runs), r.number))
    return winner, top, spread, source


def size_words(r: TrialRecord, metric: str) -> str:
    """", peak activation memory 2,044 bytes": a trial's figure of a size metric other than parameters, for lines
    that already give its parameters ("" for parameters)."""
    return "" if metric == "params" else f", {describe(metric, r.size(metric))}"


def winner_line(done: list[TrialRecord], metric: str = "params") -> str:
    """The winner rule in words, for `best` and the leaderboard."""
    winner, top, spread, source = smallest_within_spread(done, metric)
    runs = runs_of(done)
    by = "" if metric == "params" else f" by {metric}"
    return (f"the smallest{by} within {spread * 100:.2g} points ({source}) of the best ({accuracy(top, runs):.2%}): "
            f"trial {winner.number}, {winner.n_params:,} params{size_words(winner, metric)}, "
            f"{accuracy(winner, runs):.2%}")


def pick_winner(study: optuna.Study, trial_number: int | None = None, target: float | None = None) -> TrialRecord:
    """The trial to certify: `--trial N`, exactly; in pareto studies with a target, the smallest net that reached
    it; otherwise the smallest feasible completed trial within the seed spread of the best (`smallest_within_spread`)."""
    if trial_number is not None:
        matches = [r for r in records(study) if r.number == trial_number]
        if not matches:
            raise SearchError(f"--trial {trial_number}: study {study.study_name!r} has trials 0 to "
                              f"{len(study.get_trials(deepcopy=False)) - 1}")
        chosen = matches[0]
        if not chosen.has_spec or chosen.stored_outcome == Outcome.REJECTED:
            raise SearchError(f"--trial {trial_number}: that trial was {chosen.attrs.get('outcome', 'never built')} "
                              f"({chosen.attrs.get('reason', 'no spec stored')}); pick a trained one")
        return chosen
    done = candidates(study)
    if not done:
        counts = len(study.get_trials(deepcopy=False))
        raise SearchError(f"study {study.study_name!r} has no completed trial within the budget yet "
                          f"({counts} trials stored); run search until one completes")
    if target is not None:
        smallest = smallest_reaching(done, target, study_size_metric(study))
        if smallest is None:
            top = best_of(done)
            raise SearchError(f"no completed network reached {target:.2%} validation accuracy (the best has "
                              f"{accuracy(top, runs_of(done)):.2%}); lower --target or search longer")
        return smallest
    return smallest_within_spread(done, study_size_metric(study))[0]


def front_to_certify(study: optuna.Study, floor: float) -> list[TrialRecord]:
    """The networks on the accuracy/size front whose validation accuracy (the mean of their runs) is at least
    `floor`, smallest first."""
    done = candidates(study)
    if not done:
        raise SearchError(f"study {study.study_name!r} has no completed trial within the budget yet; run search "
                          "until one completes")
    runs = runs_of(done)
    front = [r for r in pareto_front(done, study_size_metric(study)) if accuracy(r, runs) >= floor]
    if not front:
        top = best_of(done)
        raise SearchError(f"no network on the front reached the floor of {floor:.2%} validation accuracy (the best "
                          f"has {accuracy(top, runs):.2%}); lower --floor")
    return front

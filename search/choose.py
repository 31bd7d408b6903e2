"""Which stored trials `best` certifies: the winner (`--trial N`, the smallest net reaching a target, or the best
validation accuracy), or the accuracy/size front above a floor."""

from __future__ import annotations

import optuna

from search.record import (Outcome, TrialRecord, best_of, candidates, pareto_front, records, smallest_reaching)
from search.storage import SearchError


def pick_winner(study: optuna.Study, trial_number: int | None = None, target: float | None = None) -> TrialRecord:
    """The trial to certify: `--trial N`; in pareto studies with a target, the smallest net that reached it;
    otherwise the feasible completed trial with the highest validation accuracy (fewer parameters break ties)."""
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
        smallest = smallest_reaching(done, target)
        if smallest is None:
            top = max(r.values[0] for r in done)
            raise SearchError(f"no completed trial reached {target:.2%} validation accuracy (the best has {top:.2%}); "
                              "lower --target or search longer")
        return smallest
    return best_of(done)


def front_to_certify(study: optuna.Study, floor: float) -> list[TrialRecord]:
    """The trials on the accuracy/size front whose validation accuracy is at least `floor`, smallest first."""
    done = candidates(study)
    if not done:
        raise SearchError(f"study {study.study_name!r} has no completed trial within the budget yet; run search "
                          "until one completes")
    front = [r for r in pareto_front(done) if r.values[0] >= floor]
    if not front:
        top = max(r.values[0] for r in done)
        raise SearchError(f"no trial on the front reached the floor of {floor:.2%} validation accuracy (the best has "
                          f"{top:.2%}); lower --floor")
    return front

"""When a trial stops early: Optuna's pruners for accuracy studies, and successive halving by size for pareto studies
(Optuna's pruners handle single objectives only)."""

from __future__ import annotations

import math

import optuna
from optuna.trial import FrozenTrial, TrialState

from search.choose import accuracy, runs_of, smallest_within_spread
from search.record import TrialRecord

PRUNERS = ("sha", "hyperband", "median", "envelope", "none")
RUNG_FACTOR = 3  # successive halving: rungs at epochs 1, 3, 9; a third of the trials at a rung go on to the next
# A pareto trial still under NOT_LEARNING validation accuracy (fraction; five times chance on 10 classes) at a rung
# after NOT_LEARNING_IMAGES training images (an epoch of the full split) stops, rivals or not: it has not started to
# learn (most such draws lack BatchNorm or have a poor learning rate, docs/search.md). Without this floor the smallest
# of them, having no smaller rivals, would train all their epochs. Counted in images so that a quick look on a
# small --subset is not judged after a few hundred steps.
NOT_LEARNING = 0.5
NOT_LEARNING_IMAGES = 50_000
# The floor stop of a pareto search (`floor_stop_reason`): a trial whose best validation accuracy so far, plus the
# largest gain from that epoch to the last among the study's trials that ended at or above the floor, plus a margin,
# stays under the floor cannot join the front worth certifying. Judged from epoch FLOOR_FROM_EPOCH: replayed on a
# search's full-length curves, at epoch 1 it stopped a net that ended above the floor, at epoch 3 none (docs/search.md).
FLOOR_FROM_EPOCH = 3
FLOOR_MARGIN = 0.005  # fraction: half a point of slack over the largest gain seen
FLOOR_REFERENCES = 2  # trials that ended at or above the floor, needed before the floor stop judges anyone
# A descendant of the front descent (search/descent.py) meets its rivals from this epoch on, not at epoch 1: its
# layout and recipe have already reached the level it descends, and the small padded layouts' first epoch swings by
# points (a CPU pareto search halved a 0.9 shrink of `micro` at 79.97% after epoch 1; micro itself, 95.7% there,
# ended at 99.42%: docs/search.md). The not-learning stop still applies at every rung.
DESCENDANT_FROM_EPOCH = 3


def make_pruner(name: str, objective: str, epochs: int) -> optuna.pruners.BasePruner:
    """Optuna's pruner for an accuracy study. Pareto studies prune through `pareto_should_prune` instead."""
    if name == "none" or objective == "pareto":  # Optuna prunes single-objective studies only
        return optuna.pruners.NopPruner()
    if name == "envelope":
        return EnvelopePruner(epochs)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2)
    if name == "sha":  # the most aggressive of hyperband's brackets, alone: every trial is judged at epoch 1
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=RUNG_FACTOR,
                                                      min_early_stopping_rate=0)
    return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs, reduction_factor=RUNG_FACTOR)


def rungs(epochs: int) -> list[int]:
    """The epochs at which successive halving judges a trial: 1, 3, 9, ... below the last epoch."""
    out, r = [], 1
    while r < epochs:
        out.append(r)
        r *= RUNG_FACTOR
    return out


def pareto_should_prune(trials: list[FrozenTrial], number: int, size: float, epoch: int, val_acc: float,
                        images_seen: int = 0, descendant: bool = False, metric: str = "params") -> bool:
    """Successive halving for the accuracy/size front.

    At each rung a trial competes only with the trials that could dominate it: those no larger by `metric` (the
    study's --size-metric; `size` is this trial's figure of it) that
    reached the same epoch. It goes on if it is in the top third of them and itself (the best, while there are fewer
    than five rivals), so a small net is never pruned for being less accurate than bigger ones. A trial under
    NOT_LEARNING after `images_seen` >= NOT_LEARNING_IMAGES training images stops whatever its rivals. A
    `descendant` of the front descent meets its rivals from DESCENDANT_FROM_EPOCH on.
    """
    if images_seen >= NOT_LEARNING_IMAGES and val_acc < NOT_LEARNING:
        return True
    if descendant and epoch < DESCENDANT_FROM_EPOCH:
        return False
    rivals = sorted((r.history[epoch - 1]["val_acc"] for r in map(TrialRecord, trials)
                     if r.number != number and r.size(metric) <= size
                     and len(r.history) >= epoch), reverse=True)
    if not rivals:
        return False
    keep = max(1, (len(rivals) + 1) // RUNG_FACTOR)  # how many of rivals-plus-this-trial go on
    return val_acc < rivals[keep - 1]


def later_gains(trials: list[FrozenTrial], number: int, epoch: int, epochs: int, level: float) -> list[float]:
    """The gains, from the best validation accuracy by `epoch` to the final one, of the study's completed
    full-length trials (other than `number`) that ended at or above `level`: the curves' own envelope."""
    return [r.values[0] - max(e["val_acc"] for e in r.history[:epoch]) for r in map(TrialRecord, trials)
            if r.number != number and r.is_candidate and r.values[0] >= level and len(r.history) >= epochs > epoch]


def floor_stop_reason(trials: list[FrozenTrial], number: int, epoch: int, best_so_far: float, floor: float,
                      epochs: int) -> str | None:
    """Why a pareto trial at `epoch` (best validation accuracy `best_so_far`) should stop because it cannot reach
    `floor`, or None. Calibrated on the study itself: the gains, from the best accuracy at `epoch` to the final one,
    of the completed full-length trials that ended at or above the floor."""
    if epoch < FLOOR_FROM_EPOCH:
        return None
    gains = later_gains(trials, number, epoch, epochs, floor)
    if len(gains) < FLOOR_REFERENCES:
        return None
    reach = best_so_far + max(gains) + FLOOR_MARGIN
    if reach >= floor:
        return None
    return (f"stopped after epoch {epoch} at {best_so_far:.2%}: cannot reach the {floor:.2%} floor (--floor) with "
            f"the largest gain after epoch {epoch} of {len(gains)} trials that did, {max(gains) * 100:+.2f} points, "
            f"and {FLOOR_MARGIN * 100:.1f} more")


def envelope_stop_reason(trials: list[FrozenTrial], number: int, epoch: int, best_so_far: float,
                         epochs: int) -> str | None:
    """Why an accuracy trial at `epoch` should stop, or None: its best validation accuracy so far, plus the largest
    gain after `epoch` among the study's completed full-length trials, plus FLOOR_MARGIN, stays under the bar, the
    best network's accuracy (the mean of its runs, where the best was re-run) less the seed spread: the bar the
    winner is chosen against (search/choose.py, `smallest_within_spread`), so it cannot join the nets the winner is
    chosen from. Judged at every rung, epoch 1 included: there only a net that cannot catch up by the
    completed trials' own curves stops, however the good nets rank there. Needs FLOOR_REFERENCES completed trials."""
    done = [r for r in map(TrialRecord, trials) if r.number != number and r.is_candidate]
    gains = later_gains(trials, number, epoch, epochs, level=-math.inf)
    if len(gains) < FLOOR_REFERENCES or not done:
        return None
    top, spread = smallest_within_spread(done)[1:3]
    bar = accuracy(top, runs_of(done)) - spread
    if best_so_far + max(gains) + FLOOR_MARGIN >= bar:
        return None
    return (f"stopped after epoch {epoch} at {best_so_far:.2%}: cannot come within {spread * 100:.2g} points of the "
            f"best ({bar + spread:.2%}) with the largest gain after epoch {epoch} of {len(gains)} completed trials, "
            f"{max(gains) * 100:+.2f} points, and {FLOOR_MARGIN * 100:.1f} more")


class EnvelopePruner(optuna.pruners.BasePruner):
    """`--pruner envelope`: `envelope_stop_reason` at the rungs (epochs 1, 3, 9 below the last), for accuracy
    studies. The reason is the objective's default one ("pruned after epoch N at X%")."""

    def __init__(self, epochs: int):
        self.epochs, self.rungs = epochs, set(rungs(epochs))

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        epoch = trial.last_step
        if epoch is None or epoch not in self.rungs:
            return False
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        best_so_far = max(trial.intermediate_values.values())
        return envelope_stop_reason(done, trial.number, epoch, best_so_far, self.epochs) is not None

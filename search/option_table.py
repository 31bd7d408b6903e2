"""The command line's bounds, defaults and choices, each read from where it is declared (SearchOptions, TrainConfig,
the rules, the tuples of samplers, pruners, optimizers, schedules and devices), so that the CLI, its help text and a
Python caller cannot drift apart. Bounds are inclusive; `note` follows the limit in a refusal."""

from __future__ import annotations

import inspect
from dataclasses import MISSING, dataclass, fields
from enum import Enum

from models.rules import RULES
from search.data import DEFAULT_ROOT, ENV_VAR, FILES, KNOWN, N_VAL, SIDE
from search.descent import SHRINK, WINNER_SHRINK
from search.engine.config import (DEVICES, OPTIMIZERS, SCHEDULES, SMALL_NET_LABEL_SMOOTHING,  # noqa: F401
                                  SMALL_NET_PARAMS, TrainConfig)
from search.budgets import METRICS
from search.options import FLOOR_BELOW_TARGET, MAX_FIGURE, OBJECTIVES, SAMPLERS, SearchOptions, default_floor
from search.pruning import PRUNERS, rungs
from search.retrain import certify


def _defaults(cls) -> dict:
    return {f.name: f.default for f in fields(cls) if f.default is not MISSING}


SEARCH = _defaults(SearchOptions)  # trials, study, epochs, min_rf, max_rejections, heartbeat, ...
TRAIN = _defaults(TrainConfig)  # the recipe a target without a trial of its own trains with
CERTIFY_SEEDS = inspect.signature(certify).parameters["seeds"].default
TRAIN_IMAGES = FILES["train-images-idx3-ubyte"][1]  # 60,000: what `best` and `certify` retrain on
SEARCH_IMAGES = TRAIN_IMAGES - N_VAL  # 50,000: the search's training split, the rest held out for validation
MNIST_TARGET = KNOWN["mnist"].target  # fraction
MAX_SEEDS = 10
MAX_CERTIFY_EPOCHS = 1000  # accepted, and refused by the rules past RULES.max_epochs (exit 1, not 2)
MIN_SUBSET = 100  # training images: fewer train nothing worth comparing


@dataclass(frozen=True)
class Bound:
    lo: float
    hi: float | None = None
    note: str = ""

    def refusal(self, value) -> str | None:
        """Why `value` is out of bounds, naming the value and the limit; None inside them (or for None)."""
        if value is None or (self.lo <= value and (self.hi is None or value <= self.hi)):
            return None
        limit = f"must be from {self.lo:,} to {self.hi:,}" if self.hi is not None else f"must be at least {self.lo:,}"
        return f"{value} {limit}{self.note}"


AT_LEAST_1 = Bound(1)
INDEX = Bound(0)  # a trial number or a seed
PERCENT = Bound(0, 100, " percent")
BOUNDS = {
    "trials": AT_LEAST_1, "max_params": AT_LEAST_1, "jobs": AT_LEAST_1, "max_rejections": AT_LEAST_1,
    "threads": AT_LEAST_1,
    "epochs": Bound(1, RULES.max_epochs, f" (the exercise allows at most {RULES.max_epochs} epochs)"),
    "subset": Bound(MIN_SUBSET, SEARCH_IMAGES, " training images"),
    "min_rf": Bound(1, SIDE),
    "seeds": Bound(1, MAX_SEEDS),
    "certify_epochs": Bound(1, MAX_CERTIFY_EPOCHS),
    "batch_size": Bound(1, TRAIN_IMAGES),
    "max_figure": Bound(1, MAX_FIGURE),  # --max-macs, --max-activation-bytes, --max-model-bytes
}


def choices(name: str, values: tuple[str, ...]) -> type[Enum]:
    """A str Enum of `values`, in their order, for typer's choice options."""
    return Enum(name, {v: v for v in values}, type=str)


Objective = choices("Objective", OBJECTIVES)
SizeMetric = choices("SizeMetric", METRICS)
SamplerName = choices("SamplerName", SAMPLERS)
PrunerName = choices("PrunerName", PRUNERS)
DeviceName = choices("DeviceName", DEVICES)
OptimizerName = choices("OptimizerName", OPTIMIZERS)
ScheduleName = choices("ScheduleName", SCHEDULES)

# Numbers the help text says, from their declarations.
HEARTBEAT = ",".join(map(str, SEARCH["heartbeat"]))
RUNGS = ", ".join(map(str, rungs(RULES.max_epochs)))
SHRINKS = ", then ".join(f"{s:g}" for s in SHRINK)
WINNER_SHRINKS = ", then ".join(f"{s:g}" for s in WINNER_SHRINK)
FLOOR_POINTS = f"{FLOOR_BELOW_TARGET * 100:g}"  # percentage points under the target
MNIST_TARGET_PERCENT = f"{MNIST_TARGET * 100:g}"
MNIST_FLOOR_PERCENT = f"{default_floor(MNIST_TARGET) * 100:.1f}"
DATA_ROOT = f"${ENV_VAR}, else {DEFAULT_ROOT}"

"""A search's budgets: the four figures of a candidate, from its spec alone (no torch, before any training), the
bounds a search puts on them, and the refusal of a figure at or over its bound.

The figures: parameters (models.budget), MACs per image, peak activation memory in int8 bytes and the int8 model
size in bytes (models/resources.py states how each is counted: batch 1, the 28x28 input image counts as the first
layer's input, BatchNorm folded). Each bound is exclusive, like --max-params: a figure must stay under it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from models.budget import count_params
from models.spec import NetSpec
from models.resources import spec_resources

METRICS = ("params", "macs", "activation-bytes", "model-bytes")
# The user attribute each figure is stored under on a trial (and its trials.csv column).
ATTRS = {"params": "n_params", "macs": "macs", "activation-bytes": "activation_bytes", "model-bytes": "model_bytes"}
# Which Resources field (models/resources.py) holds each figure but parameters, which the verdict counts.
RESOURCE_FIELDS = {"macs": "macs", "activation-bytes": "peak_activation_bytes", "model-bytes": "int8_bytes"}
# What a refusal calls each figure: (words before the number, unit after it).
_WORDS = {"params": ("", " parameters"), "macs": ("MACs ", " per image"),
          "activation-bytes": ("peak activation memory ", " bytes"), "model-bytes": ("int8 model size ", " bytes")}

# A table column's heading for each figure.
HEADINGS = {"params": "params", "macs": "MACs", "activation-bytes": "peak activation (B)",
            "model-bytes": "int8 model (B)"}


def front_columns(metric: str) -> list[tuple[str, str]]:
    """(heading, front.json key) of the size columns a front table shows: parameters, and the study's size metric
    where that is another."""
    return [(HEADINGS[m], ATTRS[m]) for m in dict.fromkeys(("params", metric))]


def option_name(metric: str) -> str:
    """The option bounding the figure: --max-params, --max-macs, --max-activation-bytes, --max-model-bytes."""
    return f"--max-{metric}"


def describe(metric: str, value: int) -> str:
    """The figure in words: "peak activation memory 3,488 bytes"."""
    before, unit = _WORDS[metric]
    return f"{before}{value:,}{unit}"


def figure_function(metric: str) -> Callable[[NetSpec], int]:
    """The function that computes one figure of a spec."""
    if metric == "params":
        return count_params
    field_of = RESOURCE_FIELDS[metric]
    return lambda spec: getattr(spec_resources(spec), field_of)


def figures(spec: NetSpec) -> dict[str, int]:
    """All four figures of a spec, by metric."""
    resources = spec_resources(spec)
    return {"params": count_params(spec), "macs": resources.macs,
            "activation-bytes": resources.peak_activation_bytes, "model-bytes": resources.int8_bytes}


@dataclass(frozen=True)
class Budget:
    """The bounds of a search (metric -> bound; params always there) and the figure a pareto search minimises."""

    limits: dict[str, int] = field(default_factory=dict)
    size_metric: str = "params"
    min_rf: int = 12  # pixels: the space's smallest figures are those of nets seeing at least this much

    @property
    def only_params(self) -> bool:
        """No bound but --max-params and the default size metric: the search behaves as before these budgets."""
        return set(self.limits) <= {"params"} and self.size_metric == "params"

    def over(self, spec: NetSpec, skip_params: bool = True) -> list[str]:
        """One reason per bound the spec's figures meet or exceed; the parameter budget's own reason comes from
        models.budget.check, so it is skipped unless asked for."""
        values = figures(spec)
        return [f"{describe(m, values[m])}, at or over {option_name(m)} {bound:,}"
                for m, bound in self.limits.items() if values[m] >= bound and not (skip_params and m == "params")]

    def fits(self, spec: NetSpec) -> bool:
        """Every figure under its bound."""
        return not self.over(spec, skip_params=False)

    def constraint(self, values: dict[str, int]) -> float:
        """The sampler's constraint value (positive: infeasible): the largest excess over a bound, in the bound's
        own unit, plus one (a figure equal to its bound is over it)."""
        return float(max(values[m] - bound + 1 for m, bound in self.limits.items()))


def target_name(metric: str) -> str:
    """The trial parameter a pareto search draws its size target under: `param_target` for parameters (as every
    study before these budgets), `<attr>_target` for the others. Evolution's children carry their own figure under
    this name (search/evolution.py); front descent shrinks parameter targets only, so it leaves those studies alone."""
    return "param_target" if metric == "params" else f"{ATTRS[metric]}_target"


def resource_refusals(resources, bounds: dict[str, int]) -> list[str]:
    """One reason per bound (metric -> bound, without params) that a network's measured Resources meet or exceed,
    or cannot show they meet: a figure that could not be measured is not taken to fit."""
    reasons = []
    for metric, bound in bounds.items():
        value = getattr(resources, RESOURCE_FIELDS[metric])
        if value is None:
            reasons.append(f"{_WORDS[metric][0].strip()} not measured, so {option_name(metric)} {bound:,} cannot "
                           "be judged")
        elif value >= bound:
            reasons.append(f"{describe(metric, value)}, at or over {option_name(metric)} {bound:,}")
    return reasons

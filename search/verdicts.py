"""The rules judged without training (parameters, fully connected operations, epochs, the budget asked for) and the
accuracy rule over the seeds' final test accuracies: the rows a certificate holds."""

from __future__ import annotations

import statistics

import torch

from models.budget import check, check_module
from models.rules import RULES
from models.spec import NetSpec


def judge_rules(module: torch.nn.Module | None, spec: NetSpec | None, epochs: int, classes: int,
                max_params: int = RULES.max_params) -> tuple[list[dict], int, list[str]]:
    """The rules judged without training: (rows, parameters, other reasons the module fails). Rows hold the
    exercise's parameter, fully connected and epoch rules, then `max_params` when it is not the exercise's.
    `module` None: a spec too large to build (over MAX_BUILT_PARAMS), judged on the spec alone."""
    verdicts = [check(spec, max_params)] if spec is not None else []
    if module is not None:
        verdicts.append(check_module(module, max_params=max_params,
                                     num_classes=spec.num_classes if spec is not None else classes))
    n_params = max(v.n_params for v in verdicts)
    # A spec's whole-map conv is seen twice, on the spec and on the module it builds, in other words: said once, in
    # the spec's words (its layer names); the module's only where the spec's check sees nothing fully connected.
    per_verdict = [[r for r in v.reasons if "fully connected" in r] for v in verdicts]
    fully_connected = next((found for found in per_verdict if found), [])
    other = [r for r in (verdicts[-1].reasons if module is not None else ())
             if "fully connected" not in r and "budget" not in r]
    rows = [
        {"rule": RULES.params_rule(), "figure": f"{n_params:,}", "pass": n_params < RULES.max_params},
        {"rule": RULES.fc_rule(), "figure": "; ".join(fully_connected) or "none: every operation on activations is a known local one (docs/verdict.md)",
         "pass": not fully_connected},
        {"rule": RULES.epochs_rule(), "figure": str(epochs), "pass": epochs <= RULES.max_epochs},
    ]
    if max_params != RULES.max_params:
        rows.append({"rule": f"{RULES.params_rule(max_params)} (the budget asked for, not one of the exercise's "
                             "rules)", "figure": f"{n_params:,}", "pass": n_params < max_params})
    return rows, n_params, other


def accuracy_row(finals: list[float], target: float | None, dataset: str) -> tuple[dict, float, float]:
    """The accuracy rule over the seeds' final-epoch test accuracies: (row, mean, sample sd). `target` None: the
    accuracy is reported, not judged."""
    mean = statistics.fmean(finals)
    std = statistics.stdev(finals) if len(finals) > 1 else 0.0
    shown = RULES.accuracy_text(mean, target)
    figure = f"{shown} +- {std:.2%}" if len(finals) > 1 else f"{shown} (one seed: no spread)"
    if target is None:
        return ({"rule": f"final-epoch test accuracy (mean of {len(finals)}; no target for {dataset}: not judged)",
                 "figure": figure, "pass": True}, mean, std)
    return {"rule": RULES.accuracy_rule(len(finals), target), "figure": figure, "pass": mean >= target}, mean, std

"""The block-builder's search space: every `trial.suggest_*` call, in one function.

A network is 1 to 3 conv blocks of 1 to 3 3x3 convs, each block with its own widths, padding and pool, optionally
followed by a 1x1 transition; BatchNorm and dropout are shared choices; the head is a 1x1 conv and global average
pooling in either order. Training choices: optimizer, learning rate, batch size, schedule, label smoothing,
augmentation strength. The epochs are the study's, not searched.

Widths: multiples of 8 from 8 for an accuracy search, steps of 2 from 4 for a pareto search (PARETO_CHANNELS).
With `param_target` (pareto searches) the trial also draws a parameter count, log-uniform from 1,000 to the budget,
and every width is scaled by one factor so that the network has as many parameters as fit under it
(`search/widths.py`): the trials then spread over the whole parameter axis instead of clustering where random widths
land (mostly over the budget). With another `--size-metric` (search/budgets.py) the target is of that figure,
from the smallest the space makes to its bound, and the widths fit under every bound at once.

Layouts that shrink the map below 1x1 raise `SpecError` from `NetSpec` and are rejected like over-budget ones.
`encode(spec, cfg)` is the inverse of `suggest` for specs inside the space (presets, to enqueue as warm start).
"""

from __future__ import annotations

import functools
import re

import optuna

from models.rules import RULES
from models.spec import Conv, ConvBlock, Head, NetSpec, Transition
from search.engine.config import WEIGHT_DECAY, TrainConfig
from search.budgets import Budget, describe, figure_function, figures, option_name, target_name
from search.widths import NARROWEST, fit_widths

MAX_BLOCKS = 3
# Channels per conv, (low, high, step). A pareto search draws them in steps of 2 from 4: the sub-5k hand-made nets use
# 4, 6 and 12 channels, and `fit_widths` scales them to the trial's parameter target anyway. Widths off the multiples
# of 8 cost CPU time per MAC, and the nets they make are small and slow per parameter: an accuracy search, whose
# winners sit near the budget, draws multiples of 8 and keeps its time (docs/search.md has the figures).
# With 3 blocks of 3 convs either reaches far past 20k, with 1 block of 1 conv under 100 parameters.
PARETO_CHANNELS = (4, 40, 2)
ACCURACY_CHANNELS = (8, 40, 8)
MIN_TARGET = 1_000  # parameters: the small end of a pareto search's parameter targets
LR = {"sgd": (0.01, 0.4), "adamw": (5e-4, 2e-2)}  # peak learning rate ranges, log-uniform
BATCH_SIZES = (64, 128, 256)  # images per step
DROPOUT = (0.0, 0.15)
LABEL_SMOOTHING = (0.0, 0.15)
AUGMENT = (0.0, 1.5)


def suggest(trial: optuna.trial.BaseTrial, epochs: int = TrainConfig.epochs, seed: int = 0,
            param_target: bool = False, max_params: int = RULES.max_params, num_classes: int = 10,
            channels: tuple[int, int, int] | None = None, budget: Budget | None = None) -> tuple[NetSpec, TrainConfig]:
    """The trial's network and training config. `param_target`: a pareto trial (a drawn parameter target, widths in
    PARETO_CHANNELS; with a `budget`, a target of its size metric, fitted under all its bounds); `channels`
    overrides the widths' (low, high, step)."""
    low, high, step = channels or (PARETO_CHANNELS if param_target else ACCURACY_CHANNELS)

    def width(name: str) -> int:
        return trial.suggest_int(name, low, high, step=step)

    n_blocks = trial.suggest_int("n_blocks", 1, MAX_BLOCKS)
    batchnorm = trial.suggest_categorical("batchnorm", [True, False])
    dropout = trial.suggest_float("dropout", *DROPOUT)
    blocks: list = []
    for i in range(1, n_blocks + 1):
        n_convs = trial.suggest_int(f"b{i}_convs", 1, 3)
        padding = trial.suggest_int(f"b{i}_padding", 0, 1)
        convs = tuple(Conv(width(f"b{i}_c{j}"), 3, padding) for j in range(1, n_convs + 1))
        pool = trial.suggest_categorical(f"b{i}_pool", [True, False])
        blocks.append(ConvBlock(convs, batchnorm, dropout, pool))
        if i < n_blocks and trial.suggest_categorical(f"t{i}", [True, False]):
            blocks.append(Transition(width(f"t{i}_c"), batchnorm, False))
    head = Head(trial.suggest_categorical("head", ["conv_gap", "gap_conv"]))

    optimizer = trial.suggest_categorical("optimizer", ["sgd", "adamw"])
    cfg = TrainConfig(
        epochs=epochs,
        batch_size=trial.suggest_categorical("batch_size", list(BATCH_SIZES)),
        optimizer=optimizer,
        lr=trial.suggest_float(f"{optimizer}_lr", *LR[optimizer], log=True),
        weight_decay=WEIGHT_DECAY[optimizer],
        schedule=trial.suggest_categorical("schedule", ["onecycle", "cosine", "step"]),
        label_smoothing=trial.suggest_float("label_smoothing", *LABEL_SMOOTHING),
        augment=trial.suggest_float("augment", *AUGMENT),
        seed=seed,
    )
    spec = NetSpec(tuple(blocks), head, num_classes=num_classes)
    if param_target and (budget is None or budget.only_params):
        spec = fit_widths(spec, trial.suggest_int("param_target", MIN_TARGET, max_params - 1, log=True))
    elif param_target:
        spec = _fit_to_budget(trial, spec, budget)
    return spec, cfg


def _fit_to_budget(trial: optuna.trial.BaseTrial, spec: NetSpec, budget: Budget) -> NetSpec:
    """A target of the budget's size metric, log-uniform from the smallest the space makes (parameters: from
    MIN_TARGET, as always) to its bound, and the widths fitted to it under every bound of the budget at once."""
    metric = budget.size_metric
    low = MIN_TARGET if metric == "params" else smallest_figure(metric, budget.min_rf, narrowest_width(budget))
    high = max(low, budget.limits[metric] - 1)
    target = trial.suggest_int(target_name(metric), low, high, log=True)
    return fit_widths(spec, target, narrowest=narrowest_width(budget), figure=figure_function(metric),
                      fits=budget.fits)


def smallest_params(min_rf: int) -> int:
    """Parameters of the smallest network the space can make (every width at the narrowest `fit_widths` gives)
    whose receptive field is at least `min_rf` px: under this budget every candidate is refused."""
    return smallest_figure("params", min_rf)


# An activation bound is met by narrow convs at full resolution: every 28x28 map costs 784 int8 bytes per channel,
# so a 4-channel first conv holds 784 + 2,704 = 3,488 bytes, over µNAS's 2,500 for MNIST. Under an activation bound
# the widths fit down to 1 channel (the narrowest repair gives too): a first block of convs of 1 and 2 channels
# holds 784 + 676 = 1,460 and 676 + 1,152 = 1,828 bytes, and the layers after the first pool take the rest of the
# target. With the fit's usual narrowest, 2, only a first block of one conv and a pool meets 2,500 (2,136 bytes),
# about 1 sampled layout in 15; with 1, about 2 in 5. Chosen over a stride-2 first conv, which would need a stride
# in the spec format (and so in every stored spec, key, build and verdict).
NARROWEST_UNDER_ACTIVATION = 1  # channels


def narrowest_width(budget: Budget | None) -> int:
    """The narrowest width the space fits to under `budget`."""
    return NARROWEST_UNDER_ACTIVATION if budget is not None and "activation-bytes" in budget.limits else NARROWEST


def smallest_figure(metric: str, min_rf: int, narrowest: int = NARROWEST) -> int:
    """The smallest figure (search/budgets.py: params, macs, activation-bytes, model-bytes) of a network the space
    can make, every width at `narrowest` (what `fit_widths` gives), with a receptive field of at least `min_rf` px:
    a bound at or under it refuses every candidate."""
    return _smallest_figures(min_rf, narrowest).get(metric, 10**9)


@functools.lru_cache(maxsize=None)
def _smallest_figures(min_rf: int, narrowest: int) -> dict[str, int]:
    """smallest_figure for every metric at once: one walk of the 1,884 narrowest layouts (1.5 s on the 2-core CPU)."""
    from itertools import product

    from models.budget import analyze
    from models.spec import SpecError

    best: dict[str, int] = {}
    for n_blocks in range(1, MAX_BLOCKS + 1):
        for convs, paddings, pools in product(product((1, 2, 3), repeat=n_blocks), product((0, 1), repeat=n_blocks),
                                              product((True, False), repeat=n_blocks)):
            blocks = tuple(ConvBlock(tuple(Conv(narrowest, 3, p) for _ in range(n)), True, 0.0, pool)
                           for n, p, pool in zip(convs, paddings, pools))
            try:
                spec = NetSpec(blocks, Head("conv_gap"))
                analysis = analyze(spec)
            except SpecError:
                continue
            if (analysis.receptive_field or 0) >= min_rf:
                for metric, value in figures(spec).items():
                    best[metric] = min(value, best.get(metric, value))
    return best


def unmeetable_bound(budget: Budget) -> str | None:
    """Why a bound of `budget` refuses every network of the space (naming the smallest figure it makes), or None."""
    for metric, bound in budget.limits.items():
        smallest = smallest_figure(metric, budget.min_rf, narrowest_width(budget))
        if bound <= smallest:
            return (f"{option_name(metric)}={bound:,}: the smallest network of the search space with a receptive "
                    f"field of at least {budget.min_rf} px (--min-rf) has {describe(metric, smallest)}; give a "
                    f"budget above {smallest:,}")
    return None


def encode(spec: NetSpec, cfg: TrainConfig, param_target: bool = False, size_metric: str = "params") -> dict:
    """The parameters that make `suggest` return this spec and config; ValueError if it lies outside the space.
    With `param_target`, the target is the spec's own figure of `size_metric`, which `fit_widths` leaves as it is
    (when it fits the other bounds: a preset over one is refused by the budget gate)."""
    conv_blocks = [b for b in spec.blocks if isinstance(b, ConvBlock)]
    params: dict = {"n_blocks": len(conv_blocks), "head": spec.head.kind, "optimizer": cfg.optimizer,
                    "batch_size": cfg.batch_size, f"{cfg.optimizer}_lr": cfg.lr, "schedule": cfg.schedule,
                    "label_smoothing": cfg.label_smoothing, "augment": cfg.augment}
    i = 0
    for block in spec.blocks:
        if isinstance(block, ConvBlock):
            i += 1
            paddings = {c.padding for c in block.convs}
            if len(paddings) != 1 or any(c.kernel != 3 for c in block.convs):
                raise ValueError(f"block {i}: mixed paddings or 1x1 convs lie outside the search space")
            params.update({"batchnorm": block.batchnorm, "dropout": block.dropout, f"b{i}_convs": len(block.convs),
                           f"b{i}_padding": paddings.pop(), f"b{i}_pool": block.pool})
            params.update({f"b{i}_c{j}": c.out_channels for j, c in enumerate(block.convs, start=1)})
            if i < len(conv_blocks):
                params[f"t{i}"] = False
        else:
            if block.pool or f"t{i}_c" in params:
                raise ValueError(f"transition after block {i}: pooled or repeated transitions lie outside the space")
            params[f"t{i}"] = True
            params[f"t{i}_c"] = block.out_channels
    if param_target:
        params[target_name(size_metric)] = figure_function(size_metric)(spec)
    return params


# ---- mutation: one change to a trial's parameters (search/evolution.py) ------------------------------------------
LR_FACTOR = 1.5  # a learning-rate nudge multiplies or divides the peak rate by this (the space's range is 40-fold)
# One nudge of a float recipe value: about a sixth of its range (LABEL_SMOOTHING, AUGMENT, DROPOUT above).
RECIPE_STEPS = {"label_smoothing": 0.025, "augment": 0.25, "dropout": 0.025}
RECIPE_RANGES = {"label_smoothing": LABEL_SMOOTHING, "augment": AUGMENT, "dropout": DROPOUT}


def decode(params: dict, channels: tuple[int, int, int], num_classes: int = 10) -> tuple[NetSpec, TrainConfig]:
    """The spec and config `suggest` makes of fixed `params` (widths as given: no parameter target is fitted).
    Raises SpecError for a layout that shrinks the map below 1x1."""
    import warnings

    with warnings.catch_warnings():  # fixed widths may lie off the space's grid (fitted or preset widths)
        warnings.simplefilter("ignore", UserWarning)
        return suggest(optuna.trial.FixedTrial(params), channels=channels, num_classes=num_classes)


def mutations(params: dict, channels: tuple[int, int, int], fewer: bool = False) -> list[tuple[dict, str]]:
    """Every child of `params` (as `encode` gives them) that changes ONE thing, with its description: a width by
    the space's step, a conv added to or removed from a block, a pool moved to another block, one recipe value
    nudged. `fewer`: only changes that add no parameters (an accuracy search's step from its incumbent)."""
    return (_width_mutations(params, channels, fewer) + _conv_mutations(params, fewer) + _pool_mutations(params)
            + _recipe_mutations(params))


def _width_mutations(params: dict, channels: tuple[int, int, int], fewer: bool) -> list[tuple[dict, str]]:
    low, high, step = channels
    out = []
    for key in sorted(k for k in params if re.fullmatch(r"b\d_c\d|t\d_c", k)):
        old = params[key]
        where = (f"transition {key[1]}" if key.startswith("t") else f"block {key[1]} conv {key.split('_c')[1]}")
        for new in (old - step, old + step):
            if (new < old or not fewer) and low <= new <= high:
                out.append(({**params, key: new}, f"width {where}: {old} -> {new}"))
    return out


def _conv_mutations(params: dict, fewer: bool) -> list[tuple[dict, str]]:
    out = []
    for i in range(1, params["n_blocks"] + 1):
        n = params[f"b{i}_convs"]
        if n > 1:
            child = {k: v for k, v in params.items() if k != f"b{i}_c{n}"}
            out.append(({**child, f"b{i}_convs": n - 1}, f"conv removed from block {i}: {n} -> {n - 1} convs"))
        if n < 3 and not fewer:  # the new conv as wide as the block's last
            out.append(({**params, f"b{i}_convs": n + 1, f"b{i}_c{n + 1}": params[f"b{i}_c{n}"]},
                        f"conv added to block {i}: {n} -> {n + 1} convs"))
    return out


def _pool_mutations(params: dict) -> list[tuple[dict, str]]:
    blocks = range(1, params["n_blocks"] + 1)
    return [({**params, f"b{i}_pool": False, f"b{k}_pool": True}, f"pool moved from block {i} to block {k}")
            for i in blocks if params[f"b{i}_pool"] for k in blocks if not params[f"b{k}_pool"]]


def _recipe_mutations(params: dict) -> list[tuple[dict, str]]:
    out = []
    lr_key = f"{params['optimizer']}_lr"
    lr_low, lr_high = LR[params["optimizer"]]
    for new in (params[lr_key] / LR_FACTOR, params[lr_key] * LR_FACTOR):
        if lr_low <= new <= lr_high:
            out.append(({**params, lr_key: new}, f"lr: {params[lr_key]:.3g} -> {new:.3g}"))
    at = BATCH_SIZES.index(params["batch_size"]) if params["batch_size"] in BATCH_SIZES else None
    for j in ([] if at is None else (at - 1, at + 1)):
        if 0 <= j < len(BATCH_SIZES):
            out.append(({**params, "batch_size": BATCH_SIZES[j]}, f"batch size: {params['batch_size']} -> {BATCH_SIZES[j]}"))
    for key, step in RECIPE_STEPS.items():
        low, high = RECIPE_RANGES[key]
        for new in (round(params[key] - step, 6), round(params[key] + step, 6)):
            if low <= new <= high:
                out.append(({**params, key: new}, f"{key.replace('_', ' ')}: {params[key]:.3g} -> {new:.3g}"))
    return out

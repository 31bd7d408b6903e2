"""The block-builder's search space: every `trial.suggest_*` call, in one function.

A network is 1 to 3 conv blocks of 1 to 3 3x3 convs, each block with its own widths, padding and pool, optionally
followed by a 1x1 transition; BatchNorm and dropout are shared choices; the head is a 1x1 conv and global average
pooling in either order. Training choices: optimizer, learning rate, batch size, schedule, label smoothing,
augmentation strength. The epochs are the study's, not searched.

Widths: multiples of 8 from 8 for an accuracy search, steps of 2 from 4 for a pareto search (PARETO_CHANNELS).
With `param_target` (pareto searches) the trial also draws a parameter count, log-uniform from 1,000 to the budget,
and every width is scaled by one factor so that the network has as many parameters as fit under it
(`search/widths.py`): the trials then spread over the whole parameter axis instead of clustering where random widths
land (mostly over the budget).

Layouts that shrink the map below 1x1 raise `SpecError` from `NetSpec` and are rejected like over-budget ones.
`encode(spec, cfg)` is the inverse of `suggest` for specs inside the space (presets, to enqueue as warm start).
"""

from __future__ import annotations

import functools

import optuna

from models.budget import count_params
from models.rules import RULES
from models.spec import Conv, ConvBlock, Head, NetSpec, Transition
from search.engine.config import WEIGHT_DECAY, TrainConfig
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
            channels: tuple[int, int, int] | None = None) -> tuple[NetSpec, TrainConfig]:
    """The trial's network and training config. `param_target`: a pareto trial (a drawn parameter target, widths in
    PARETO_CHANNELS); `channels` overrides the widths' (low, high, step)."""
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
    if param_target:
        spec = fit_widths(spec, trial.suggest_int("param_target", MIN_TARGET, max_params - 1, log=True))
    return spec, cfg


@functools.lru_cache(maxsize=None)
def smallest_params(min_rf: int) -> int:
    """Parameters of the smallest network the space can make (every width at the narrowest `fit_widths` gives)
    whose receptive field is at least `min_rf` px: under this budget every candidate is refused."""
    from itertools import product

    from models.budget import analyze
    from models.spec import SpecError

    best = None
    for n_blocks in range(1, MAX_BLOCKS + 1):
        for convs, paddings, pools in product(product((1, 2, 3), repeat=n_blocks), product((0, 1), repeat=n_blocks),
                                              product((True, False), repeat=n_blocks)):
            blocks = tuple(ConvBlock(tuple(Conv(NARROWEST, 3, p) for _ in range(n)), True, 0.0, pool)
                           for n, p, pool in zip(convs, paddings, pools))
            try:
                analysis = analyze(NetSpec(blocks, Head("conv_gap")))
            except SpecError:
                continue
            if (analysis.receptive_field or 0) >= min_rf and (best is None or analysis.n_params < best):
                best = analysis.n_params
    return best if best is not None else 10**9


def encode(spec: NetSpec, cfg: TrainConfig, param_target: bool = False) -> dict:
    """The parameters that make `suggest` return this spec and config; ValueError if it lies outside the space.
    With `param_target`, the target is the spec's own count, which `fit_widths` leaves as it is."""
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
        params["param_target"] = count_params(spec)
    return params

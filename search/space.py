"""The block-builder's search space: every `trial.suggest_*` call, in one function.

A network is 1 to 3 conv blocks of 1 to 3 3x3 convs, each block with its own widths, padding and pool, optionally
followed by a 1x1 transition; BatchNorm and dropout are shared choices; the head is a 1x1 conv and global average
pooling in either order. Training choices: optimizer, learning rate, batch size, schedule, label smoothing,
augmentation strength. The epochs are the study's, not searched.

Layouts that shrink the map below 1x1 raise `SpecError` from `NetSpec` and are rejected like over-budget ones.
`encode(spec, cfg)` is the inverse of `suggest` for specs inside the space (presets, to enqueue as warm start).
"""

from __future__ import annotations

import optuna

from models.spec import Conv, ConvBlock, Head, NetSpec, Transition
from search.engine.config import TrainConfig

MAX_BLOCKS = 3
# Channels per conv, in steps of 8: on the CPU odd widths trained far slower for fewer MACs (docs/search.md), and
# vector units and tensor cores both work in multiples of 8.
# With 3 blocks of 3 convs this reaches far past 20k, with 1 block of 1 conv about 150 parameters.
CHANNELS = (8, 40, 8)
LR = {"sgd": (0.01, 0.4), "adamw": (5e-4, 2e-2)}  # peak learning rate ranges, log-uniform
BATCH_SIZES = (64, 128, 256)  # images per step
DROPOUT = (0.0, 0.15)
LABEL_SMOOTHING = (0.0, 0.15)
AUGMENT = (0.0, 1.5)


def _width(trial: optuna.trial.BaseTrial, name: str) -> int:
    low, high, step = CHANNELS
    return trial.suggest_int(name, low, high, step=step)


def suggest(trial: optuna.trial.BaseTrial, epochs: int = 20, seed: int = 0) -> tuple[NetSpec, TrainConfig]:
    n_blocks = trial.suggest_int("n_blocks", 1, MAX_BLOCKS)
    batchnorm = trial.suggest_categorical("batchnorm", [True, False])
    dropout = trial.suggest_float("dropout", *DROPOUT)
    blocks: list = []
    for i in range(1, n_blocks + 1):
        n_convs = trial.suggest_int(f"b{i}_convs", 1, 3)
        padding = trial.suggest_int(f"b{i}_padding", 0, 1)
        convs = tuple(Conv(_width(trial, f"b{i}_c{j}"), 3, padding) for j in range(1, n_convs + 1))
        pool = trial.suggest_categorical(f"b{i}_pool", [True, False])
        blocks.append(ConvBlock(convs, batchnorm, dropout, pool))
        if i < n_blocks and trial.suggest_categorical(f"t{i}", [True, False]):
            blocks.append(Transition(_width(trial, f"t{i}_c"), batchnorm, False))
    head = Head(trial.suggest_categorical("head", ["conv_gap", "gap_conv"]))

    optimizer = trial.suggest_categorical("optimizer", ["sgd", "adamw"])
    cfg = TrainConfig(
        epochs=epochs,
        batch_size=trial.suggest_categorical("batch_size", list(BATCH_SIZES)),
        optimizer=optimizer,
        lr=trial.suggest_float(f"{optimizer}_lr", *LR[optimizer], log=True),
        weight_decay=5e-4 if optimizer == "sgd" else 1e-2,
        schedule=trial.suggest_categorical("schedule", ["onecycle", "cosine", "step"]),
        label_smoothing=trial.suggest_float("label_smoothing", *LABEL_SMOOTHING),
        augment=trial.suggest_float("augment", *AUGMENT),
        seed=seed,
    )
    return NetSpec(tuple(blocks), head), cfg


def encode(spec: NetSpec, cfg: TrainConfig) -> dict:
    """The parameters that make `suggest` return this spec and config; ValueError if it lies outside the space."""
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
    return params

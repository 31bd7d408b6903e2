"""The pieces of a training step: data on the device, augmentation of whole batches, optimizer and schedule,
the loss of one batch, and the ordinary (torch optimizer) epoch used for AdamW and compiled models."""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from search.data import MEAN, STD, Split
from search.engine.config import AUGMENT_UNIT, TrainConfig
from search.engine.runtime import autocast, capture_guard, capturing, stop_point


def to_device(split: Split, device: torch.device, stats: tuple[float, float] = (MEAN, STD)
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images -> float32 (N, 1, 28, 28) on the device, once, normalised by the set's (mean, std) of pixels
    scaled to [0, 1] (MNIST's by default)."""
    mean, std = stats
    x = split.images.to(device).float().div_(255).sub_(mean).div_(std).unsqueeze(1)
    return x, split.labels.to(device)


def random_affine(n: int, strength: float, generator: torch.Generator) -> torch.Tensor:
    """n random affine matrices (n, 2, 3) for `affine_grid`: rotation, scale and translation, uniform in their ranges.

    A whole epoch's matrices are drawn at once, so that a step launches only affine_grid and grid_sample for its
    augmentation instead of some twenty small kernels.
    """
    r = torch.rand(n, 4, generator=generator, device=generator.device) * 2 - 1  # uniform in [-1, 1]
    angle = r[:, 0] * math.radians(AUGMENT_UNIT["degrees"] * strength)
    scale = 1 + r[:, 1] * AUGMENT_UNIT["scale"] * strength
    shift = r[:, 2:] * (AUGMENT_UNIT["shift_px"] * strength / (28 / 2))  # px in grid units ([-1, 1] spans 28 px)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    return torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)


def apply_affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Warp every image of the batch by its matrix with one grid_sample; the border is the digit's background."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    # Pixels warped in from outside the image repeat the nearest border pixel: the background of MNIST-like sets
    # (black borders), whatever the set's normalisation, with no per-batch work to find its value.
    return F.grid_sample(x, grid, align_corners=False, padding_mode="border")


def augment_batch(x: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Random rotation, scale and translation of every image in the batch."""
    return apply_affine(x, random_affine(x.shape[0], strength, generator).to(x.device))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim > 1]  # conv weights; BatchNorm and biases are not decayed
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        momentum = first_momentum(cfg)
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=momentum, nesterov=momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999))  # beta2: torch's default


def first_momentum(cfg: TrainConfig) -> float:
    """The momentum of the first SGD step: OneCycle's maximum under it (it sets that before the first step anyway),
    else `momentum`. Nesterov only where it is above 0: torch refuses Nesterov without momentum, and with a
    momentum of 0 throughout the update is plain SGD either way."""
    return cfg.onecycle_max_momentum if cfg.schedule == "onecycle" else cfg.momentum


def piecewise_factor(epoch: float, epochs: tuple[float, ...], factors: tuple[float, ...]) -> float:
    """The factor of lr at `epoch` (a fraction of epochs since the start): linear between the points, the last
    point's factor after it."""
    for (e0, f0), (e1, f1) in zip(zip(epochs, factors), zip(epochs[1:], factors[1:])):
        if epoch < e1:
            return f0 + (f1 - f0) * (epoch - e0) / (e1 - e0)
    return factors[-1]


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """The schedule, stepped once per training step (TrainConfig says what each does)."""
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg.lr, total_steps=total, pct_start=cfg.onecycle_warmup,
            base_momentum=cfg.onecycle_base_momentum, max_momentum=cfg.onecycle_max_momentum,
            div_factor=cfg.onecycle_start_div, final_div_factor=cfg.onecycle_end_div)
    if cfg.schedule == "piecewise":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: piecewise_factor(
            step / steps_per_epoch, cfg.piecewise_epochs, cfg.piecewise_lr_factors))
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[int(total * f) for f in cfg.step_milestones],
                                                gamma=cfg.step_gamma)


def batch_loss(model: nn.Module, criterion: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor,
               idx: torch.Tensor, thetas: torch.Tensor | None, bf16: bool):
    """Gather a batch by index, warp it by its affine matrices, run the model: (logits, loss, labels)."""
    xb, yb = x_train[idx], y_train[idx]
    if thetas is not None:
        xb = apply_affine(xb, thetas)
    xb = xb.contiguous(memory_format=torch.channels_last)  # as the model's weights (fit)
    with autocast(xb.device, bf16):
        logits = model(xb)
        # The loss in float32 at least (bfloat16 logits lose the small differences it is made of); a float64 model
        # keeps float64, so that the engine's paths can be compared to 1e-9 (tests/test_train.py).
        loss = criterion(logits.to(torch.promote_types(logits.dtype, torch.float32)), yb)
    return logits, loss, yb


def train_epoch(step_model, opt, sched, criterion, x_train, y_train, order, thetas, batch_size: int,
                steps: int, bf16: bool, advance, average=None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One epoch of ordinary steps; returns the summed loss, the number correct and the number of images seen.
    `average` (an engine/average.py WeightAverage, or None) is updated after every optimizer step."""
    loss_sum = torch.zeros((), device=x_train.device)
    correct = torch.zeros((), device=x_train.device, dtype=torch.long)
    seen = 0
    for step in range(steps):
        batch = slice(step * batch_size, (step + 1) * batch_size)
        logits, loss, yb = batch_loss(step_model, criterion, x_train, y_train, order[batch],
                                      None if thetas is None else thetas[batch], bf16)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if average is not None:
            average.update()
        sched.step()
        loss_sum += loss.detach() * len(yb)
        correct += (logits.detach().argmax(1) == yb).sum()
        seen += len(yb)
        stop_point()
        if advance:
            advance()
    return loss_sum, correct, seen


def graph_model(model: nn.Module, example: torch.Tensor, bf16: bool) -> nn.Module:
    """The model's training forward and backward captured as CUDA graphs (torch.cuda.make_graphed_callables), for
    steps that torch's optimizer takes (AdamW): two graph launches instead of one kernel launch per layer and op.
    Evaluation (model.eval()) still runs the ordinary forward. A capture torch refuses raises CaptureFailed."""
    extra = {}
    if "capture_error_mode" in inspect.signature(torch.cuda.make_graphed_callables).parameters:
        extra["capture_error_mode"] = "thread_local"  # other trials' threads may use the GPU meanwhile
    with capture_guard(model, example.device), autocast(example.device, bf16), capturing():
        return torch.cuda.make_graphed_callables(model, (example,), **extra)

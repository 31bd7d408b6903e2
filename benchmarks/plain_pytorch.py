"""The engine against a plain PyTorch loop at the accuracy level (#27): one layout and recipe, trained both ways.

    python benchmarks/plain_pytorch.py [--recipe published] [--layout p3702] [--seeds 3] [--epochs 15]
                                       [--subset N] [--val N] [--runs results/plain_pytorch.csv]
                                       [--device auto] [--data-dir DIR]

(a) the engine: benchmarks/recipe.py's run of the recipe, as the engine trains by default (its precision, CPU
    shards and step path; the first two are stored with the run);
(b) plain PyTorch: the same network with the same initial weights (the recipe's Xavier draw from the seed, or the
    engine's reset from it), torch's own nn.Dropout, float32, the whole batch on torch's threads (no shards),
    torch.optim.SGD, the learning rate set per step by LambdaLR from numpy's interpolation of the recipe's points
    (piecewise) or by torch's OneCycleLR, torchvision's RandomAffine drawn per image in the engine's ranges
    (search/engine/config.py AUGMENT_UNIT; bilinear, the background filled in), shuffled by torch.randperm, the last
    partial batch kept when it has two images or more, evaluated in eval mode after every epoch.
Both are judged on the validation split (the test set is for certification only); any gap is the engine's
(bfloat16, shards, its augmentation or evaluation) until explained. Prints each seed's final validation accuracy
for both, and their mean and std over the seeds. Every (trainer, seed) run goes to `--runs` as soon as it has
trained, so the same command resumes after Ctrl-C. `--recipe`: a named recipe of benchmarks/recipe.py (RECIPES)
or `default` (the engine's default recipe).
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.common import split_on_device  # noqa: E402
from benchmarks.recipe import DEFAULT, LAYOUTS, RECIPES, append_run, make_run, train_run  # noqa: E402
from benchmarks.train_throughput import with_torch_dropout  # noqa: E402
from models.rules import RULES  # noqa: E402
from search.data import MEAN, STD  # noqa: E402
from search.engine import TrainConfig  # noqa: E402
from search.engine.config import AUGMENT_UNIT  # noqa: E402
from search.engine.runtime import stop_at_safe_points, stop_point  # noqa: E402

TRAINERS = ("engine", "plain")
PLAIN_SCHEDULES = ("piecewise", "onecycle")  # the schedules the plain loop implements on its own
EVAL_BATCH = 1000  # images per evaluation batch of the plain loop (the result does not depend on it)


def plain_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """The learning rate per step, written apart from the engine's make_scheduler: numpy's linear interpolation of
    the piecewise points at the step's epoch (a fraction), or torch's OneCycleLR with the config's constants."""
    if cfg.schedule == "piecewise":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: float(np.interp(
            step / steps_per_epoch, cfg.piecewise_epochs, cfg.piecewise_lr_factors)))
    return torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=cfg.onecycle_warmup,
        base_momentum=cfg.onecycle_base_momentum, max_momentum=cfg.onecycle_max_momentum,
        div_factor=cfg.onecycle_start_div, final_div_factor=cfg.onecycle_end_div)


def plain_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    """SGD with weight decay on conv weights only (as the engine); Nesterov where there is momentum."""
    momentum = cfg.onecycle_max_momentum if cfg.schedule == "onecycle" else cfg.momentum
    groups = [{"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": cfg.weight_decay},
              {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=momentum, nesterov=momentum > 0)


def augmenter(strength: float):
    """torchvision's RandomAffine in the engine's ranges at this strength (rotation, shift in px, scale), on
    normalised images: what comes in from outside the image is MNIST's normalised black."""
    from torchvision.transforms import InterpolationMode, v2

    shift = AUGMENT_UNIT["shift_px"] * strength / 28  # a fraction of the 28 px side
    scale = AUGMENT_UNIT["scale"] * strength
    return v2.RandomAffine(degrees=AUGMENT_UNIT["degrees"] * strength, translate=(shift, shift),
                           scale=(1 - scale, 1 + scale), interpolation=InterpolationMode.BILINEAR,
                           fill=-MEAN / STD)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = sum((model(x[i:i + EVAL_BATCH]).argmax(1) == y[i:i + EVAL_BATCH]).sum().item()
                  for i in range(0, len(y), EVAL_BATCH))
    return correct / len(y)


def initial_model(layout: str, changes: dict, seed: int, epochs: int) -> tuple[nn.Module, TrainConfig]:
    """The network and config of recipe.py's run, with the initial weights the engine starts that run from."""
    model, cfg, _, _ = make_run(layout, changes, seed, epochs)
    if "init" not in changes:  # what fit(reset_weights=True) does first
        torch.manual_seed(cfg.seed)
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return model, cfg


def plain_run(layout: str, changes: dict, seed: int, epochs: int, data: tuple, device) -> dict:
    """One run of the plain loop: its validation accuracy after every epoch."""
    model, cfg = initial_model(layout, changes, seed, epochs)
    model = with_torch_dropout(model).to(device)
    x_train, y_train, x_val, y_val = data
    n, size = len(y_train), cfg.batch_size
    steps_per_epoch = n // size + (n % size > 1)  # a last batch of one image would break BatchNorm: dropped
    opt = plain_optimizer(model, cfg)
    sched = plain_scheduler(opt, cfg, steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    augment = augmenter(cfg.augment) if cfg.augment > 0 else None
    torch.manual_seed(seed)  # batch order, augmentation and dropout
    curve, start = [], time.perf_counter()
    for _ in range(cfg.epochs):
        model.train()
        order = torch.randperm(n, device=device)
        for step in range(steps_per_epoch):
            idx = order[step * size:(step + 1) * size]
            xb = x_train[idx]
            if augment is not None:
                xb = torch.stack([augment(image) for image in xb])
            loss = loss_fn(model(xb), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            stop_point()  # Ctrl-C or SIGTERM lands between steps, as in the engine
        curve.append(accuracy(model, x_val, y_val))
        if not math.isfinite(loss.item()):
            break
    return {"status": "completed" if len(curve) == cfg.epochs else "nan", "curve": curve,
            "wall_s": time.perf_counter() - start, "precision": "fp32", "shards": 1}


def run_row(trainer: str, layout: str, changes: dict, seed: int, epochs: int, data: tuple, device) -> dict:
    """One run of `trainer`, as a row of --runs."""
    if trainer == "engine":
        row = train_run(layout, changes, seed, epochs, data, device)
        curve = [row[f"e{i}"] for i in range(1, row["epochs"] + 1)]
        result = {"status": row["status"], "curve": curve, "wall_s": row["wall_s"], "precision": row["precision"],
                  "shards": row["shards"]}
    else:
        result = plain_run(layout, changes, seed, epochs, data, device)
    curve = result.pop("curve")
    final = curve[-1] if curve and result["status"] == "completed" else math.nan
    return {"trainer": trainer, "seed": seed, "final_val_acc": final, **result,
            "wall_s": round(result["wall_s"], 1), **{f"e{i}": v for i, v in enumerate(curve, 1)}}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", default="published", help=f"one of {[DEFAULT, *RECIPES]}")
    parser.add_argument("--layout", default="p3702", help=f"one of {list(LAYOUTS)}")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=15, help="the published recipe's; its rate is 0 after 15")
    parser.add_argument("--subset", type=int, default=None, help="train on the first N training images")
    parser.add_argument("--val", type=int, default=None, help="evaluate on the first N validation images")
    parser.add_argument("--runs", default="results/plain_pytorch.csv", help="every run; the same file resumes")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    changes = {} if args.recipe == DEFAULT else RECIPES.get(args.recipe)
    schedule = (changes or {}).get("schedule", TrainConfig.schedule)
    for bad, message in (
            (changes is None, f"--recipe {args.recipe!r}: must be one of {[DEFAULT, *RECIPES]}"),
            (args.layout not in LAYOUTS, f"--layout {args.layout!r}: must be one of {list(LAYOUTS)}"),
            (not 1 <= args.seeds <= 100, f"--seeds {args.seeds}: must be from 1 to 100"),
            (not 1 <= args.epochs <= RULES.max_epochs, f"--epochs {args.epochs}: must be from 1 to {RULES.max_epochs}"),
            (schedule not in PLAIN_SCHEDULES,
             f"--recipe {args.recipe!r}: its schedule {schedule!r} is not one the plain loop has {PLAIN_SCHEDULES}")):
        if bad:
            parser.exit(2, f"error: {message}\n")
    args.changes = changes
    return args


def summary(done: pd.DataFrame) -> str:
    lines = []
    for trainer in TRAINERS:
        finals = 100 * done[done.trainer == trainer].sort_values("seed").final_val_acc
        if len(finals):
            std = f" +- {finals.std():.2f}" if len(finals) > 1 else ""
            lines.append(f"{trainer}: {finals.mean():.2f}%{std} over {len(finals)} seed(s) "
                         f"({', '.join(f'{v:.2f}' for v in finals)})")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    device, train, val, data = split_on_device(args.device, args.data_dir, args.subset, args.val)
    setup = (f"recipe={args.recipe} layout={args.layout} epochs={args.epochs} train={len(train)} val={len(val)} device={device.type}")
    path = Path(args.runs)
    stored = pd.read_csv(path) if path.exists() else pd.DataFrame()
    done = stored[stored.setup == setup] if len(stored) else stored
    keys = set(zip(done.trainer, done.seed)) if len(done) else set()
    try:
        with stop_at_safe_points():
            for seed in range(args.seeds):
                for trainer in (t for t in TRAINERS if (t, seed) not in keys):
                    row = {"setup": setup, "changes": json.dumps(args.changes),
                           **run_row(trainer, args.layout, args.changes, seed, args.epochs, data, device)}
                    print(f"seed {seed} {trainer}: {row['status']}, final validation {row['final_val_acc']:.2%} "
                          f"({row['precision']}, {row['shards']} shard(s), {row['wall_s'] / 60:.1f} min)", flush=True)
                    stored, done = append_run(stored, row, path)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM at a safe point (StopRequested is one)
        print(f"\nstopped; the runs trained so far are in {path}, and the same command resumes")
    print(f"\n{setup}; {len(done)} runs stored in {path}")
    print(summary(done[done.seed < args.seeds]) if len(done) else "no runs yet")


if __name__ == "__main__":
    main()

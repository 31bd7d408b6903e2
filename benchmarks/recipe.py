"""Which training recipe gets the most out of a 2,500-4,600-parameter net in 20 epochs? One factor at a time.

    python benchmarks/recipe.py [--runs results/recipe.csv] [--epochs 20] [--seeds 3] [--limit N]
                                [--subset N] [--val N] [--device auto] [--data-dir DIR]

Three small layouts of the `micro` style (three padded blocks of 3x3 convs, two max-pools, 1x1 conv + GAP head):
2,510, 3,702 and 4,582 (`micro`) parameters. Every run trains all epochs on the training split and is judged on the
**validation split** (10,000 images held out of the training set): the test set is for certification only.

The plan, in order, each run once:
1. screen: the default recipe (search/engine/config.py) and every variant below, seed 0, on the 3,702 layout first,
   then on the other two;
2. confirm: per layout, the default and each factor's best screened value that beat it, with `--seeds` seeds, as
   soon as that factor is screened on the layout;
3. combine: per layout, all confirmed winners together, with `--seeds` seeds.
Stages 2 and 3 are planned from the runs stored when they are reached. A variant changes one thing: a field of
`TrainConfig` (the weight average `ema` among them; `momentum` comes with the cosine schedule, since OneCycle sets
the momentum itself: WITH), the dropout of every conv block, the BatchNorm momentum (torch's running-statistics
update rate), or the CPU shard count at batch 64 (BatchNorm then normalises over 64 / shards images). RECIPES names
sets of changes for benchmarks/plain_pytorch.py ("published": #27's hand-made recipe).

Every run's curve goes to `--runs` as soon as it has trained, so a run of many hours (about 5 minutes a run on 2 CPU
cores) can be stopped with Ctrl-C and resumed by the same command; `--limit N` trains at most N runs this time.
It prints, per layout, each recipe's final-epoch validation accuracy (mean +- std over its seeds) and the difference
from the default's. Figures: docs/recipe.md.
"""

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from models.budget import count_params  # noqa: E402
from models.build import build  # noqa: E402
from models.presets import PRESETS, _block  # noqa: E402
from models.spec import ConvBlock, Head, NetSpec  # noqa: E402
from benchmarks.common import add_data_dir, split_on_device  # noqa: E402
from search.engine import TrainConfig, fit  # noqa: E402
from search.engine.runtime import stop_at_safe_points  # noqa: E402


def _padded_three_blocks(first: tuple, second: tuple, third: tuple) -> NetSpec:
    return NetSpec((_block(*first, padding=1), _block(*second, padding=1), _block(*third, padding=1, pool=False)),
                   Head("conv_gap"))


LAYOUTS = {  # name -> spec; the middle one is screened first
    "p3702": _padded_three_blocks((4, 4, 4), (8, 8, 8), (8, 8, 8)),
    "p2510": _padded_three_blocks((4, 4, 6), (6, 6, 6), (6, 6, 6)),
    "micro": PRESETS["micro"],
}

# factor -> the values screened; the default recipe's own value is not repeated. "config" factors are TrainConfig
# fields; the others are applied to the model ("dropout", "bn_momentum") or to the engine ("shards").
FACTORS = {
    "lr": [0.05, 0.2, 0.4],
    "batch_size": [32, 128],
    "shards": [1],
    "schedule": ["cosine", "step"],
    "weight_decay": [0.0, 1e-4, 2e-3],
    "label_smoothing": [0.0, 0.1],
    "augment": [0.0, 0.25, 1.0],
    "dropout": [0.0, 0.1],
    "bn_momentum": [0.01, 0.3],
    # Added after the runs stored in docs/recipe-runs.csv, so that their order in the plan stays as it was.
    "ema": [0.99, 0.999],  # decay per step of the weight average evaluated (TrainConfig.ema); the default is off
    "momentum": [0.8, 0.95],  # SGD's Nesterov momentum (default 0.9), under WITH's schedule
    # The engine's arithmetic: float32 where the default, on a CPU with native bfloat16 (or CUDA), autocasts the
    # convs to bfloat16; on other CPUs "auto" is already float32 and this run repeats the default's arithmetic.
    "precision": ["fp32"],
}
# What a factor's values come with: OneCycle sets the momentum itself (TrainConfig), so the momentum factor runs
# under the cosine schedule and is judged against the cosine schedule at the default momentum, a screened run.
WITH = {"momentum": {"schedule": "cosine"}}
MODEL_FACTORS = ("dropout", "bn_momentum", "shards", "init", "precision")
DEFAULT = "default"
# Named recipes, sets of changes for the engine-against-plain-PyTorch comparison (benchmarks/plain_pytorch.py).
# "published": #27's hand-made recipe for a 3,762-parameter net, as far as the engine expresses it: SGD without
# momentum, lr 0.05 at epoch 0 -> 0.1 at 2 -> 0.01 at 8 -> 0.005 at 12 -> 0 at 15 (TrainConfig's piecewise
# defaults), batch 32, no weight decay or label smoothing, dropout 0.01, Xavier-uniform conv weights. Its
# augmentation (shift, scale, rotation up to 7 degrees, each image with probability 0.5) becomes augment 7/8 (up to
# 7 degrees, 7% scale, 1.75 px shift) on every image: the engine has no augmentation probability. No conv biases
# (the layout's BatchNorm follows every conv). Meant for 15 epochs: the rate is 0 after epoch 15.
RECIPES = {
    "published": {"momentum": 0.0, "schedule": "piecewise", "lr": 0.1, "batch_size": 32, "weight_decay": 0.0,
                  "label_smoothing": 0.0, "augment": 0.875, "dropout": 0.01, "init": "xavier"},
}


def variant(factor: str, value) -> dict:
    """The changes of one screened value: the factor's, with what it comes with (WITH)."""
    return {factor: value, **WITH.get(factor, {})}


def recipe_name(changes: dict) -> str:
    return DEFAULT if not changes else ",".join(f"{k}={v}" for k, v in sorted(changes.items()))


def planned_runs(done: pd.DataFrame, seeds: int) -> list[tuple[str, dict, int]]:
    """(layout, changes, seed) of every run the plan asks for now, in order, done or not."""
    plan = [(layout, {}, 0) for layout in LAYOUTS]
    for layout in LAYOUTS:
        plan += [(layout, variant(factor, value), 0) for factor, values in FACTORS.items() for value in values]
    for layout in LAYOUTS:
        winners, complete = _screen_winners(done, layout)
        if not winners:
            continue
        # A factor is confirmed as soon as its own screening on the layout is done (so that `--factors` can take one
        # question through to its seeds); the combination waits for every factor.
        bases = [{}] + [WITH[k] for k in winners if k in WITH]
        plan += [(layout, changes, seed) for changes in bases + [variant(k, v) for k, v in winners.items()]
                 for seed in range(seeds)]
        confirmed = _confirmed(done, layout, winners, seeds) if complete else None
        if confirmed:
            combined = dict(confirmed)
            for factor in confirmed:  # a companion only where no confirmed winner set that field
                for key, value in WITH.get(factor, {}).items():
                    combined.setdefault(key, value)
            plan += [(layout, combined, seed) for seed in range(seeds)]
    return plan


def _mean_final(done: pd.DataFrame, layout: str, changes: dict, seeds: int | None = None) -> float | None:
    rows = done[(done.layout == layout) & (done.recipe == recipe_name(changes))]
    if seeds is not None:
        rows = rows[rows.seed < seeds]
        if len(rows) < seeds:
            return None
    return rows.final_val_acc.mean() if len(rows) else None


def _screen_winners(done: pd.DataFrame, layout: str) -> tuple[dict, bool]:
    """(per factor whose seed-0 screening on the layout is done, its value with the best validation accuracy where
    that beat its base's: the default's, or that of what the factor comes with (WITH); whether every factor's is)."""
    if not len(done):
        return {}, False
    seed0 = done[(done.layout == layout) & (done.seed == 0)]
    winners, complete = {}, True
    for factor, values in FACTORS.items():
        base = _mean_final(seed0, layout, WITH.get(factor, {}))
        scores = [(_mean_final(seed0, layout, variant(factor, v)), v) for v in values]
        if base is None or any(s is None for s, _ in scores):
            complete = False
            continue
        best, value = max(scores, key=lambda sv: sv[0])
        if best > base:
            winners[factor] = value
    return winners, complete


def _confirmed(done: pd.DataFrame, layout: str, winners: dict, seeds: int) -> dict | None:
    """The winners whose mean over `seeds` seeds beat their base's (the default's, or WITH's) over the same seeds;
    None until all ran."""
    bases = {k: _mean_final(done, layout, WITH.get(k, {}), seeds) for k in winners}
    means = {k: _mean_final(done, layout, variant(k, v), seeds) for k, v in winners.items()}
    if _mean_final(done, layout, {}, seeds) is None or any(m is None for m in (*means.values(), *bases.values())):
        return None
    return {k: winners[k] for k, m in means.items() if m > bases[k]}


def make_run(layout: str, changes: dict, seed: int, epochs: int) -> tuple[nn.Module, TrainConfig, int | None, int]:
    """(model, config, shards or None for the engine's choice, parameters) of one run. With "init": "xavier" the
    conv weights are drawn Xavier-uniform from the seed here, and fit must keep them (reset_weights=False)."""
    spec = LAYOUTS[layout]
    if "dropout" in changes:
        spec = replace(spec, blocks=tuple(replace(b, dropout=changes["dropout"]) if isinstance(b, ConvBlock) else b
                                          for b in spec.blocks))
    cfg = TrainConfig(epochs=epochs, seed=seed,
                      **{k: v for k, v in changes.items() if k not in MODEL_FACTORS})
    model = build(spec)
    if "bn_momentum" in changes:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = changes["bn_momentum"]
    if changes.get("init") == "xavier":
        torch.manual_seed(seed)
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
    return model, cfg, changes.get("shards"), count_params(spec)


def train_run(layout: str, changes: dict, seed: int, epochs: int, data: tuple, device) -> dict:
    model, cfg, shards, n_params = make_run(layout, changes, seed, epochs)
    start = time.perf_counter()
    history = fit(model, None, None, cfg, device=device, data_on_device=data, progress=False, shards=shards,
                  reset_weights="init" not in changes, precision=changes.get("precision", "auto"))
    curve = [e.val_acc for e in history.epochs]
    return {"layout": layout, "n_params": n_params, "recipe": recipe_name(changes), "changes": json.dumps(changes),
            "seed": seed, "status": history.status, "epochs": len(curve),
            "final_val_acc": curve[-1] if curve and history.status == "completed" else math.nan,
            "best_val_acc": max(curve) if curve else math.nan, "wall_s": round(time.perf_counter() - start, 1),
            "shards": history.shards, "precision": history.precision,
            **{f"e{i}": v for i, v in enumerate(curve, 1)}}


def summary(done: pd.DataFrame) -> pd.DataFrame:
    """Per layout and recipe: seeds, final validation accuracy mean and std (percent), and the gap to the default's
    mean over the same seeds."""
    rows = []
    for (layout, recipe), group in done.groupby(["layout", "recipe"], sort=False):
        base = done[(done.layout == layout) & (done.recipe == DEFAULT) & done.seed.isin(group.seed)]
        rows.append({"layout": layout, "params": int(group.n_params.iloc[0]), "recipe": recipe,
                     "seeds": len(group), "val_mean": 100 * group.final_val_acc.mean(),
                     "val_std": 100 * group.final_val_acc.std() if len(group) > 1 else math.nan,
                     "vs_default": 100 * (group.final_val_acc.mean() - base.final_val_acc.mean())
                     if len(base) == len(group) else math.nan,
                     "min_per_run": group.wall_s.mean() / 60})
    return pd.DataFrame(rows)


def append_run(stored: pd.DataFrame, row: dict, path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`row` appended to the stored runs and the file rewritten (a run is kept as soon as it has trained): (all the
    runs, those of the row's setup)."""
    stored = pd.concat([stored, pd.DataFrame([row])], ignore_index=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    stored.to_csv(path, index=False)
    return stored, stored[stored.setup == row["setup"]]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", default="results/recipe.csv", help="every run's curve; the same file resumes")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the confirming stages")
    parser.add_argument("--limit", type=int, default=None, help="train at most this many runs in this call")
    parser.add_argument("--subset", type=int, default=None, help="train on the first N training images (tests)")
    parser.add_argument("--val", type=int, default=None, help="evaluate on the first N validation images (tests)")
    parser.add_argument("--factors", default=None,
                        help="comma-separated: screen only these factors now, in the plan's order (of "
                             f"{', '.join(FACTORS)}); the default recipe's runs come first [default: every factor]")
    parser.add_argument("--device", default="auto")
    add_data_dir(parser)
    args = parser.parse_args()
    only = None if args.factors is None else set(args.factors.split(","))
    if only is not None and not only <= set(FACTORS):
        parser.error(f"--factors {args.factors}: {', '.join(sorted(only - set(FACTORS)))} is not a factor; "
                     f"the factors are {', '.join(FACTORS)}")
    device, train, val, data = split_on_device(args.device, args.data_dir, args.subset, args.val)
    setup = f"epochs={args.epochs} train={len(train)} val={len(val)}"
    path = Path(args.runs)
    stored = pd.read_csv(path) if path.exists() else pd.DataFrame()
    done = stored[stored.setup == setup] if len(stored) else stored
    trained, start = 0, time.perf_counter()
    try:
        with stop_at_safe_points():
            while args.limit is None or trained < args.limit:
                keys = set(zip(done.layout, done.recipe, done.seed)) if len(done) else set()
                todo = [r for r in planned_runs(done, args.seeds) if (r[0], recipe_name(r[1]), r[2]) not in keys
                        and (only is None or not r[1] or set(r[1]) & only)]
                if not todo:
                    break
                layout, changes, seed = todo[0]
                row = {"setup": setup, **train_run(layout, changes, seed, args.epochs, data, device)}
                print(f"{layout} {row['recipe']} seed {seed}: {row['status']}, final validation "
                      f"{row['final_val_acc']:.2%} ({row['wall_s'] / 60:.1f} min)", flush=True)
                stored, done = append_run(stored, row, path)
                trained += 1
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM at a safe point (StopRequested is one)
        print(f"\nstopped; the runs trained so far are in {path}, and the same command resumes")
    print(f"\n{trained} runs trained in {(time.perf_counter() - start) / 60:.1f} min ({device}, {setup}); "
          f"{len(done)} stored in {path}")
    if len(done):
        print(summary(done).to_string(index=False, float_format=lambda v: f"{v:.2f}"))


if __name__ == "__main__":
    main()

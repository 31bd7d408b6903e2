"""How well does a trial's accuracy at an early epoch predict its accuracy at the last one?

    python benchmarks/fidelity.py [--nets 30] [--epochs 20] [--subset N] [--val N] [--seed 0] [--device auto]
                                  [--floor 99.0]

Draws `--nets` networks from the search space (random sampler, widths fitted to parameter targets spread from
1,000 to 20,000 like a pareto search), trains each to the last epoch without pruning, and prints for every candidate
rung (epoch) the Spearman rank correlation between validation accuracy at that epoch and at the last, for nets
under and over 8,000 parameters, and all together. A rung is worth judging at when the correlation there is high:
pruning at a rung with a low correlation throws away nets that would have ended well. Then the pareto search's floor
stop replayed on the same curves: how many nets it stops at each epoch, and how many of them ended at or above the
floor (wrong stops).
"""

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import optuna  # noqa: E402
import pandas as pd  # noqa: E402

from models.budget import check  # noqa: E402
from models.build import build  # noqa: E402
from search.data import load_mnist  # noqa: E402
from search.engine import fit, resolve_device, to_device  # noqa: E402
from search.engine.runtime import set_cpu_threads  # noqa: E402
from search.pruning import FLOOR_FROM_EPOCH, FLOOR_MARGIN, FLOOR_REFERENCES  # noqa: E402
from search.space import suggest  # noqa: E402

SMALL = 8_000  # parameters: the split the issue asks about


def draw_nets(n: int, epochs: int, seed: int):
    """n distinct trainable (spec, config) pairs from the space, with parameter targets (pareto mode)."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    nets, seen = [], set()
    while len(nets) < n:
        trial = study.ask()
        try:
            spec, cfg = suggest(trial, epochs=epochs, seed=seed, param_target=True)
        except Exception:
            continue
        verdict = check(spec)
        if verdict.ok and verdict.receptive_field >= 12 and spec.to_json() not in seen:
            seen.add(spec.to_json())
            nets.append((spec, cfg, verdict.n_params))
    return nets


def spearman(a: list[float], b: list[float]) -> float:
    if len(a) < 3:
        return math.nan
    return pd.Series(a).rank().corr(pd.Series(b).rank())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nets", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--subset", type=int, default=None, help="train on the first N training images")
    parser.add_argument("--val", type=int, default=None, help="evaluate on the first N validation images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--floor", type=float, default=99.0, help="percent: the floor stop replayed at this floor")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    device = resolve_device(args.device)
    if device.type == "cpu":
        set_cpu_threads(None)
    mnist = load_mnist(args.data_dir)
    train = mnist.train.head(args.subset) if args.subset else mnist.train
    val = mnist.val.head(args.val) if args.val else mnist.val
    data = (*to_device(train, device), *to_device(val, device))
    rows = []
    start = time.perf_counter()
    for i, (spec, cfg, n_params) in enumerate(draw_nets(args.nets, args.epochs, args.seed)):
        history = fit(build(spec), None, None, cfg, device=device, data_on_device=data, progress=False)
        curve = [e.val_acc for e in history.epochs]
        if history.status != "completed":
            print(f"net {i}: {n_params:,} params, {history.status}; left out", flush=True)
            continue
        rows.append({"n_params": n_params, **{f"e{k + 1}": v for k, v in enumerate(curve)}})
        print(f"net {i}: {n_params:,} params, {cfg.optimizer} lr {cfg.lr:.3g} bs {cfg.batch_size}: "
              + " ".join(f"{v:.3f}" for v in curve), flush=True)
    frame = pd.DataFrame(rows)
    last = f"e{args.epochs}"
    print(f"\n{len(frame)} nets trained to epoch {args.epochs} on {len(train):,} images in "
          f"{(time.perf_counter() - start) / 60:.1f} min ({device})")
    print("Spearman rank correlation of validation accuracy at each epoch with the last epoch's:")
    print(f"{'epoch':>5} {'under 8k':>9} {'8k and over':>12} {'all':>6}")
    groups = {"small": frame[frame.n_params < SMALL], "large": frame[frame.n_params >= SMALL], "all": frame}
    for epoch in range(1, args.epochs):
        col = f"e{epoch}"
        rho = {k: spearman(list(g[col]), list(g[last])) for k, g in groups.items()}
        print(f"{epoch:>5} {rho['small']:>9.2f} {rho['large']:>12.2f} {rho['all']:>6.2f}")
    print(f"nets: {len(groups['small'])} under 8,000 parameters, {len(groups['large'])} at or over")
    floor_stop_check(frame, args.epochs, args.floor / 100)


def floor_stop_check(frame: pd.DataFrame, epochs: int, floor: float) -> None:
    """The pareto search's floor stop (search/pruning.py) replayed on these curves: at each epoch it may judge, every
    net is judged with the other nets that ended at or above the floor as its references (the study it would sit in),
    in the order the search would meet them. A net stopped that ended at or above the floor is a wrong stop."""
    finals = frame[f"e{epochs}"]
    print(f"\nfloor stop at {floor:.2%} (margin {FLOOR_MARGIN:.1%}, from epoch {FLOOR_FROM_EPOCH}; references: the "
          f"other nets that ended at or above it, {int((finals >= floor).sum())} here):")
    print(f"{'epoch':>5} {'stopped':>8} {'wrongly':>8} {'epochs saved':>13}")
    for epoch in range(FLOOR_FROM_EPOCH, epochs):
        stopped = wrong = 0
        for i, row in frame.iterrows():
            refs = frame[(frame.index != i) & (finals >= floor)]
            if len(refs) < FLOOR_REFERENCES:
                continue
            best = lambda r: max(r[f"e{k}"] for k in range(1, epoch + 1))  # noqa: E731
            gain = max(r[f"e{epochs}"] - best(r) for _, r in refs.iterrows())
            if best(row) + gain + FLOOR_MARGIN < floor:
                stopped += 1
                wrong += row[f"e{epochs}"] >= floor
        print(f"{epoch:>5} {stopped:>8} {wrong:>8} {stopped * (epochs - epoch):>13}")


if __name__ == "__main__":
    main()

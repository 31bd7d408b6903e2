"""How well does a trial's accuracy at an early epoch predict its accuracy at the last one?

    python benchmarks/fidelity.py [--nets 30] [--epochs 20] [--subset N] [--val N] [--seed 0] [--device auto]
                                  [--floor 99.0] [--curves results/fidelity.csv]
    python benchmarks/fidelity.py --studies STUDY [STUDY ...] [--results-dir results] [--epochs 20]

Draws networks from the search space (random sampler, widths fitted to parameter targets spread from 1,000 to
20,000 like a pareto search) and trains each to the last epoch without pruning, until `--nets` of them have; a net
that the search's not-learning stop would end (under 50% validation once 50,000 images have trained) stops there
and is counted apart: no rung decides its fate. Prints for every candidate rung (epoch) the Spearman rank
correlation between validation accuracy at that epoch and at the last, for nets under and over 8,000 parameters,
and all together. A rung is worth judging at when the correlation there is high: pruning at a rung with a low
correlation throws away nets that would have ended well. Then the pareto search's floor stop replayed on the same
curves: how many nets it stops at each epoch, and how many of them ended at or above the floor (wrong stops).

Every net's curve goes to `--curves` as soon as it has trained, so a long run (hours on 2 CPU cores on all 50,000
images: docs/search.md) can be stopped with Ctrl-C and resumed by the same command; the draw is the same for one seed.
`--studies A B ...` trains nothing and reads the full-length curves of stored searches instead.
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
from benchmarks.common import add_data_dir, split_on_device  # noqa: E402
from search.engine import fit  # noqa: E402
from search.pruning import (FLOOR_FROM_EPOCH, FLOOR_MARGIN, FLOOR_REFERENCES, NOT_LEARNING,  # noqa: E402
                            NOT_LEARNING_IMAGES)
from search.record import records  # noqa: E402
from search.space import suggest  # noqa: E402
from search.storage import default_storage_url, load_existing_study  # noqa: E402

SMALL = 8_000  # parameters: the split the issue asks about


def draw_nets(epochs: int, seed: int):
    """An endless stream of distinct trainable (spec, config, parameters) from the space, with parameter targets
    (pareto mode), always the same for one seed."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    seen = set()
    while True:
        trial = study.ask()
        try:
            spec, cfg = suggest(trial, epochs=epochs, seed=seed, param_target=True)
        except Exception:
            continue
        verdict = check(spec)
        if verdict.ok and verdict.receptive_field >= 12 and spec.to_json() not in seen:
            seen.add(spec.to_json())
            yield spec, cfg, verdict.n_params


def spearman(a: list[float], b: list[float]) -> float:
    if len(a) < 3:
        return math.nan
    return pd.Series(a).rank().corr(pd.Series(b).rank())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nets", type=int, default=30, help="nets to train to the last epoch")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--subset", type=int, default=None, help="train on the first N training images")
    parser.add_argument("--val", type=int, default=None, help="evaluate on the first N validation images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    add_data_dir(parser)
    parser.add_argument("--floor", type=float, default=99.0, help="percent: the floor stop replayed at this floor")
    parser.add_argument("--curves", default="results/fidelity.csv",
                        help="CSV of the curves, one row per net, written after each net; nets already in it with "
                             "the same --seed, --epochs, --subset and --val are not trained again (a stopped run "
                             "resumes where it was)")
    parser.add_argument("--studies", nargs="+", default=None, metavar="STUDY",
                        help="train nothing: read the curves of these stored searches' trials that trained every "
                             "epoch (each spec and recipe once; from --results-dir) and print the same tables")
    parser.add_argument("--results-dir", default="results")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.studies:
        frame = stored_curves(args.studies, args.results_dir, args.epochs)
        print(f"{len(frame)} distinct trials of {', '.join(args.studies)} that trained all {args.epochs} epochs "
              "(survivors of the searches' pruning, so mostly good nets)")
        analyse(frame, args.epochs, args.floor / 100)
        return
    device, train, val, data = split_on_device(args.device, args.data_dir, args.subset, args.val)
    draw = f"seed={args.seed} epochs={args.epochs} subset={len(train)} val={len(val)}"
    curves_path = Path(args.curves)
    stored = pd.read_csv(curves_path) if curves_path.exists() else pd.DataFrame()
    done = {(int(r.net), r.spec) for r in stored[stored.draw == draw].itertuples()} if len(stored) else set()
    rows = []
    start = time.perf_counter()
    try:
        for i, (spec, cfg, n_params) in enumerate(draw_nets(args.epochs, args.seed)):
            if sum(r["status"] == "completed" for r in rows) >= args.nets:
                break
            if (i, spec.to_json()) in done:
                rows.append(stored[(stored.draw == draw) & (stored.net == i)].iloc[0].to_dict())
                continue
            rows.append(train_one(i, spec, cfg, n_params, data, device, draw))
            stored = pd.concat([stored, pd.DataFrame([rows[-1]])], ignore_index=True)
            curves_path.parent.mkdir(parents=True, exist_ok=True)
            stored.to_csv(curves_path, index=False)
    except KeyboardInterrupt:
        print(f"\nstopped; the nets trained so far are in {curves_path}, and the same command resumes")
    frame = pd.DataFrame([r for r in rows if r["status"] == "completed"])
    n_stopped = sum(r["status"] == "not learning" for r in rows)
    print(f"\n{len(frame)} of {args.nets} nets trained to epoch {args.epochs} on {len(train):,} images, {n_stopped} "
          f"more stopped for not learning; {(time.perf_counter() - start) / 60:.1f} min in this run ({device}); "
          f"curves in {curves_path}")
    analyse(frame, args.epochs, args.floor / 100)


def stored_curves(studies: list[str], results_dir: str, epochs: int) -> pd.DataFrame:
    """Validation curves of the stored trials that trained every one of `epochs` epochs, each spec and recipe once."""
    rows, seen = [], set()
    for name in studies:
        study = load_existing_study(name, default_storage_url(results_dir, name))
        for r in records(study):
            if len(r.history) != epochs or r.key in seen:
                continue
            seen.add(r.key)
            rows.append({"study": name, "number": r.number, "n_params": r.n_params,
                         **{f"e{e['epoch']}": e["val_acc"] for e in r.history}})
    return pd.DataFrame(rows)


def analyse(frame: pd.DataFrame, epochs: int, floor: float) -> None:
    """The rank correlation table and the floor stop's replay."""
    if len(frame) < 3:
        return
    last = f"e{epochs}"
    print("Spearman rank correlation of validation accuracy at each epoch with the last epoch's:")
    print(f"{'epoch':>5} {'under 8k':>9} {'8k and over':>12} {'all':>6}")
    groups = {"small": frame[frame.n_params < SMALL], "large": frame[frame.n_params >= SMALL], "all": frame}
    for epoch in range(1, epochs):
        col = f"e{epoch}"
        rho = {k: spearman(list(g[col]), list(g[last])) for k, g in groups.items()}
        print(f"{epoch:>5} {rho['small']:>9.2f} {rho['large']:>12.2f} {rho['all']:>6.2f}")
    print(f"nets: {len(groups['small'])} under 8,000 parameters, {len(groups['large'])} at or over")
    floor_stop_check(frame, epochs, floor)


def train_one(i: int, spec, cfg, n_params: int, data: tuple, device, draw: str) -> dict:
    """Train one net to its last epoch, or until the search's not-learning stop would end it; its row."""
    # The pareto search's not-learning stop (search/pruning.py), which no rung overrules, judged once: at the first
    # epoch by which NOT_LEARNING_IMAGES images have trained (epoch 1 of the full split, epoch 5 of --subset 10000).
    judge_at = math.ceil(NOT_LEARNING_IMAGES / len(data[1]))

    def not_learning(record) -> bool:
        return record.epoch == judge_at and record.val_acc < NOT_LEARNING

    history = fit(build(spec), None, None, cfg, device=device, data_on_device=data, progress=False,
                  on_epoch=not_learning)
    curve = [e.val_acc for e in history.epochs]
    status = {"completed": "completed", "stopped": "not learning"}.get(history.status, history.status)
    seconds = sum(e.seconds for e in history.epochs)
    print(f"net {i}: {n_params:,} params, {cfg.optimizer} lr {cfg.lr:.3g} bs {cfg.batch_size}, {status}, "
          f"{seconds / 60:.1f} min: " + " ".join(f"{v:.3f}" for v in curve), flush=True)
    return {"draw": draw, "net": i, "n_params": n_params, "status": status, "seconds": round(seconds, 1),
            "optimizer": cfg.optimizer, "lr": cfg.lr, "batch_size": cfg.batch_size,
            **{f"e{k + 1}": v for k, v in enumerate(curve)}, "spec": spec.to_json()}


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

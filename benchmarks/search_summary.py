"""Figures of a finished (or running) search, read from its storage.

    python benchmarks/search_summary.py [--study mnist] [--storage URL] [--results-dir results]

Prints wall time (first trial start to last trial end), trained / completed / pruned / rejected / failed trials,
epochs trained in total against the no-pruning budget (trained trials x epochs: the ratio is what pruning saved),
the best validation accuracy with its parameter count, and, for pareto studies, the smallest network at or above
the 99.4% target.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from search.study import SearchOptions, feasible_completed, load_existing_study, outcome_counts, trial_frame  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--study", default="mnist")
    parser.add_argument("--storage", default=None)
    parser.add_argument("--results-dir", default="results")
    parser.add_argument("--target", type=float, default=0.994)
    args = parser.parse_args()
    url = args.storage or SearchOptions(study=args.study, results_dir=args.results_dir).storage_url
    study = load_existing_study(args.study, url)
    frame = trial_frame(study)
    counts = outcome_counts(study)
    setup = study.user_attrs.get("setup", {})
    starts, ends = frame["datetime_start"].dropna(), frame["datetime_complete"].dropna()
    wall = (ends.max() - starts.min()).total_seconds() if len(starts) and len(ends) else 0.0
    trained = frame[frame["outcome"].isin(["completed", "pruned", "failed"])]
    epochs = int(trained["epochs_trained"].fillna(0).sum())
    budget = len(trained) * setup.get("epochs", 20)
    done = feasible_completed(study)
    print(f"study {args.study} ({url}), set-up {setup}")
    print(f"wall time {wall / 60:.1f} min; trained {len(trained)}, " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print(f"epochs trained {epochs} of {budget} without pruning ({epochs / max(budget, 1):.0%}); "
          f"training time {trained['wall_s'].fillna(0).sum() / 60:.1f} min; device {', '.join(trained['device'].dropna().unique())}")
    if done:
        top = max(done, key=lambda t: (t.values[0], -t.user_attrs["n_params"]))
        print(f"best validation accuracy {top.values[0]:.2%} at {top.user_attrs['n_params']:,} params (trial {top.number})")
        reached = [t for t in done if t.values[0] >= args.target]
        if reached:
            small = min(reached, key=lambda t: t.user_attrs["n_params"])
            print(f"smallest at or above {args.target:.1%}: {small.user_attrs['n_params']:,} params, "
                  f"{small.values[0]:.2%} (trial {small.number}); {len(reached)} trials reached the target")
    print("top 5 completed:")
    for t in sorted(done, key=lambda t: -t.values[0])[:5]:
        print(f"  trial {t.number}: {t.values[0]:.2%}, {t.user_attrs['n_params']:,} params, "
              f"RF {t.user_attrs['receptive_field']}, {t.user_attrs['config']['optimizer']} lr {t.user_attrs['config']['lr']:.3g}")


if __name__ == "__main__":
    main()

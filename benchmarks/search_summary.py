"""Figures of a finished (or running) search, read from its storage.

    python benchmarks/search_summary.py [--study mnist] [--storage URL] [--results-dir results] [--target 99.4]

Prints wall time (first trial start to last trial end), trained / completed / pruned / rejected / failed trials,
epochs trained in total against the no-pruning budget (trained trials x epochs: the ratio is what pruning saved),
the best validation accuracy with its parameter count, and the smallest network at or above the target.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.rules import RULES  # noqa: E402
from search.record import (TRAINED, accuracy, candidates, leaderboard, outcome_counts, records,  # noqa: E402
                           smallest_reaching, study_size_metric)
from search.storage import default_storage_url, load_existing_study  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--study", default="mnist")
    parser.add_argument("--storage", default=None)
    parser.add_argument("--results-dir", default="results")
    parser.add_argument("--target", type=float, default=RULES.target_accuracy * 100, help="percent")
    args = parser.parse_args()
    target = args.target / 100
    url = args.storage or default_storage_url(args.results_dir, args.study)
    study = load_existing_study(args.study, url)
    counts = outcome_counts(study)
    setup = study.user_attrs.get("setup", {})
    recs = records(study)
    starts = [r.trial.datetime_start for r in recs if r.trial.datetime_start]
    ends = [r.trial.datetime_complete for r in recs if r.trial.datetime_complete]
    wall = (max(ends) - min(starts)).total_seconds() if starts and ends else 0.0
    trained = [r for r in recs if r.stored_outcome in TRAINED]
    epochs = sum(r.epochs_trained for r in trained)
    budget = len(trained) * setup.get("epochs", RULES.max_epochs)
    print(f"study {args.study} ({url}), set-up {setup}")
    print(f"wall time {wall / 60:.1f} min; trained {len(trained)}, " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print(f"epochs trained {epochs} of {budget} without pruning ({epochs / max(budget, 1):.0%}); "
          f"training time {sum(r.wall_s or 0 for r in trained) / 60:.1f} min; "
          f"device {', '.join(sorted({r.device for r in trained if r.device}))}")
    done = candidates(study)
    top, runs = leaderboard(done)
    if top:
        print(f"best validation accuracy {accuracy(top[0], runs):.2%} at {top[0].n_params:,} params "
              f"(trial {top[0].number})")
        small = smallest_reaching(done, target, study_size_metric(study))
        if small:
            reached = sum(accuracy(r, runs) >= target for r in top)
            print(f"smallest at or above {target:.1%}: {small.n_params:,} params, {accuracy(small, runs):.2%} "
                  f"(trial {small.number}); {reached} networks reached the target")
    print("top 5 completed networks (a re-run counts with its original; the mean of its runs):")
    for r in top[:5]:
        print(f"  trial {r.number}: {accuracy(r, runs):.2%} over {len(runs[r.number])} run(s), {r.n_params:,} params, "
              f"RF {r.receptive_field}, {r.config.optimizer} lr {r.config.lr:.3g}")


if __name__ == "__main__":
    main()

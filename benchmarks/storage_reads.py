"""What one finished trial's bookkeeping costs in a study of 10 and of 1,000 stored trials.

    python benchmarks/storage_reads.py [--sizes 10 1000] [--repeats 15] [--objective accuracy]

Fills an SQLite study (in a temporary folder) with stored trials made by `optuna.trial.create_trial`, with the user
attributes a real trial carries (spec, config, a 20-epoch history, outcome, ...), then finishes one more trial at a
time with `study.ask()` / `study.tell()` and times what `run_search` runs after each trial, without training: the
same functions it calls (search/study.py's per-trial step, and the CLI's line per trial). Prints the median time at
each size and the ratio of the largest to the smallest.
"""

from __future__ import annotations

import argparse
import io
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import optuna  # noqa: E402
from optuna.distributions import BaseDistribution  # noqa: E402
from optuna.trial import TrialState, create_trial  # noqa: E402

from models.budget import analyze  # noqa: E402
from models.spec import SpecError  # noqa: E402
from search import console as console_module  # noqa: E402
from search import space  # noqa: E402
from search.engine.config import EpochRecord  # noqa: E402
from search.options import SearchOptions  # noqa: E402
from search.storage import open_storage  # noqa: E402

EPOCHS = 20


def candidates(n: int, pareto: bool, seed: int = 0) -> list[tuple[dict, dict[str, BaseDistribution], dict]]:
    """`n` drawn candidates of the search space: (params, distributions, user attributes of their spec)."""
    scratch = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    drawn = []
    while len(drawn) < n:
        trial = scratch.ask()
        try:
            spec, cfg = space.suggest(trial, epochs=EPOCHS, seed=seed, param_target=pareto)
        except SpecError:  # an impossible layout: the search rejects it, untrained
            scratch.tell(trial, state=TrialState.FAIL)
            continue
        a = analyze(spec)
        drawn.append((trial.params, trial.distributions,
                      {"spec": spec.to_json(indent=None), "config": cfg.to_dict(), "n_params": a.n_params,
                       "receptive_field": a.receptive_field, "macs": a.macs, "key": f"{len(drawn):016x}",
                       "constraint": float(a.n_params - 20_000 + 1), "constraint_set": True}))
        scratch.tell(trial, state=TrialState.FAIL)
    return drawn


def history(epochs: int, rng: random.Random) -> list[dict]:
    acc = [min(0.995, 0.9 + 0.09 * (1 - 0.8 ** e) + rng.uniform(-0.005, 0.005)) for e in range(1, epochs + 1)]
    return [asdict(EpochRecord(e, 0.1 / e, a - 0.01, 0.08 / e, a, 0.05 * (1 - e / EPOCHS), 30.0 + rng.random(),
                               1700.0 + rng.random())) for e, a in enumerate(acc, start=1)]


def stored_trial(drawn: tuple, rng: random.Random, pareto: bool) -> dict:
    """The keyword arguments of `create_trial` for one stored trial: mostly completed, some pruned or rejected."""
    params, dists, attrs = drawn
    kind = rng.choices(("completed", "pruned", "rejected"), (6, 3, 1))[0]
    attrs = {**attrs, "outcome": kind, "worker": "bench:1", "preset": ""}
    if kind == "rejected":
        return dict(state=TrialState.PRUNED, params=params, distributions=dists,
                    user_attrs={**attrs, "reason": "over the budget", "constraint": 1.0})
    epochs = EPOCHS if kind == "completed" else rng.choice((1, 3, 9))
    hist = history(epochs, rng)
    attrs.update(history=hist, val_acc_curve=" ".join(f"{e['val_acc'] * 100:.2f}" for e in hist), wall_s=600.0,
                 device="cuda", precision="bf16", shards=1, epochs_trained=epochs,
                 **({} if kind == "completed" else {"reason": f"pruned after epoch {epochs}"}))
    value = hist[-1]["val_acc"]
    if kind == "completed":
        values = [value, float(attrs["n_params"])] if pareto else [value]
        return dict(state=TrialState.COMPLETE, values=values, params=params, distributions=dists, user_attrs=attrs)
    return dict(state=TrialState.PRUNED, params=params, distributions=dists, user_attrs=attrs,
                intermediate_values={e["epoch"]: e["val_acc"] for e in hist})


def fill(folder: Path, n: int, drawn: list, pareto: bool) -> tuple[optuna.Study, SearchOptions]:
    opts = SearchOptions(trials=100_000, study=f"bench{n}", results_dir=str(folder), epochs=EPOCHS,
                         storage=f"sqlite:///{folder / f'bench{n}.db'}", objective="pareto" if pareto else "accuracy",
                         target=0.999 if pareto else None)
    study = optuna.create_study(study_name=opts.study, storage=open_storage(opts.storage_url, heartbeat=None),
                                directions=["maximize", "minimize"] if pareto else ["maximize"],
                                sampler=optuna.samplers.RandomSampler(seed=0))
    rng = random.Random(n)
    study.add_trials([create_trial(**stored_trial(drawn[i % len(drawn)], rng, pareto)) for i in range(n)])
    return study, opts


def finish_one(study: optuna.Study, drawn: list, rng: random.Random, pareto: bool):
    """One more trial, through ask and tell as the search finishes one: its FrozenTrial."""
    kwargs = stored_trial(rng.choice(drawn), rng, pareto)
    while kwargs["state"] != TrialState.COMPLETE:
        kwargs = stored_trial(rng.choice(drawn), rng, pareto)
    trial = study.ask(kwargs["distributions"])
    for key, value in kwargs["user_attrs"].items():
        trial.set_user_attr(key, value)
    return study.tell(trial, kwargs["values"])


def per_trial_step(study: optuna.Study, opts: SearchOptions):
    """What run_search runs after each trial, with the CLI's line per trial as its `on_trial_end`: one callable of
    the finished trial. Made here, so its one full read of the study is not timed (run_search makes it once)."""
    from search.study import Bookkeeping

    keeper = Bookkeeping(study, opts, on_trial_end=lambda s, t: console_module.print_trial_line(s, t, opts))
    return lambda trial: keeper.after_trial(study, trial)


def measure(n: int, repeats: int, drawn: list, pareto: bool) -> float:
    with tempfile.TemporaryDirectory() as folder:
        study, opts = fill(Path(folder), n, drawn, pareto)
        step = per_trial_step(study, opts)
        rng = random.Random(1)
        times = []
        for _ in range(repeats + 1):  # the first one warms up (imports, caches)
            trial = finish_one(study, drawn, rng, pareto)
            start = time.perf_counter()
            step(trial)
            times.append(time.perf_counter() - start)
        return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 1000])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--objective", choices=("accuracy", "pareto"), default="accuracy")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    console_module.console.file = io.StringIO()  # the per-trial line is built and printed, into memory
    pareto = args.objective == "pareto"
    drawn = candidates(50, pareto)
    figures = {n: measure(n, args.repeats, drawn, pareto) for n in args.sizes}
    for n, seconds in figures.items():
        print(f"{n:>6,} stored trials: {seconds * 1000:8.2f} ms of bookkeeping per finished trial "
              f"(median of {args.repeats})")
    low, high = min(args.sizes), max(args.sizes)
    print(f"ratio {high:,} / {low:,}: {figures[high] / figures[low]:.2f}")


if __name__ == "__main__":
    main()

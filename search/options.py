"""The options of a search, checked as they are made: what `search` takes and what a study remembers of them."""

from __future__ import annotations

from dataclasses import dataclass, field

from models.rules import RULES
from search.budgets import METRICS, Budget
from search.data import DATASETS, KNOWN, N_VAL, SPLIT_SEED
from search.pruning import PRUNERS
from search.storage import HEARTBEAT, SearchError, check_study_name, storage_url, this_worker

SAMPLERS = ("tpe", "random", "nsga2")
# Bounds on numbers that would otherwise be accepted and fail much later (or never end): far above real use.
MAX_TRIALS = 100_000
MAX_BUDGET = 10_000_000  # parameters; the space's largest network has about 200,000
MAX_FIGURE = 10**12  # MACs or bytes: far above the space's largest network (some 10**7 MACs per image)
MAX_SEED = 2**31 - 1  # what numpy and torch seeds take
OBJECTIVES = ("accuracy", "pareto")
# fraction: a pareto search's default floor lies this far under the target (99.0% for MNIST's 99.4%), the default
# of `best --front --floor` too
FLOOR_BELOW_TARGET = 0.004


def default_floor(target: float | None) -> float | None:
    """The floor (fraction) of a pareto search and of `best --front` for a study with this target."""
    return None if target is None else round(target - FLOOR_BELOW_TARGET, 6)

MIN_RF = 12  # pixels: by default candidates that see less of the 28-px digit are not trained (docs/search.md)


@dataclass
class SearchOptions:
    trials: int = 50  # trained trials in the study, across all workers
    study: str = "mnist"
    storage: str | None = None  # Optuna storage URL; default sqlite:///<results>/<study>.db
    results_dir: str = "results"
    epochs: int = RULES.max_epochs
    max_params: int = RULES.max_params
    # Further bounds, each exclusive like --max-params (None: unbounded); figures as search/budgets.py counts them.
    max_macs: int | None = None  # multiply-accumulates per image
    max_activation_bytes: int | None = None  # peak activation memory, int8 bytes, batch 1
    max_model_bytes: int | None = None  # int8 weights, int32 biases and float32 scales, bytes
    size_metric: str = "params"  # pareto: the figure minimised beside accuracy, one of search.budgets.METRICS
    objective: str = "accuracy"
    sampler: str = "tpe"
    pruner: str = "sha"
    seed: int = 0
    device: str = "auto"
    jobs: int = 1
    subset: int | None = None  # train on the first N images of the training split
    data_dir: str | None = None
    dataset: str = "mnist"  # one of search.data.DATASETS
    target: float | None = None  # accuracy (fraction) the report draws and `best --target` means; default: the set's
    floor: float | None = None  # pareto: accuracy (fraction) a trial must be able to reach to go on; default target - 0.4
    # Evolution steps (search/evolution.py) and, in pareto searches, front descent. None: on for pareto, off for
    # accuracy, whose 50-trial default search it doubled in time without a smaller winner (README, "Search").
    descend: bool | None = None
    # Accuracy search: sampled candidates larger than the current winner are rejected untrained (objective.py,
    # gate_winner_bound). None: on for accuracy; a pareto search wants every size.
    winner_bound: bool | None = None
    # Accuracy search: the winner queued again with fewer parameters (search/descent.py, next_winner_descent).
    # None: off. On, seed 0's default search took 49 minutes instead of 15 on the 2-core CPU, for a winner of 13,594
    # or 14,258 parameters instead of 17,866 (docs/search.md, "Winner descent"). Pareto descends its front instead.
    winner_descent: bool | None = None
    warm_start: bool = True
    repair: bool = False
    min_rf: int = MIN_RF  # receptive field in pixels: candidates seeing less of the digit are not trained
    max_rejections: int = 200  # consecutive untrained suggestions before giving up
    threads: int | None = None  # torch CPU threads for this process; default: cores / jobs
    heartbeat: tuple[int, int] = HEARTBEAT  # seconds: heartbeat interval, grace before a silent trial is failed
    worker: str = field(default_factory=this_worker)  # host:pid; tests play a worker on another machine

    def __post_init__(self) -> None:
        def bad(name, limit):
            raise SearchError(f"--{name.replace('_', '-')}={getattr(self, name)!r}: {limit}")

        top = RULES.max_epochs
        check_study_name(self.study)
        storage_url(self.storage, self.results_dir, self.study)  # refuses in-memory SQLite
        if not 1 <= self.trials <= MAX_TRIALS:
            bad("trials", f"must be from 1 to {MAX_TRIALS:,}")
        if not 0 <= self.seed <= MAX_SEED:
            bad("seed", f"must be from 0 to {MAX_SEED:,}")
        if not 1 <= self.epochs <= top:
            bad("epochs", f"must be from 1 to {top} (the exercise allows at most {top} epochs)")
        if not 1 <= self.max_params <= MAX_BUDGET:
            bad("max_params", f"must be from 1 to {MAX_BUDGET:,}")
        if self.objective not in OBJECTIVES:
            bad("objective", f"must be one of {', '.join(OBJECTIVES)}")
        self._check_budget(bad)
        if self.sampler not in SAMPLERS:
            bad("sampler", f"must be one of {', '.join(SAMPLERS)}")
        if self.pruner not in PRUNERS:
            bad("pruner", f"must be one of {', '.join(PRUNERS)}")
        if self.jobs < 1:
            bad("jobs", "must be at least 1")
        if self.subset is not None and not 100 <= self.subset <= 50_000:
            bad("subset", "must be from 100 to 50,000 training images")
        if not 1 <= self.min_rf <= 28:
            bad("min_rf", "must be from 1 to 28 pixels")
        if self.max_rejections < 1:
            bad("max_rejections", "must be at least 1")
        if self.threads is not None and self.threads < 1:
            bad("threads", "must be at least 1")
        if self.dataset not in DATASETS:
            bad("dataset", f"must be one of {', '.join(DATASETS)}")
        if self.target is not None and not 0 < self.target <= 1:
            bad("target", "must be a percentage above 0 and at most 100")
        if self.target is None and self.dataset in KNOWN:
            self.target = KNOWN[self.dataset].target
        if self.floor is not None and not 0 < self.floor <= 1:
            bad("floor", "must be a percentage above 0 and at most 100")
        if self.floor is not None and self.objective != "pareto":
            bad("floor", "applies to --objective pareto only (the accuracy search prunes with Optuna's pruners)")
        if self.pruner == "envelope" and self.objective == "pareto":
            bad("pruner", "envelope applies to --objective accuracy only (a pareto search prunes by size, with --floor)")
        if self.floor is None and self.objective == "pareto" and self.target is not None:
            self.floor = default_floor(self.target)
        if self.descend is None:
            self.descend = self.objective == "pareto"
        if self.winner_bound and self.objective == "pareto":
            bad("winner_bound", "applies to --objective accuracy only (a pareto search trains every size)")
        if self.winner_bound is None:
            self.winner_bound = self.objective == "accuracy"
        if self.winner_descent and self.objective == "pareto":
            bad("winner_descent", "applies to --objective accuracy only (a pareto search descends its front: "
                                  "--descend)")
        if self.winner_descent is None:
            self.winner_descent = False

    def _check_budget(self, bad) -> None:
        for name in ("max_macs", "max_activation_bytes", "max_model_bytes"):
            if getattr(self, name) is not None and not 1 <= getattr(self, name) <= MAX_FIGURE:
                bad(name, f"must be from 1 to {MAX_FIGURE:,}")
        if self.size_metric not in METRICS:
            bad("size_metric", f"must be one of {', '.join(METRICS)}")
        if self.size_metric != "params" and self.objective != "pareto":
            bad("size_metric", "applies to --objective pareto only (the accuracy search has no size objective)")
        if self.size_metric not in self.budget.limits:  # its targets are drawn up to the bound
            bad("size_metric", f"needs --max-{self.size_metric}, the bound its size targets are drawn up to")

    @property
    def budget(self) -> Budget:
        """The bounds given (parameters always) and the pareto size metric."""
        given = {"params": self.max_params, "macs": self.max_macs, "activation-bytes": self.max_activation_bytes,
                 "model-bytes": self.max_model_bytes}
        return Budget({m: v for m, v in given.items() if v is not None}, self.size_metric, self.min_rf)

    @property
    def descent_levels(self) -> list[float]:
        """The accuracies whose smallest trial a pareto search shrinks (search/descent.py): target, then floor."""
        if self.objective != "pareto" or not self.descend:
            return []
        return sorted({level for level in (self.target, self.floor) if level is not None}, reverse=True)

    def with_data(self, record: dict) -> dict:
        """The set-up with the data's identity (name, md5 sums, classes, normalisation), as a study keeps it."""
        return {**self.setup(), "dataset": record}

    @property
    def storage_url(self) -> str:
        return storage_url(self.storage, self.results_dir, self.study)

    def setup(self) -> dict:
        """What makes two runs comparable: a study refuses to be continued with a different set-up."""
        return {"max_params": self.max_params, "objective": self.objective, "epochs": self.epochs,
                "subset": self.subset, "split": f"{50_000}/{N_VAL} seed {SPLIT_SEED}",
                "max_macs": self.max_macs, "max_activation_bytes": self.max_activation_bytes,
                "max_model_bytes": self.max_model_bytes, "size_metric": self.size_metric}

"""The Optuna study over the block-builder: open or resume it, gate each candidate on the budget, train, store.

Every trial ends in one of these outcomes (user attribute "outcome"):

    rejected     over the budget, or a layout that shrinks the map below 1x1: never trained; PRUNED, with a
                 positive constraint value so the sampler learns to avoid it
    duplicate    same spec and training config as a stored trial: that trial's result is reused, nothing trained
    training     claimed a training slot and is training now (state RUNNING)
    completed    trained to the last epoch
    pruned       stopped early by the pruner
    failed       the training blew up (NaN loss, an exception, out of memory): FAIL, with the reason
    interrupted  Ctrl-C or SIGTERM during the trial: FAIL, parameters queued again
    surplus      another worker filled the last training slot first: PRUNED, nothing trained

`--trials N` counts trained trials (training, completed, pruned, failed) across every process that shares the
storage: the command run again after an interruption continues to N, and parallel workers stop at N together.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import subprocess
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import optuna
import torch
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from models.budget import analyze, check, check_module
from models.build import build
from models.presets import PRESETS
from models.spec import Conv, ConvBlock, NetSpec, SpecError, Transition
from search import space
from search.data import N_VAL, SPLIT_SEED, load_mnist
from search.fsio import atomic_write_text
from search.train import MAX_EPOCHS, TrainConfig, fit, resolve_device, to_device

COUNTED = ("training", "completed", "pruned", "failed")  # outcomes that used a training slot
SAMPLERS = ("tpe", "random", "nsga2")
PRUNERS = ("sha", "hyperband", "median", "none")
RUNG_FACTOR = 3  # successive halving: rungs at epochs 1, 3, 9; a third of the trials at a rung go on to the next
OBJECTIVES = ("accuracy", "pareto")
# A worker writes a heartbeat every HEARTBEAT_S seconds; a RUNNING trial silent for GRACE_S is failed and retried.
HEARTBEAT_S, GRACE_S = (int(x) for x in os.environ.get("BUDGETNAS_HEARTBEAT", "10,60").split(","))
FAULT_ENV = "BUDGETNAS_FAULT"
# host:pid, stored on each trial so that a dead local worker's trials are found; tests set another host to play a
# worker on a different machine, whose death only heartbeats can reveal.
WORKER = os.environ.get("BUDGETNAS_WORKER") or f"{platform.node()}:{os.getpid()}"  # test hook: "exception@N" or "nan@N" makes trial number N fail that way


class SearchError(RuntimeError):
    """A search that cannot start or go on; the message says why and what to do."""


@dataclass
class SearchOptions:
    trials: int = 50  # trained trials in the study, across all workers
    study: str = "mnist"
    storage: str | None = None  # Optuna storage URL; default sqlite:///<results>/<study>.db
    results_dir: str = "results"
    epochs: int = MAX_EPOCHS
    max_params: int = 20_000
    objective: str = "accuracy"
    sampler: str = "tpe"
    pruner: str = "sha"  # with hyperband (and a wider space) a 50-trial 2-core search was on course for ~2.5 h
    seed: int = 0
    device: str = "auto"
    jobs: int = 1
    subset: int | None = None  # train on the first N images of the training split
    data_dir: str | None = None
    warm_start: bool = True
    repair: bool = False
    min_rf: int = 12  # receptive field in pixels: candidates seeing less of the 28-px digit are not trained
    max_rejections: int = 200  # consecutive untrained suggestions before giving up
    threads: int | None = None  # torch CPU threads for this process; default: cores / jobs

    def __post_init__(self) -> None:
        def bad(name, limit):
            raise SearchError(f"--{name.replace('_', '-')}={getattr(self, name)!r}: {limit}")

        if self.trials < 1:
            bad("trials", "must be at least 1")
        if not 1 <= self.epochs <= MAX_EPOCHS:
            bad("epochs", f"must be from 1 to {MAX_EPOCHS} (the exercise allows at most {MAX_EPOCHS} epochs)")
        if self.max_params < 1:
            bad("max_params", "must be at least 1")
        if self.objective not in OBJECTIVES:
            bad("objective", f"must be one of {', '.join(OBJECTIVES)}")
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

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{Path(self.results_dir) / (self.study + '.db')}"

    def setup(self) -> dict:
        """What makes two runs comparable: a study refuses to be continued with a different set-up."""
        return {"max_params": self.max_params, "objective": self.objective, "epochs": self.epochs,
                "subset": self.subset, "split": f"{50_000}/{N_VAL} seed {SPLIT_SEED}"}


# ---- storage ----------------------------------------------------------------------------------

def open_storage(url: str, heartbeat: bool = True) -> RDBStorage:
    """An RDB storage with heartbeats (stale trials of killed workers are failed and retried once)."""
    engine_kwargs = {}
    if url.startswith("sqlite"):
        # Several threads or processes on one file: wait for the lock instead of "database is locked".
        engine_kwargs = {"connect_args": {"timeout": 120}}
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    elif url.startswith("postgresql"):
        engine_kwargs = {"pool_pre_ping": True}
    for attempt in range(5):
        try:
            with warnings.catch_warnings():  # heartbeats are marked experimental, and have been since Optuna 2.8
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                kwargs = dict(heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                              heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1)
                              ) if heartbeat else {}
                return RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
        except ImportError as exc:
            raise SearchError(f"storage {url!r}: its database driver is not installed ({exc})") from None
        except Exception as exc:
            # Workers started together on a fresh database race to create Optuna's tables; the loser retries.
            if "already exists" in str(exc) or "UniqueViolation" in str(exc) or "duplicate key" in str(exc):
                time.sleep(0.5 * (attempt + 1))
                continue
            raise SearchError(f"storage {url!r} cannot be opened: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    raise SearchError(f"storage {url!r}: its tables could not be created after 5 attempts")


def load_existing_study(study_name: str, storage_url: str) -> optuna.Study:
    storage = open_storage(storage_url, heartbeat=False)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    if study_name not in names:
        known = f"; studies there: {', '.join(names)}" if names else "; it holds no study yet (run search first)"
        raise SearchError(f"no study {study_name!r} in {storage_url}{known}")
    return optuna.load_study(study_name=study_name, storage=storage)


def _sampler(opts: SearchOptions) -> optuna.samplers.BaseSampler:
    seed = opts.seed
    if opts.storage is not None:
        # A shared storage means workers: with one seed they would all suggest the same candidates in lockstep.
        seed = (opts.seed * 1_000_003 + os.getpid()) % 2**31
    if opts.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if opts.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    # Multivariate TPE models the joint choices (widths with depth); the trials' constraint values (set_constraint)
    # steer it off over-budget nets. `group` splits the conditional space (1 to 3 blocks) into its subspaces.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=10, multivariate=True, group=True)


def _pruner(opts: SearchOptions) -> optuna.pruners.BasePruner:
    """Optuna's pruner for an accuracy study. Pareto studies prune through `pareto_should_prune` instead."""
    if opts.pruner == "none" or opts.objective == "pareto":  # Optuna prunes single-objective studies only
        return optuna.pruners.NopPruner()
    if opts.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2)
    if opts.pruner == "sha":  # the most aggressive of hyperband's brackets, alone: every trial is judged at epoch 1
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=RUNG_FACTOR,
                                                      min_early_stopping_rate=0)
    return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=opts.epochs, reduction_factor=RUNG_FACTOR)


def rungs(epochs: int) -> list[int]:
    """The epochs at which successive halving judges a trial: 1, 3, 9, ... below the last epoch."""
    out, r = [], 1
    while r < epochs:
        out.append(r)
        r *= RUNG_FACTOR
    return out


def pareto_should_prune(trials: list[FrozenTrial], number: int, n_params: int, epoch: int, val_acc: float) -> bool:
    """Successive halving for the accuracy/size front (Optuna's pruners handle single objectives only).

    At each rung a trial competes only with the trials that could dominate it: those with no more parameters that
    reached the same epoch. It goes on if it is in the top third of them and itself (the best, while there are fewer
    than five rivals), so a small net is never pruned for being less accurate than bigger ones.
    """
    rivals = sorted((t.user_attrs["history"][epoch - 1]["val_acc"] for t in trials
                     if t.number != number and t.user_attrs.get("n_params", math.inf) <= n_params
                     and len(t.user_attrs.get("history") or ()) >= epoch), reverse=True)
    if not rivals:
        return False
    keep = max(1, (len(rivals) + 1) // RUNG_FACTOR)  # how many of rivals-plus-this-trial go on
    return val_acc < rivals[keep - 1]


def open_study(opts: SearchOptions) -> optuna.Study:
    storage = open_storage(opts.storage_url)
    directions = ["maximize"] if opts.objective == "accuracy" else ["maximize", "minimize"]
    existing = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    if opts.study in existing:
        stored = optuna.load_study(study_name=opts.study, storage=storage).user_attrs.get("setup")
        if stored is not None and stored != opts.setup():
            diff = ", ".join(f"{k} was {stored.get(k)!r}, now {v!r}" for k, v in opts.setup().items()
                             if stored.get(k) != v)
            raise SearchError(f"study {opts.study!r} was created with a different set-up ({diff}); "
                              "continue it with its own options, or give a new --study name")
    study = optuna.create_study(study_name=opts.study, storage=storage, directions=directions,
                                sampler=_sampler(opts), pruner=_pruner(opts),
                                load_if_exists=True)
    if "setup" not in study.user_attrs:
        study.set_user_attr("setup", opts.setup())
        study.set_user_attr("provenance", provenance())
        if opts.warm_start:
            for name, spec in PRESETS.items():
                cfg = TrainConfig(epochs=opts.epochs, seed=opts.seed)
                study.enqueue_trial(space.encode(spec, cfg), user_attrs={"preset": name}, skip_if_exists=True)
    return study


def provenance() -> dict:
    import torch

    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent.parent, timeout=5).stdout.strip()
    except Exception:
        commit = ""
    return {"code": commit or "unknown", "python": platform.python_version(), "torch": torch.__version__,
            "optuna": optuna.__version__, "host": platform.node()}


# ---- counting ---------------------------------------------------------------------------------

def is_counted(t: FrozenTrial) -> bool:
    outcome = t.user_attrs.get("outcome")
    return outcome in COUNTED and (outcome != "training" or t.state == TrialState.RUNNING)


def count_trained(study: optuna.Study) -> int:
    return sum(is_counted(t) for t in study.get_trials(deepcopy=False))


def outcome_counts(study: optuna.Study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        key = t.user_attrs.get("outcome", "stale" if t.state == TrialState.FAIL else t.state.name.lower())
        if t.state == TrialState.WAITING:
            key = "queued"  # enqueued (a preset, or a retry carrying the attributes of the trial it retries)
        elif key in ("training", "pending") and t.state == TrialState.FAIL:
            key = "stale"  # a worker died mid-trial; heartbeats failed it
        counts[key] = counts.get(key, 0) + 1
    return counts


def _claim(study: optuna.Study, trial: optuna.Trial, n_trials: int) -> str | None:
    """None if this trial may train; otherwise why not ("surplus" or "duplicate:<number>").

    Called after this trial marked itself "training". Trials numbered below it that count, or that are still
    running and may yet claim a slot, are counted against it; higher-numbered ones never are. So two workers that
    race for the last slot, or for the same candidate, cannot both win, and the lower number does.
    """
    ahead = 0
    key = trial.user_attrs.get("key")
    for t in study.get_trials(deepcopy=False):
        if t.number >= trial.number:
            continue
        pending = t.state == TrialState.RUNNING and t.user_attrs.get("outcome", "pending") == "pending"
        if is_counted(t) or pending:
            ahead += 1
            if key is not None and t.user_attrs.get("key") == key:
                return f"duplicate:{t.number}"
    return None if ahead < n_trials else "surplus"


def fail_dead_local_trials(study: optuna.Study) -> list[int]:
    """RUNNING trials of a worker on this machine whose process is gone (SIGKILL, a crash): fail them now and queue
    their parameters again once, rather than waiting for the heartbeat grace period. Returns their numbers."""
    host = platform.node()
    dead = []
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker_host, _, pid = str(t.user_attrs.get("worker", "")).rpartition(":")
        if worker_host != host or not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        if study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
            dead.append(t.number)
            if t.number not in retried:
                study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
    return dead


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def feasible_completed(study: optuna.Study) -> list[FrozenTrial]:
    """Trials trained to their last epoch within the budget: the only candidates for the best."""
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.user_attrs.get("outcome") == "completed" and t.user_attrs.get("constraint", 1) <= 0]


def requeue_interrupted(opts: SearchOptions) -> int:
    """Queue again, once, the parameters of trials stopped by Ctrl-C or SIGTERM; returns how many were queued."""
    study = load_existing_study(opts.study, opts.storage_url)
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials} | {t.system_attrs.get("failed_trial") for t in trials}
    queued = 0
    for t in trials:
        if t.user_attrs.get("outcome") == "interrupted" and t.number not in retried:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
            queued += 1
    return queued


# ---- one trial --------------------------------------------------------------------------------

def spec_key(spec: NetSpec, cfg: TrainConfig) -> str:
    blob = json.dumps({"spec": spec.to_dict(), "cfg": cfg.to_dict()}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def repair_spec(spec: NetSpec, max_params: int) -> NetSpec | None:
    """Shrink every width by one factor until the network fits the budget; None if even width 1 does not."""
    n_params = analyze(spec).n_params
    factor = math.sqrt(max_params / n_params)  # parameters grow about with the square of the width
    while factor > 0.01:
        def scale(c: int) -> int:
            return max(1, int(c * factor))

        blocks = tuple(
            ConvBlock(tuple(Conv(scale(c.out_channels), c.kernel, c.padding) for c in b.convs), b.batchnorm,
                      b.dropout, b.pool) if isinstance(b, ConvBlock) else Transition(scale(b.out_channels),
                                                                                     b.batchnorm, b.pool)
            for b in spec.blocks)
        candidate = NetSpec(blocks, spec.head, spec.in_channels, spec.input_size, spec.num_classes)
        if check(candidate, max_params).ok:
            return candidate
        factor *= 0.97
    return None


@dataclass
class TrialContext:
    opts: SearchOptions
    data: tuple  # (x_train, y_train, x_val, y_val) on the device
    device: object
    log: Callable[[str], None] = print
    consecutive_untrained: int = 0
    stop_reason: str | None = None
    progress: bool | None = None


def _set_constraint(trial: optuna.Trial, value: float) -> None:
    """<= 0 is feasible: parameters minus the budget, plus one since the rule is strict; failures are 1.

    The sampler reads the trial's constraint (TPE and NSGA-II steer away from infeasible trials), which Optuna lets
    us set once; the user attribute "constraint" keeps the latest word (a failed trial is never the best).
    """
    if "constraint_set" not in trial.user_attrs:
        trial.set_constraint("budget", float(value))
        trial.set_user_attr("constraint_set", True)
    trial.set_user_attr("constraint", float(value))


def _record_spec(trial: optuna.Trial, spec: NetSpec, cfg: TrainConfig, max_params: int) -> None:
    analysis = analyze(spec)
    trial.set_user_attr("spec", spec.to_json(indent=None))
    trial.set_user_attr("config", cfg.to_dict())
    trial.set_user_attr("n_params", analysis.n_params)
    trial.set_user_attr("receptive_field", analysis.receptive_field)
    trial.set_user_attr("macs", analysis.macs)
    trial.set_user_attr("key", spec_key(spec, cfg))
    trial.set_user_attr("constraint", float(analysis.n_params - max_params + 1))


def _find_duplicate(study: optuna.Study, trial: optuna.Trial, key: str) -> FrozenTrial | None:
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        if t.number != trial.number and t.user_attrs.get("key") == key and t.user_attrs.get("outcome") in (
                "completed", "pruned"):
            return t
    return None


def _injected_fault(trial: optuna.Trial) -> str | None:
    spec = os.environ.get(FAULT_ENV, "")
    for item in filter(None, spec.split(",")):
        kind, _, number = item.partition("@")
        if number.isdigit() and int(number) == trial.number:
            return kind
    return None


def make_objective(ctx: TrialContext) -> Callable[[optuna.Trial], float | tuple[float, float]]:
    opts = ctx.opts
    pareto = opts.objective == "pareto"
    pareto_rungs = set(rungs(opts.epochs)) if pareto and opts.pruner != "none" else set()

    def objective(trial: optuna.Trial):
        try:
            return run_trial(trial)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM, wherever the trial was: close it as interrupted
            trial.set_user_attr("outcome", "interrupted")
            trial.set_user_attr("reason", "interrupted (Ctrl-C or SIGTERM)")
            raise

    def run_trial(trial: optuna.Trial):
        study = trial.study
        # A retried trial arrives with the user attributes of the one it retries: mark it as new.
        trial.set_user_attr("outcome", "pending")
        trial.set_user_attr("worker", WORKER)
        retry_of = trial.storage.get_trial_system_attrs(trial._trial_id).get("failed_trial")
        if retry_of is not None:
            trial.set_user_attr("retry_of", retry_of)
        try:
            with warnings.catch_warnings():  # the enqueued presets may lie between the space's width steps
                warnings.filterwarnings("ignore", message="Fixed parameter .* out of range", category=UserWarning)
                spec, cfg = space.suggest(trial, epochs=opts.epochs, seed=opts.seed)
        except SpecError as exc:
            _set_constraint(trial, 1)
            return _reject(trial, f"invalid layout: {exc}")
        verdict = check(spec, opts.max_params)
        _record_spec(trial, spec, cfg, opts.max_params)
        if not verdict.ok:
            repaired = repair_spec(spec, opts.max_params) if opts.repair else None
            if repaired is None:
                _set_constraint(trial, trial.user_attrs["constraint"])
                return _reject(trial, verdict.reasons[0])
            trial.set_user_attr("repaired_from", spec.to_json(indent=None))
            trial.set_user_attr("repair_reason", verdict.reasons[0])
            spec = repaired
            _record_spec(trial, spec, cfg, opts.max_params)
        rf = trial.user_attrs["receptive_field"]
        if rf < opts.min_rf:  # measured (H200 search): 11 nets of receptive field under 12 px, none above 85% at epoch 1
            _set_constraint(trial, float(opts.min_rf - rf))
            return _reject(trial, f"receptive field {rf} px, under the {opts.min_rf} px minimum (--min-rf): "
                                  "the head would judge a digit from a fragment of it")
        _set_constraint(trial, trial.user_attrs["constraint"])
        duplicate = _find_duplicate(study, trial, trial.user_attrs["key"])
        if duplicate is not None:
            _count_untrained(trial)
            trial.set_user_attr("outcome", "duplicate")
            trial.set_user_attr("duplicate_of", duplicate.number)
            trial.set_user_attr("reason", f"same spec and training config as trial {duplicate.number}")
            if duplicate.state == TrialState.PRUNED:
                raise optuna.TrialPruned(f"duplicate of pruned trial {duplicate.number}")
            return tuple(duplicate.values) if pareto else duplicate.value

        module = build(spec)
        module_verdict = check_module(module, max_params=opts.max_params)
        if not module_verdict.ok:  # defence in depth: the real module must agree with the spec's arithmetic
            return _reject(trial, "built module refused: " + "; ".join(module_verdict.reasons))

        trial.set_user_attr("outcome", "training")
        refusal = _claim(study, trial, opts.trials)
        if refusal == "surplus":
            trial.set_user_attr("outcome", "surplus")
            trial.set_user_attr("reason", f"the study already has {opts.trials} trained trials")
            raise optuna.TrialPruned("surplus")
        if refusal is not None:  # another worker is training the same candidate right now
            _count_untrained(trial)
            other = int(refusal.split(":")[1])
            trial.set_user_attr("outcome", "duplicate")
            trial.set_user_attr("duplicate_of", other)
            trial.set_user_attr("reason", f"same spec and training config as trial {other}, trained by another worker")
            raise optuna.TrialPruned(trial.user_attrs["reason"])
        ctx.consecutive_untrained = 0
        n_params = module_verdict.n_params
        ctx.log(f"trial {trial.number}: training {n_params:,} params, RF {trial.user_attrs['receptive_field']} px, "
                f"{cfg.optimizer} lr {cfg.lr:.3g} {cfg.schedule} bs {cfg.batch_size} [{count_trained(study)}/{opts.trials} trained]")
        fault = _injected_fault(trial)
        if fault == "nan":
            cfg = TrainConfig(**{**cfg.to_dict(), "lr": 1e6, "optimizer": "sgd"})

        def on_epoch(record) -> bool:
            if fault == "exception":
                raise RuntimeError("injected fault (test hook)")
            if fault == "oom":
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test hook)")
            history_so_far.append(asdict(record))
            trial.set_user_attr("history", history_so_far)  # stored per epoch: a killed trial keeps its curve
            if pareto:
                if record.epoch not in pareto_rungs:
                    return False
                states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
                return pareto_should_prune(study.get_trials(deepcopy=False, states=states), trial.number,
                                           n_params, record.epoch, record.val_acc)
            trial.report(record.val_acc, record.epoch)
            return trial.should_prune()

        history_so_far: list[dict] = []
        start = time.perf_counter()
        try:
            history = fit(module, None, None, cfg, device=ctx.device, on_epoch=on_epoch,
                          progress=ctx.progress, data_on_device=ctx.data)
        except KeyboardInterrupt:
            trial.set_user_attr("wall_s", time.perf_counter() - start)
            raise
        except Exception as exc:
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            if "out of memory" in str(exc).lower():
                reason = "out of memory: " + reason
            trial.set_user_attr("outcome", "failed")
            trial.set_user_attr("reason", reason)
            _set_constraint(trial, 1)  # a failed trial is never the best
            trial.set_user_attr("wall_s", time.perf_counter() - start)
            raise TrialFailed(reason) from exc
        trial.set_user_attr("wall_s", time.perf_counter() - start)
        trial.set_user_attr("device", history.device)
        trial.set_user_attr("precision", history.precision)
        trial.set_user_attr("shards", history.shards)
        trial.set_user_attr("epochs_trained", len(history.epochs))  # the history itself was stored per epoch
        if history.status == "nan":
            trial.set_user_attr("outcome", "failed")
            trial.set_user_attr("reason", f"loss became NaN or infinite in epoch {len(history.epochs) + 1}")
            _set_constraint(trial, 1)
            raise TrialFailed(trial.user_attrs["reason"])
        if history.status == "stopped":
            trial.set_user_attr("outcome", "pruned")
            trial.set_user_attr("reason", f"pruned after epoch {len(history.epochs)} at {history.final_val_acc:.2%}")
            raise optuna.TrialPruned(trial.user_attrs["reason"])
        trial.set_user_attr("outcome", "completed")
        return (history.final_val_acc, float(n_params)) if pareto else history.final_val_acc

    def _count_untrained(trial: optuna.Trial) -> None:
        """Rejections and duplicates alike: too many in a row and the search stops instead of spinning."""
        ctx.consecutive_untrained += 1
        if ctx.consecutive_untrained >= opts.max_rejections:
            ctx.stop_reason = (f"{ctx.consecutive_untrained} candidates in a row were rejected or repeated: the "
                               f"space barely fits the {opts.max_params:,} budget; raise --max-params, use --repair, "
                               "or change the sampler")
            trial.study.stop()

    def _reject(trial: optuna.Trial, reason: str):
        _count_untrained(trial)
        trial.set_user_attr("outcome", "rejected")
        trial.set_user_attr("reason", reason)
        ctx.log(f"trial {trial.number}: rejected, {reason}")
        raise optuna.TrialPruned(reason)

    return objective


class TrialFailed(Exception):
    """Training blew up; the trial is marked FAIL with the reason and the study goes on."""


# ---- the search -------------------------------------------------------------------------------

@dataclass
class SearchResult:
    study: optuna.Study
    trained: int
    counts: dict[str, int]
    wall_s: float
    stop_reason: str | None = None
    csv_path: Path | None = None


def trials_csv_path(opts_or_dir: str, study_name: str) -> Path:
    return Path(opts_or_dir) / study_name / "trials.csv"


def trial_frame(study: optuna.Study):
    """One row per trial: number, state, outcome, values, parameters, spec and history as JSON strings."""
    import pandas as pd

    rows = []
    trials = study.get_trials(deepcopy=False)
    retried_as = {t.user_attrs["retry_of"]: t.number for t in trials if "retry_of" in t.user_attrs}
    for t in trials:
        attrs = t.user_attrs
        outcome, reason = attrs.get("outcome", ""), attrs.get("reason", "")
        if t.state == TrialState.FAIL and outcome in ("training", "pending"):
            outcome, reason = "stale", "its worker stopped (killed?): found dead or silent past the heartbeat grace"
        if t.number in retried_as:
            reason += f"; queued again as trial {retried_as[t.number]}"
        row = {"number": t.number, "state": t.state.name, "outcome": outcome, "reason": reason, "n_params": attrs.get("n_params"),
               "receptive_field": attrs.get("receptive_field"), "macs": attrs.get("macs"),
               "val_acc": t.values[0] if t.values else (t.intermediate_values[max(t.intermediate_values)]
                                                        if t.intermediate_values else None),
               "epochs_trained": attrs.get("epochs_trained", len(attrs.get("history", []))),
               "wall_s": attrs.get("wall_s"), "device": attrs.get("device"), "precision": attrs.get("precision", ""),
               "shards": attrs.get("shards"),
               "preset": attrs.get("preset", ""),
               "duplicate_of": attrs.get("duplicate_of"),
               "datetime_start": t.datetime_start, "datetime_complete": t.datetime_complete,
               "spec": attrs.get("spec", ""), "repaired_from": attrs.get("repaired_from", ""),
               "config": json.dumps(attrs.get("config", {}), sort_keys=True),
               "history": json.dumps(attrs.get("history", [])),
               **{f"param_{k}": v for k, v in t.params.items()}}
        rows.append(row)
    return pd.DataFrame(rows)


def write_trials_csv(study: optuna.Study, path: Path) -> Path:
    return atomic_write_text(path, trial_frame(study).to_csv(index=False))


def run_search(opts: SearchOptions, log: Callable[[str], None] = print, progress: bool | None = None,
               on_trial_end: Callable[[optuna.Study, FrozenTrial], None] | None = None) -> SearchResult:
    import torch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    device = resolve_device(opts.device)
    study = open_study(opts)
    csv_path = trials_csv_path(opts.results_dir, opts.study)
    start = time.perf_counter()
    for number in fail_dead_local_trials(study):
        log(f"trial {number}: its worker on this machine is gone (killed?); failed, and its parameters queued again")
    if count_trained(study) >= opts.trials:
        write_trials_csv(study, csv_path)
        return SearchResult(study, count_trained(study), outcome_counts(study), 0.0, None, csv_path)

    if device.type == "cpu":  # threads x parallel trials <= cores, else they thrash (measured 20x slower)
        torch.set_num_threads(opts.threads or max(1, (os.cpu_count() or 1) // opts.jobs))
    mnist = load_mnist(opts.data_dir)
    train = mnist.train.head(opts.subset) if opts.subset else mnist.train
    data = (*to_device(train, device), *to_device(mnist.val, device))
    ctx = TrialContext(opts, data, device, log, progress=progress)

    def after_trial(study: optuna.Study, trial: FrozenTrial) -> None:
        write_trials_csv(study, csv_path)
        if on_trial_end:
            on_trial_end(study, trial)
        if count_trained(study) >= opts.trials:
            study.stop()

    study.optimize(make_objective(ctx), n_trials=None, n_jobs=opts.jobs, callbacks=[after_trial],
                   catch=(TrialFailed,), gc_after_trial=False, show_progress_bar=False)
    write_trials_csv(study, csv_path)
    return SearchResult(study, count_trained(study), outcome_counts(study), time.perf_counter() - start,
                        ctx.stop_reason, csv_path)

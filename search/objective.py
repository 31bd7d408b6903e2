"""One trial of the search, as a flat list of gates. Each gate takes the trial's candidate a step further and
returns a `Refusal` or nothing; `_refuse` records a refusal, the only place an untrained outcome is written.

    suggest           the space's choices -> (NetSpec, TrainConfig); an impossible layout is rejected
    budget            parameters, MACs and int8 bytes counted from the spec (search/budgets.py); at or over a
                      bound -> rejected (or repaired with --repair)
    winner_bound      accuracy search, once the best reached --target: a sampled candidate larger than the
                      current winner -> rejected
    receptive_field   under --min-rf pixels -> rejected
    duplicate         same spec and config as a stored trial -> its result is reused
    module            the built nn.Module checked again (defence in depth) -> rejected if it disagrees
    claim             a training slot among the study's --trials, shared by every worker -> surplus or duplicate
then `_train`, which trains with pruning and writes completed, pruned or failed.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable

import optuna
import torch
from optuna.trial import TrialState

from models.budget import analyze, check, check_module
from models.build import build
from models.spec import NetSpec, SpecError
from search import space
from search.budgets import ATTRS, Budget, figures
from search.engine import TrainConfig, epoch_line, fit, planned_engine
from search.engine.runtime import stop_point
from search.options import SearchOptions
from search.pruning import (DESCENDANT_FROM_EPOCH, envelope_stop_reason, floor_stop_reason,
                            pareto_should_prune, rungs)
from search.choose import accuracy, runs_of, smallest_within_spread, winner_line
from search.evolution import STEP_ATTRS
from search.record import Outcome, TrialWriter, candidates, count_trained, records
from search.workers import claim_conflict, retry_source
from search.widths import fit_widths


class TrialFailed(Exception):
    """Training blew up; the trial is marked FAIL with the reason and the study goes on."""


@dataclass(frozen=True)
class Refusal:
    outcome: Outcome  # REJECTED, DUPLICATE or SURPLUS
    reason: str
    constraint: float | None = None  # the sampler's verdict on the trial, where this gate settles it
    duplicate_of: int | None = None
    value: float | tuple | None = None  # a duplicate of a completed trial returns that trial's values
    untrained: bool = True  # counts towards --max-rejections (untrained candidates in a row)
    winner_bound: bool = False  # refused by the winner bound: the stop after --max-rejections says so


@dataclass
class Candidate:
    """What the gates learn about the trial's network as it passes them."""

    spec: NetSpec | None = None
    cfg: TrainConfig | None = None
    module: torch.nn.Module | None = None
    n_params: int = 0


@dataclass
class TrialContext:
    opts: SearchOptions
    data: tuple  # (x_train, y_train, x_val, y_val) on the device
    device: torch.device
    log: Callable[[str], None] = print
    progress: bool | None = None
    consecutive_untrained: int = 0
    consecutive_bound: int = 0  # of those, refused by the winner bound
    stop_reason: str | None = None
    pareto_rungs: set[int] = field(default_factory=set)
    classes: int = 10  # logits the networks end in: the set's classes


# ---- the gates ------------------------------------------------------------------------------------

def gate_suggest(ctx: TrialContext, w: TrialWriter, c: Candidate) -> Refusal | None:
    try:
        with warnings.catch_warnings():  # the enqueued presets may lie between the space's width steps
            warnings.filterwarnings("ignore", message="Fixed parameter .* out of range", category=UserWarning)
            seed = w.trial.user_attrs.get("seed", ctx.opts.seed)  # an evolution re-run's other seed
            c.spec, c.cfg = space.suggest(w.trial, epochs=ctx.opts.epochs, seed=seed,
                                          param_target=ctx.opts.objective == "pareto", max_params=ctx.opts.max_params,
                                          num_classes=ctx.classes, budget=ctx.opts.budget)
    except SpecError as exc:
        return Refusal(Outcome.REJECTED, f"invalid layout: {exc}", constraint=1)
    return None


def gate_budget(ctx: TrialContext, w: TrialWriter, c: Candidate) -> Refusal | None:
    budget = ctx.opts.budget
    verdict = check(c.spec, budget.limits["params"])
    _record_spec(ctx, w, c.spec, c.cfg, budget)
    over = list(verdict.reasons[:1]) + budget.over(c.spec)  # parameters (or a whole-map conv) first, then the rest
    if not over:
        return None
    if not verdict.ok and verdict.n_params < budget.limits["params"]:
        # a conv over its whole map: fully connected; narrower widths would not change that
        return Refusal(Outcome.REJECTED, verdict.reasons[0], constraint=1)
    repaired = repair_spec(c.spec, budget) if ctx.opts.repair else None
    if repaired is None:
        return Refusal(Outcome.REJECTED, "; ".join(over), constraint=w.get("constraint"))
    w.set(repaired_from=c.spec.to_json(indent=None), repair_reason="; ".join(over))
    c.spec = repaired
    _record_spec(ctx, w, c.spec, c.cfg, budget)
    return None


def gate_winner_bound(ctx: TrialContext, w: TrialWriter, c: Candidate) -> Refusal | None:
    """An accuracy search's winner is the smallest completed net within the seed spread of the best
    (search/choose.py). A sampled candidate with more parameters than the winner so far could take its place only by
    beating the best by more than that spread, which early epochs cannot tell (docs/search.md, rank fidelity); its
    training slot goes to nets that can. The constraint it is stored with (its parameters over the winner's) steers
    the sampler to smaller nets. Only once the best has reached the study's target (--target; none: never): until
    then the best is no ceiling, and a larger net may well beat it by points. Presets, evolution steps and retries
    are queued on purpose and pass."""
    attrs = w.trial.user_attrs
    if not ctx.opts.winner_bound or any(attrs.get(k) is not None for k in ("preset", "retry_of", *STEP_ATTRS)):
        return None
    done = candidates(w.trial.study)
    if not done:
        return None
    winner, top = smallest_within_spread(done)[:2]
    if ctx.opts.target is None or accuracy(top, runs_of(done)) < ctx.opts.target:
        return None  # under the target the nets are not yet the good ones, within tenths of a point of each other
    n_params = w.get("n_params")
    if n_params <= winner.n_params:
        return None
    return Refusal(Outcome.REJECTED, f"{n_params:,} params, more than the winner so far ({winner_line(done)}): it "
                                     "could take its place only by beating the best by more than that spread "
                                     "(--no-winner-bound trains such nets)",
                   constraint=n_params - winner.n_params, winner_bound=True)


def gate_receptive_field(ctx: TrialContext, w: TrialWriter, c: Candidate) -> Refusal | None:
    rf, min_rf = w.get("receptive_field"), ctx.opts.min_rf
    if rf < min_rf:  # a head judging a digit from a fragment of it learns little (docs/search.md)
        return Refusal(Outcome.REJECTED, f"receptive field {rf} px, under the {min_rf} px minimum (--min-rf): "
                                         "the head would judge a digit from a fragment of it", constraint=min_rf - rf)
    w.set_constraint(w.get("constraint"))  # past the last rejection by arithmetic: the budget's word stands
    return None


def gate_duplicate(ctx: TrialContext, w: TrialWriter, c: Candidate) -> Refusal | None:
    key = w.get("key")
    for r in records(w.trial.study, (TrialState.COMPLETE, TrialState.PRUNED)):
        if r.number != w.trial.number and r.key == key and r.stored_outcome in (Outcome.COMPLETED, Outcome.PRUNED):
            value = None
            if r.state == TrialState.COMPLETE:
                value = tuple(r.values) if ctx.opts.objective == "pareto" else r.values[0]
            return Refusal(Outcome.DUPLICATE, f"same spec, training config and engine settings as trial {r.number}",
                           duplicate_of=r.number, value=value)
    return None


def gate_module(ctx: TrialContext, w: TrialWriter, c: Candidate) -> Refusal | None:
    c.module = build(c.spec)
    verdict = check_module(c.module, max_params=ctx.opts.max_params, num_classes=c.spec.num_classes)
    if not verdict.ok:  # the real module must agree with the spec's arithmetic
        return Refusal(Outcome.REJECTED, "built module refused: " + "; ".join(verdict.reasons))
    c.n_params = verdict.n_params
    return None


def gate_claim(ctx: TrialContext, w: TrialWriter, c: Candidate) -> Refusal | None:
    w.set(outcome=Outcome.TRAINING)
    conflict = claim_conflict(w.trial.study, w.trial.number, w.get("key"), ctx.opts.trials)
    if conflict is None:
        ctx.consecutive_untrained = ctx.consecutive_bound = 0
        return None
    outcome, other = conflict
    if outcome == Outcome.SURPLUS:
        return Refusal(outcome, f"the study already has {ctx.opts.trials} trained trials", untrained=False)
    return Refusal(outcome, f"same spec, training config and engine settings as trial {other}, trained by another worker",
                   duplicate_of=other)


GATES = (gate_suggest, gate_budget, gate_winner_bound, gate_receptive_field, gate_duplicate, gate_module, gate_claim)


# ---- recording --------------------------------------------------------------------------------------

def _record_spec(ctx: TrialContext, w: TrialWriter, spec: NetSpec, cfg: TrainConfig, budget: Budget) -> None:
    """The spec, its config and all four budget figures (search/budgets.py), before anything is trained."""
    analysis, values = analyze(spec), figures(spec)
    engine = planned_engine(cfg, ctx.device, analysis.macs, len(ctx.data[1]))
    w.set(spec=spec.to_json(indent=None), config=cfg.to_dict(), n_params=analysis.n_params,
          receptive_field=analysis.receptive_field, macs=analysis.macs, key=spec_key(spec, cfg, engine),
          activation_bytes=values["activation-bytes"], model_bytes=values["model-bytes"],
          constraint=budget.constraint(values))


def _refuse(ctx: TrialContext, w: TrialWriter, refusal: Refusal):
    """Record a refusal; return a reused value (a duplicate of a completed trial) or raise TrialPruned."""
    if refusal.untrained:
        _count_untrained(ctx, w.trial, refusal)
    if refusal.constraint is not None:
        w.set_constraint(refusal.constraint)
    extra = {} if refusal.duplicate_of is None else {"duplicate_of": refusal.duplicate_of}
    w.close(refusal.outcome, refusal.reason, **extra)
    if refusal.outcome == Outcome.REJECTED:
        ctx.log(f"trial {w.trial.number}: rejected, {refusal.reason}")
    if refusal.value is not None:
        return refusal.value
    raise optuna.TrialPruned(refusal.reason)


def _count_untrained(ctx: TrialContext, trial: optuna.Trial, refusal: Refusal) -> None:
    """Rejections and duplicates alike: too many in a row and the search stops instead of spinning. The reason says
    which: mostly the winner bound's (the sampler finds little under the winner), or the budget's and repeats."""
    ctx.consecutive_untrained += 1
    ctx.consecutive_bound += refusal.winner_bound
    n, bound = ctx.consecutive_untrained, ctx.consecutive_bound
    if n < ctx.opts.max_rejections:
        return
    if 2 * bound > n:
        ctx.stop_reason = (f"{n} candidates in a row were rejected or repeated, {bound} of them larger than the winner "
                           "so far: the sampler finds little under it. `best` certifies the winner; --no-winner-bound "
                           "trains larger nets, --max-rejections waits longer")
    else:
        ctx.stop_reason = (f"{n} candidates in a row were rejected or repeated: the space barely fits the "
                           f"{ctx.opts.max_params:,} budget; raise --max-params, use --repair, or change the sampler")
    trial.study.stop()


# ---- the objective ----------------------------------------------------------------------------------

def make_objective(ctx: TrialContext) -> Callable[[optuna.Trial], float | tuple[float, float]]:
    if ctx.opts.objective == "pareto" and ctx.opts.pruner != "none":
        ctx.pareto_rungs = set(rungs(ctx.opts.epochs))

    def objective(trial: optuna.Trial):
        w = TrialWriter(trial)
        try:
            stop_point()  # a stop requested between trials ends this one before it begins
            # A retried trial arrives with the user attributes of the one it retries: mark it as new.
            w.set(outcome=Outcome.PENDING, worker=ctx.opts.worker)
            retry_of = retry_source(trial)
            if retry_of is not None:
                w.set(retry_of=retry_of)
            candidate = Candidate()
            for gate in GATES:
                refusal = gate(ctx, w, candidate)
                if refusal is not None:
                    return _refuse(ctx, w, refusal)
            return _train(ctx, w, candidate)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM, wherever the trial was: close it as interrupted
            w.close(Outcome.INTERRUPTED, "interrupted (Ctrl-C or SIGTERM)")
            raise

    return objective


def _train(ctx: TrialContext, w: TrialWriter, c: Candidate):
    trial, opts, cfg = w.trial, ctx.opts, c.cfg
    pareto = opts.objective == "pareto"
    ctx.log(f"trial {trial.number}: training {c.n_params:,} params, RF {w.get('receptive_field')} px, "
            f"{cfg.optimizer} lr {cfg.lr:.3g} {cfg.schedule} bs {cfg.batch_size}{_lineage(trial.user_attrs)}"
            f" [trained trial {count_trained(trial.study)} of {opts.trials}]")
    so_far: list[dict] = []
    stop_reason: list[str] = []  # why the floor stop ended it (the default reason otherwise)
    rerun_of = trial.user_attrs.get("rerun_of")  # an evolution re-run of a front member trains to the end
    winner_descendant = trial.user_attrs.get("shrunk_from") is not None  # in an accuracy search: the winner shrunk

    def on_epoch(record) -> bool:
        so_far.append(asdict(record))
        w.epochs(so_far)
        ctx.log(_epoch_line(trial.number, record, cfg.epochs))
        last = record.epoch >= cfg.epochs  # trained in full: it completes, whatever a pruner would say of it now
        if not pareto:
            trial.report(record.val_acc, record.epoch)
            if last or rerun_of is not None:
                return False
            if winner_descendant:  # not halved: only the study's own curves stop it (search/descent.py)
                why = winner_descent_stop(trial, record.epoch, max(e["val_acc"] for e in so_far), cfg.epochs,
                                          opts.pruner)
                stop_reason.extend([why] if why else [])
                return why is not None
            return trial.should_prune()
        if last or record.epoch not in ctx.pareto_rungs or rerun_of is not None:
            return False
        states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
        trials = trial.study.get_trials(deepcopy=False, states=states)
        if opts.floor is not None:
            why = floor_stop_reason(trials, trial.number, record.epoch, max(e["val_acc"] for e in so_far),
                                    opts.floor, cfg.epochs)
            if why:
                stop_reason.append(why)
                return True
        return pareto_should_prune(trials, trial.number, _size(opts, w, c), record.epoch, record.val_acc,
                                   images_seen=record.epoch * len(ctx.data[1]),
                                   descendant=trial.user_attrs.get("shrunk_from", trial.user_attrs.get("parent"))
                                   is not None, metric=opts.size_metric)

    start = time.perf_counter()
    try:
        history = fit(c.module, None, None, cfg, device=ctx.device, on_epoch=on_epoch, progress=ctx.progress,
                      data_on_device=ctx.data)
    except KeyboardInterrupt:
        w.set(wall_s=time.perf_counter() - start)
        raise
    except Exception as exc:
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):  # CUDA's allocator, or Python's
            reason = "out of memory: " + reason
        w.set_constraint(1)  # a failed trial is never the best
        w.close(Outcome.FAILED, reason, wall_s=time.perf_counter() - start)
        raise TrialFailed(reason) from exc
    w.trained(history, time.perf_counter() - start)
    w.set(key=spec_key(c.spec, cfg, history.engine()))  # what trained: a fallback to another step path, another key
    if history.status == "nan":
        w.set_constraint(1)
        w.close(Outcome.FAILED, f"loss became NaN or infinite in epoch {len(history.epochs) + 1}")
        raise TrialFailed(w.get("reason"))
    if history.status == "stopped":
        w.close(Outcome.PRUNED, stop_reason[0] if stop_reason else
                f"pruned after epoch {len(history.epochs)} at {history.final_val_acc:.2%}")
        raise optuna.TrialPruned(w.get("reason"))
    w.close(Outcome.COMPLETED, None)
    return (history.final_val_acc, _size(opts, w, c)) if pareto else history.final_val_acc


def winner_descent_stop(trial: optuna.Trial, epoch: int, best_so_far: float, epochs: int,
                        pruner: str) -> str | None:
    """Why an accuracy search's winner descendant should stop after `epoch`, or None: at the rungs from epoch
    DESCENDANT_FROM_EPOCH (its first epochs swing by points, as front descendants' do), when the study's completed
    curves say it cannot come within the seed spread of the best (search/pruning.py, envelope_stop_reason). Never
    under `--pruner none`: that search stops no trial early."""
    if pruner == "none" or epoch < DESCENDANT_FROM_EPOCH or epoch not in rungs(epochs):
        return None
    done = trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return envelope_stop_reason(done, trial.number, epoch, best_so_far, epochs)


def _lineage(attrs: dict) -> str:
    """Where an evolution step came from, for its training line ("" for a sampled trial or a preset)."""
    if attrs.get("shrunk_from") is not None:
        return f", trial {attrs['shrunk_from']} shrunk to {attrs.get('shrink')} of its parameters"
    if attrs.get("parent") is not None:
        return f", child of trial {attrs['parent']} ({attrs.get('mutation')})"
    if attrs.get("rerun_of") is not None:
        return f", trial {attrs['rerun_of']} again with seed {attrs.get('seed')}"
    return ""


def _size(opts: SearchOptions, w: TrialWriter, c: Candidate) -> float:
    """A pareto search's second objective: the trained module's parameters, or the --size-metric figure stored."""
    return float(c.n_params if opts.size_metric == "params" else w.get(ATTRS[opts.size_metric]))


def _epoch_line(number: int, record, epochs: int) -> str:
    """A trial's progress after an epoch, also where no progress bar shows (a file, a pipe)."""
    left_s = record.seconds * (epochs - record.epoch)  # if the remaining epochs take as long as this one
    return epoch_line(f"trial {number}", record.epoch, epochs, "validation", record.val_acc, record.seconds, left_s)


# ---- helpers of the gates ---------------------------------------------------------------------------

def spec_key(spec: NetSpec, cfg: TrainConfig, engine: dict) -> str:
    """What makes two trials the same: network, training recipe, and the engine's precision and CPU shards."""
    blob = json.dumps({"spec": spec.to_dict(), "cfg": cfg.to_dict(), "engine": engine}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def repair_spec(spec: NetSpec, budget: Budget | int) -> NetSpec | None:
    """Shrink the widths until the network fits the budget: the largest widths of 1 or more, none above the spec's
    own, with every figure under its bound (a bare int: the parameter budget; search/widths.py); None if even
    widths of 1 do not fit."""
    budget = Budget({"params": budget}) if isinstance(budget, int) else budget
    max_params = budget.limits["params"]
    fitted = fit_widths(spec, max_params - 1, step=1, narrowest=1, shrink_only=True,
                        fits=None if budget.only_params else budget.fits)
    return fitted if check(fitted, max_params).ok and budget.fits(fitted) else None

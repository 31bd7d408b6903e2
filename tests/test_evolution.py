"""Evolution near the front (search/evolution.py), the seed-spread winner rule (search/choose.py) and the envelope
stop (search/pruning.py): pure functions on hand-made FrozenTrials, and one small real search."""

import random
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import optuna
import pytest
import torch
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from models.budget import count_params
from models.presets import PRESETS
from search import space
from search.engine import TrainConfig
from search.record import TrialRecord
from search.widths import widths

optuna.logging.set_verbosity(optuna.logging.WARNING)
START = datetime(2026, 12, 1)
ROOT = Path(__file__).resolve().parent.parent


def _distribution(value):
    if isinstance(value, bool) or isinstance(value, str):
        return CategoricalDistribution([value])
    return FloatDistribution(0, 1e6) if isinstance(value, float) else IntDistribution(0, 10**6)


def done(number: int, n_params: int, val: float, spec=None, curve=None, state=TrialState.COMPLETE,
         size_metric: str = "params", **attrs):
    """A stored trial, completed `number` minutes after START (so later numbers finished later), of a pareto study
    whose size targets are of `size_metric`."""
    spec = spec or PRESETS["micro"]
    params = space.encode(spec, TrainConfig(), param_target=True, size_metric=size_metric)
    if size_metric == "params":
        params["param_target"] = n_params
    trial = create_trial(state=state, values=[val, float(n_params)] if state == TrialState.COMPLETE else None,
                         params=params, distributions={k: _distribution(v) for k, v in params.items()},
                         user_attrs={"n_params": n_params, "outcome": "completed" if state == TrialState.COMPLETE
                                     else "queued", "constraint": 0, "spec": spec.to_json(indent=None),
                                     "config": TrainConfig().to_dict(),
                                     "history": [{"val_acc": v} for v in (curve or [val])], **attrs})
    trial.number = number
    if state == TrialState.COMPLETE:
        trial.datetime_complete = START + timedelta(minutes=number)
    return TrialRecord(trial)


# ---- mutations ---------------------------------------------------------------------------------------------------

def _differences(a: dict, b: dict) -> set:
    return {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}


def _kind(what: str) -> str:
    return what.split(" ")[0] if what.split(" ")[0] in ("width", "conv", "pool") else "recipe"


@pytest.mark.parametrize("preset,channels", [("micro", space.PARETO_CHANNELS), ("compact", space.ACCURACY_CHANNELS)])
def test_each_mutation_kind_makes_a_valid_spec_differing_in_exactly_that_one_thing(preset, channels):
    cfg = TrainConfig()
    parent_spec, parent_cfg = space.decode(space.encode(PRESETS[preset], cfg), channels)
    assert parent_spec == PRESETS[preset]
    children = space.mutations(space.encode(PRESETS[preset], cfg), channels)
    kinds = {}
    for params, what in children:
        spec, child_cfg = space.decode(params, channels)  # a valid spec: NetSpec validated it
        kind = _kind(what)
        kinds[kind] = kinds.get(kind, 0) + 1
        same_cfg = child_cfg.to_dict() == parent_cfg.to_dict()
        if kind == "width":
            changed = [i for i, (x, y) in enumerate(zip(widths(parent_spec), widths(spec))) if x != y]
            assert len(changed) == 1 and same_cfg, what
            old, new = widths(parent_spec)[changed[0]], widths(spec)[changed[0]]
            assert abs(old - new) == channels[2] and what.endswith(f": {old} -> {new}"), what
        elif kind == "conv":
            block = int(what.split("block ")[1][0])
            counts = [(len(a.convs), len(b.convs)) for a, b in zip(parent_spec.blocks, spec.blocks)
                      if hasattr(a, "convs")]
            assert [i + 1 for i, (x, y) in enumerate(counts) if x != y] == [block] and same_cfg, what
            assert abs(counts[block - 1][0] - counts[block - 1][1]) == 1
        elif kind == "pool":
            pools = [(a.pool, b.pool) for a, b in zip(parent_spec.blocks, spec.blocks)]
            assert sum(x != y for x, y in pools) == 2 and same_cfg and widths(spec) == widths(parent_spec), what
        else:  # one recipe value: the network as it was, one field of the config (or the dropout) changed
            assert (spec == parent_spec) != same_cfg, what
            changed = _differences(child_cfg.to_dict(), parent_cfg.to_dict())
            assert len(changed) == (0 if spec != parent_spec else 1), what
    assert set(kinds) == {"width", "conv", "pool", "recipe"}, kinds
    assert "width block 2 conv 1: 8 -> 6" in [w for _, w in children] or preset != "micro"
    # The accuracy search's step from its incumbent adds no parameters.
    for params, what in space.mutations(space.encode(PRESETS[preset], cfg), channels, fewer=True):
        assert count_params(space.decode(params, channels)[0]) <= count_params(PRESETS[preset]), what


def test_a_child_is_an_ordinary_trial_of_the_space_within_the_budget():
    from search.evolution import child_step

    parent = done(3, count_params(PRESETS["micro"]), 0.99)
    params, attrs = child_step(parent, pareto=True, max_params=20_000, rng=random.Random(0), known=set())
    assert attrs["parent"] == 3 and attrs["mutation"]
    # The pareto space's own suggest, with the child's fitted target, makes exactly the child.
    spec, _ = space.suggest(optuna.trial.FixedTrial(params), param_target=True)
    assert count_params(spec) == params["param_target"]
    # A child at or over the budget is never queued: under 4,582 only the children that shrink micro are, and under
    # 3,000 none (removing a conv, the largest cut, leaves about 4,000).
    for seed in range(20):
        params, _ = child_step(parent, pareto=True, max_params=4_582, rng=random.Random(seed), known=set())
        assert params["param_target"] < 4_582
    assert child_step(parent, pareto=True, max_params=3_000, rng=random.Random(0), known=set()) is None


def test_under_a_microcontroller_budget_a_child_fits_every_bound_and_keeps_its_own_size_target():
    from search.budgets import Budget, figures
    from search.evolution import child_step, next_step

    budget = Budget({"params": 20_000, "activation-bytes": 2_500, "model-bytes": 4_500}, "activation-bytes")
    sampler = optuna.samplers.RandomSampler(seed=0)
    study = optuna.create_study(sampler=sampler)
    spec = None
    while spec is None or not budget.fits(spec):
        spec, _ = space.suggest(study.ask(), param_target=True, budget=budget)
    parent = done(5, count_params(spec), 0.98, spec=spec, activation_bytes=figures(spec)["activation-bytes"])
    children = [child_step(parent, pareto=True, max_params=20_000, rng=random.Random(seed), known=set(),
                           budget=budget) for seed in range(10)]
    # The search's own step: a trial of this study (its target drawn as activation bytes) is a population member.
    member = done(5, count_params(spec), 0.98, spec=spec, size_metric="activation-bytes",
                  activation_bytes=figures(spec)["activation-bytes"])
    assert "param_target" not in member.params
    step = next_step([member], True, [0.99], max_params=20_000, rng=random.Random(0), budget=budget)
    assert step is not None and step[1]["parent"] == 5 and "activation_bytes_target" in step[0]
    assert all(c is not None for c in children)
    for params, attrs in children:
        # The pareto space's own suggest under the budget, with the child's target, makes exactly the child: the
        # target is the child's own peak activation memory, not a parameter count the space would ignore.
        child, _ = space.suggest(optuna.trial.FixedTrial(params), param_target=True, budget=budget)
        assert budget.fits(child), attrs["mutation"]
        assert params["activation_bytes_target"] == figures(child)["activation-bytes"], attrs["mutation"]
        assert "param_target" not in params


def test_the_front_of_a_size_metric_study_is_drawn_against_that_metric():
    from search.evolution import front
    from search.record import pareto_front

    # Fewer parameters but more activation memory: on the activation front the larger net dominates.
    few_params = done(0, 2_000, 0.980, activation_bytes=2_400)
    little_memory = done(1, 3_000, 0.985, activation_bytes=1_500)
    assert [r.number for r in pareto_front([few_params, little_memory])] == [0, 1]
    assert [r.number for r in pareto_front([few_params, little_memory], "activation-bytes")] == [1]
    runs = {0: [0.980], 1: [0.985]}
    assert [r.number for r in front([few_params, little_memory], runs, 0.001, "activation-bytes")[0]] == [1]
    assert [r.number for r in front([few_params, little_memory], runs, 0.001)[0]] == [0, 1]


def test_the_winner_of_a_size_metric_study_is_the_smallest_by_that_metric():
    from search.choose import smallest_within_spread, winner_line

    few_params = done(0, 2_000, 0.9800, activation_bytes=2_400)
    little_memory = done(1, 3_000, 0.9805, activation_bytes=1_500)
    assert smallest_within_spread([few_params, little_memory])[0].number == 0
    assert smallest_within_spread([few_params, little_memory], "activation-bytes")[0].number == 1
    assert winner_line([few_params, little_memory], "activation-bytes").endswith(
        "trial 1, 3,000 params, peak activation memory 1,500 bytes, 98.05%")


# ---- population, tournament, ties ----------------------------------------------------------------------------

def test_the_tournament_picks_only_front_members_within_the_age_window():
    from search.evolution import POPULATION, front, population, tournament

    # Ten old trials, small and accurate, then POPULATION newer ones: the old ones aged out and are never parents.
    old = [done(n, 2_000 + n, 0.995) for n in range(10)]
    new = [done(10 + n, 3_000 + 100 * n, 0.90 + 0.004 * n) for n in range(POPULATION)]
    new.append(done(40, 6_000, 0.95))  # beaten by more than the spread: trial 23 has 4,300 params at 95.2%
    members = population(old + new, pareto=True)
    assert [r.number for r in members] == [r.number for r in new][-POPULATION:]
    kept, tied = front(members, {r.number: [r.values[0]] for r in members}, 0.001)
    assert 40 not in [r.number for r in kept] and tied == []
    picked = {tournament(kept, {}, [0.99], random.Random(seed)).number for seed in range(50)}
    assert picked <= {r.number for r in kept} and len(picked) > 1


def test_a_tie_is_not_a_displacement_and_the_tied_member_is_rerun_first():
    from search.evolution import front, next_step

    parent = done(0, 5_000, 0.9900)
    child = done(1, 4_000, 0.9905, parent=0, mutation="width block 1 conv 1: 8 -> 6")
    sampled = done(2, 9_000, 0.9700)  # the latest trained is the sampler's: the slot is free
    runs = {r.number: [r.values[0]] for r in (parent, child, sampled)}
    assert child.origin == "trial 0, width block 1 conv 1: 8 -> 6"  # the report's `from` column
    kept, tied = front([parent, child, sampled], runs, 0.001)
    assert [r.number for r in kept] == [0, 1] and [r.number for r in tied] == [0]
    # The parent is queued again with the next seed, its own parameters, before anything else.
    step = next_step([parent, child, sampled], True, [0.994, 0.99], max_params=20_000, rng=random.Random(0))
    assert step[1] == {"rerun_of": 0, "seed": 1} and step[0] == {**parent.params, "seed": 1}
    assert done(5, 5_000, 0.99, **step[1]).origin == "trial 0 re-run with seed 1"
    # A child ahead by the spread or more displaces the parent without a re-run.
    better = done(1, 4_000, 0.9910, parent=0, mutation="...")
    kept, tied = front([parent, better], {0: [0.99], 1: [0.991]}, 0.001)
    assert [r.number for r in kept] == [1] and tied == []
    # After the re-run, the mean of the parent's runs decides: 99.00 and 98.96 -> 98.98, beaten; 99.00 and 99.20 ->
    # 99.10, not beaten.
    assert [r.number for r in front([parent, child], {0: [0.99, 0.9896], 1: [0.9905]}, 0.001)[0]] == [1]
    assert [r.number for r in front([parent, child], {0: [0.99, 0.992], 1: [0.9905]}, 0.001)[0]] == [0, 1]


def test_steps_take_every_other_slot_one_at_a_time():
    from search.evolution import next_step

    parent = done(0, 4_582, 0.99)
    args = dict(pareto=True, levels=[0.99], max_params=20_000, rng=random.Random(0))
    params, attrs = next_step([parent], **args)
    assert attrs["parent"] == 0 and attrs["mutation"]
    waiting = done(1, 4_000, 0.0, state=TrialState.WAITING, parent=0, mutation="m")
    assert next_step([parent, waiting], **args) is None  # one step at a time
    child = done(1, 4_000, 0.98, parent=0, mutation="m")
    assert next_step([parent, child], **args) is None  # never two in a row: the sampler's turn
    assert next_step([parent, child, done(2, 9_000, 0.97)], **args) is not None


# ---- the winner rule -----------------------------------------------------------------------------------------

def _study(trials):
    study = optuna.create_study()
    for r in trials:
        t = create_trial(state=TrialState.COMPLETE, value=r.values[0], params={}, distributions={},
                         user_attrs=r.attrs)
        study.add_trial(t)
    return study


def test_the_winner_is_the_smallest_within_the_seed_spread_and_trial_n_is_exactly_n():
    from search.choose import pick_winner, seed_spread, smallest_within_spread, winner_line
    from search.storage import SearchError

    trials = [done(0, 19_674, 0.9959), done(1, 15_178, 0.9954), done(2, 12_178, 0.9951), done(3, 7_442, 0.9944)]
    winner, top, spread, _ = smallest_within_spread(trials)
    assert (winner.number, top.number, spread) == (2, 0, 0.001)
    assert winner_line(trials) == ("the smallest within 0.1 points (the measured 3-seed spread) of the best "
                                   "(99.59%): trial 2, 12,178 params, 99.51%")
    study = _study(trials)
    assert pick_winner(study).number == 2
    assert pick_winner(study, trial_number=3).number == 3  # --trial N: exactly N, winner or not
    assert pick_winner(study, trial_number=0).number == 0
    with pytest.raises(SearchError, match="--trial 9: study .* has trials 0 to 3"):
        pick_winner(study, trial_number=9)
    # Measured from the study's own re-runs once three networks have two runs: pooled sd of pairs 0.2 points apart.
    reruns = [done(10 + n, t.n_params, t.values[0] - 0.002, rerun_of=t.number, seed=1) for n, t in
              enumerate(trials[:3])]
    spread, source = seed_spread(trials + reruns)
    assert spread == pytest.approx(0.002 / 2 ** 0.5) and source == "the spread of the study's 3 re-run networks"


def test_a_rerun_counts_with_its_original_for_the_best_the_target_the_front_and_the_leaderboard():
    from search.choose import front_to_certify, pick_winner
    from search.record import best, candidates, leaderboard, pareto_front, smallest_reaching
    from search.tally import StudyTally

    # Trial 1 (7,442 params) reached 99.42% once; its re-run (trial 3) 99.30%: the network's 99.36% misses 99.4%,
    # so the smallest network at 99.4% is trial 2, and the re-run is on no front of its own.
    trials = [done(0, 19_674, 0.9950), done(1, 7_442, 0.9942), done(2, 12_178, 0.9945),
              done(3, 7_442, 0.9930, rerun_of=1, seed=1)]
    assert smallest_reaching(trials[:3], 0.994).number == 1  # before the re-run
    assert smallest_reaching(trials, 0.994).number == 2
    assert [r.number for r in pareto_front(trials)] == [1, 2, 0]
    study = _study(trials)
    assert pick_winner(study, target=0.994).number == 2
    assert [r.number for r in front_to_certify(study, 0.994)] == [2, 0]
    # The best: trial 0's 99.60% and its re-run's 99.40% make 99.50%, under trial 1's single 99.55%.
    study = _study([done(0, 19_674, 0.9960), done(1, 15_178, 0.9955), done(2, 19_674, 0.9940, rerun_of=0, seed=1)])
    assert best(study).number == 1
    nets, runs = leaderboard(candidates(study))
    assert [(r.number, len(runs[r.number])) for r in nets] == [(1, 1), (0, 2)]
    tally = StudyTally(study).refresh()
    assert tally.best().number == 1 and tally.best_network()[1] == pytest.approx(0.9955)


# ---- the envelope stop ---------------------------------------------------------------------------------------

def test_the_envelope_stop_stops_a_hopeless_curve_and_keeps_a_good_one():
    from search.pruning import EnvelopePruner, envelope_stop_reason

    # Two completed 10-epoch trials: from epoch 1 they gained 3.0 and 1.5 points; the best ended at 99.5%.
    refs = [done(0, 19_674, 0.995, curve=[0.965] + [0.99] * 8 + [0.995]),
            done(1, 7_442, 0.99, curve=[0.975] + [0.985] * 8 + [0.99])]
    frozen = [r.trial for r in refs]
    # Bar: 99.5 - 0.1 = 99.4; reach = best so far + 3.0 + 0.5. 95.89% cannot; 95.91% can.
    why = envelope_stop_reason(frozen, 9, 1, 0.9589, epochs=10)
    assert why.startswith("stopped after epoch 1 at 95.89%: cannot come within 0.1 points of the best (99.50%)")
    assert envelope_stop_reason(frozen, 9, 1, 0.9591, epochs=10) is None
    assert envelope_stop_reason(frozen[:1], 9, 1, 0.10, epochs=10) is None  # one reference: nobody judged
    # The best re-run at 99.30%: its accuracy is the mean of its runs, 99.40%, the bar 99.30% (the winner's bar,
    # search/choose.py), which 95.89% + 3.0 + 0.5 points reaches; 93.79% does not.
    rerun = done(2, 19_674, 0.993, curve=[0.97] + [0.99] * 8 + [0.993], rerun_of=0).trial
    assert envelope_stop_reason(frozen + [rerun], 9, 1, 0.9589, epochs=10) is None
    assert envelope_stop_reason(frozen + [rerun], 9, 1, 0.9379, epochs=10).startswith(
        "stopped after epoch 1 at 93.79%: cannot come within 0.1 points of the best (99.40%)")
    # As Optuna's pruner: judged at the rungs only, from the trial's reported curve.
    study = optuna.create_study()
    for r in refs:
        study.add_trial(create_trial(state=TrialState.COMPLETE, value=r.values[0], user_attrs=r.attrs))
    pruner = EnvelopePruner(epochs=10)
    hopeless = create_trial(state=TrialState.RUNNING, intermediate_values={1: 0.90})
    good = create_trial(state=TrialState.RUNNING, intermediate_values={1: 0.97})
    at_epoch_2 = create_trial(state=TrialState.RUNNING, intermediate_values={1: 0.97, 2: 0.50})
    assert pruner.prune(study, hopeless) and not pruner.prune(study, good) and not pruner.prune(study, at_epoch_2)


def test_the_envelope_pruner_is_refused_for_a_pareto_search_in_one_line(tmp_path):
    out = subprocess.run([sys.executable, "cli.py", "search", "--objective", "pareto", "--pruner", "envelope",
                          "--results-dir", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "--pruner='envelope': envelope applies to --objective accuracy only" in out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr


# ---- a real search ---------------------------------------------------------------------------------------------

def test_an_accuracy_search_queues_a_child_of_its_incumbent_with_descend(tmp_path, data_root):
    from search.options import SearchOptions
    from search.study import run_search

    # Off by default in an accuracy search (the README has the timings), on in a pareto one.
    assert SearchOptions().descend is False and SearchOptions(objective="pareto").descend is True
    opts = SearchOptions(trials=3, study="evo", results_dir=str(tmp_path), epochs=1, subset=1_000,
                         data_dir=str(data_root), device="cpu", descend=True)
    recs = {r.number: r for r in map(TrialRecord, run_search(opts, log=lambda _: None).study.get_trials())}
    # The first trial (a preset) completes; the next step is a child of it (a child the gates refuse, a receptive
    # field under --min-rf say, is followed by another); one child trains, then the sampler's turn.
    kids = [r for r in recs.values() if r.attrs.get("parent") is not None]
    trained = [r for r in kids if r.is_trained]
    assert len(trained) == 1, [(r.number, r.outcome.value, r.attrs.get("mutation")) for r in recs.values()]
    kid, parent = trained[0], recs[trained[0].attrs["parent"]]
    assert parent.number == 0 and parent.is_candidate and kid.n_params <= parent.n_params
    assert (kid.spec != parent.spec) or (kid.config.to_dict() != parent.config.to_dict()), kid.attrs["mutation"]


# ---- the winner bound ----------------------------------------------------------------------------------------------

def _accuracy_study(*completed: tuple[int, float]) -> optuna.Study:
    """An in-memory accuracy study holding completed candidates of (parameters, validation accuracy)."""
    study = optuna.create_study(direction="maximize")
    for n_params, val in completed:
        study.add_trial(create_trial(state=TrialState.COMPLETE, value=val, user_attrs={
            "n_params": n_params, "outcome": "completed", "constraint": 0}))
    return study


def _gated(study: optuna.Study, spec, **user_attrs):
    """The objective's gates on a trial of `spec` queued with `user_attrs` (none: as if the sampler drew it): the
    trial as stored afterwards, and what the objective raised."""
    from search.objective import TrialContext, make_objective
    from search.options import SearchOptions

    study.enqueue_trial(space.encode(spec, TrainConfig(epochs=1), param_target=False), user_attrs=user_attrs)
    trial = study.ask()
    # data: only the training labels' count is read before training (the engine it would plan)
    ctx = TrialContext(SearchOptions(epochs=1, min_rf=1), data=(None, range(50_000)), device=torch.device("cpu"),
                       log=lambda _: None)
    with pytest.raises(optuna.TrialPruned) as raised:
        make_objective(ctx)(trial)
    study.tell(trial, state=TrialState.PRUNED)
    return study.trials[-1], str(raised.value)


def test_a_sampled_net_larger_than_the_winner_is_rejected_untrained_and_steers_the_sampler_off():
    # Winner: 7,442 params at 99.44%, within 0.1 points of the best (99.50%, 19,674 params).
    study = _accuracy_study((19_674, 0.9950), (7_442, 0.9944))
    trial, why = _gated(study, PRESETS["small"])  # 7,860 params, as if the sampler drew it
    assert why == ("7,860 params, more than the winner so far (the smallest within 0.1 points (the measured 3-seed "
                   "spread) of the best (99.50%): trial 1, 7,442 params, 99.44%): it could take its place only by "
                   "beating the best by more than that spread (--no-winner-bound trains such nets)")
    assert trial.user_attrs["outcome"] == "rejected" and "history" not in trial.user_attrs
    assert trial.constraints == {"budget": 7_860 - 7_442}  # infeasible for TPE: it samples elsewhere


def test_a_streak_of_refusals_stops_the_search_and_names_the_winner_bound_when_it_refused_most():
    from search.objective import TrialContext, make_objective
    from search.options import SearchOptions

    def streak(*specs, max_params=20_000):
        """The objective on one trial of each spec, as if the sampler drew them: the stop reason, and whether the
        study was told to stop."""
        study = _accuracy_study((19_674, 0.9950), (7_442, 0.9944))  # the winner: 7,442 params
        stopped = []
        study.stop = lambda: stopped.append(True)
        ctx = TrialContext(SearchOptions(epochs=1, min_rf=1, max_rejections=3, max_params=max_params),
                           data=(None, range(50_000)),
                           device=torch.device("cpu"), log=lambda _: None)
        objective = make_objective(ctx)
        for spec in specs:
            study.enqueue_trial(space.encode(spec, TrainConfig(epochs=1), param_target=False))
            trial = study.ask()
            with pytest.raises(optuna.TrialPruned):
                objective(trial)
            study.tell(trial, state=TrialState.PRUNED)
        return ctx.stop_reason, bool(stopped)

    small, wide = PRESETS["small"], PRESETS["baseline"]  # 7,860 and 19,674 params: both over the winner's 7,442
    assert streak(small, wide) == (None, False)
    assert streak(small, wide, small) == (
        "3 candidates in a row were rejected or repeated, 3 of them larger than the winner so far: the sampler finds "
        "little under it. `best` certifies the winner; --no-winner-bound trains larger nets, --max-rejections waits "
        "longer", True)
    # Two over a budget of 10,000 parameters, one (7,860) under it but over the winner: the budget's advice.
    assert streak(wide, small, wide, max_params=10_000) == (
        "3 candidates in a row were rejected or repeated: the space barely fits the 10,000 budget; raise "
        "--max-params, use --repair, or change the sampler", True)


def test_the_winner_bound_passes_smaller_nets_queued_trials_and_pareto_searches():
    from search.objective import TrialContext, gate_winner_bound
    from search.options import SearchOptions
    from search.record import TrialWriter

    study = _accuracy_study((19_674, 0.9950), (7_442, 0.9944))
    accuracy, pareto = SearchOptions(), SearchOptions(objective="pareto")
    assert accuracy.winner_bound is True and pareto.winner_bound is False

    def refused(n_params, opts=accuracy, **attrs):
        trial = study.ask()
        for k, v in {"n_params": n_params, **attrs}.items():
            trial.set_user_attr(k, v)
        out = gate_winner_bound(TrialContext(opts, data=(), device="cpu"), TrialWriter(trial), None)
        study.tell(trial, state=TrialState.PRUNED)
        return out is not None

    assert refused(7_443) and not refused(7_442) and not refused(1_000)
    assert not refused(7_443, SearchOptions(winner_bound=False))
    assert not refused(19_000, pareto)
    for queued in ({"preset": "baseline"}, {"parent": 1}, {"rerun_of": 1}, {"retry_of": 3}, {"shrunk_from": 1}):
        assert not refused(19_000, **queued), queued
    assert refused(19_000)  # the same net, drawn by the sampler, is refused
    # Under the target (99.4% for MNIST) the best is no ceiling: no bound; none either without a target.
    under = _accuracy_study((19_674, 0.9935), (7_442, 0.9930))
    trial = under.ask()
    trial.set_user_attr("n_params", 19_000)
    assert gate_winner_bound(TrialContext(accuracy, data=(), device="cpu"), TrialWriter(trial), None) is None
    assert refused(19_000) and not refused(19_000, SearchOptions(dataset="idx"))
    empty = _accuracy_study()
    trial = empty.ask()
    trial.set_user_attr("n_params", 19_000)
    assert gate_winner_bound(TrialContext(accuracy, data=(), device="cpu"), TrialWriter(trial), None) is None


# ---- the winner descent (accuracy searches) ------------------------------------------------------------------------

def _accuracy_done(number: int, spec, val: float, state=TrialState.COMPLETE, **attrs) -> TrialRecord:
    """A stored trial of an accuracy study (no size target in its parameters), finished `number` minutes in."""
    params = space.encode(spec, TrainConfig())
    trial = create_trial(state=state, value=val if state == TrialState.COMPLETE else None, params=params,
                         distributions={k: _distribution(v) for k, v in params.items()},
                         user_attrs={"n_params": count_params(spec), "constraint": 0, "spec": spec.to_json(indent=None),
                                     "config": TrainConfig().to_dict(), "history": [{"val_acc": val}],
                                     "outcome": {TrialState.COMPLETE: "completed", TrialState.PRUNED: "pruned"}
                                     .get(state, "queued"), **attrs})
    trial.number = number
    if state.is_finished():
        trial.datetime_complete = START + timedelta(minutes=number)
    return TrialRecord(trial)


def test_the_winner_is_shrunk_to_0_6_then_0_8_of_its_parameters_once_the_best_reached_the_target():
    from search.descent import next_winner_descent
    from search.space import ACCURACY_CHANNELS, decode

    baseline = _accuracy_done(0, PRESETS["baseline"], 0.9959)  # 19,674 params, the winner: nothing within 0.1
    # Under the target (99.4%) the best is no bar yet: no descendant; none without a target; none while the slot is
    # taken.
    assert next_winner_descent([_accuracy_done(0, PRESETS["baseline"], 0.9930)], 0.994, True) is None
    assert next_winner_descent([baseline], None, True) is None
    assert next_winner_descent([baseline], 0.994, slot_free=False) is None
    params, attrs = next_winner_descent([baseline], 0.994, True)
    assert attrs == {"shrunk_from": 0, "shrink": 0.6}
    spec, cfg = decode(params, ACCURACY_CHANNELS)
    # The same layout and recipe, every width on the accuracy grid (multiples of 8) and none wider than the winner's.
    assert widths(spec) == [16, 24, 8, 24, 24] and count_params(spec) == 11_146 <= 0.6 * 19_674
    assert cfg.to_dict() == TrainConfig().to_dict()
    # That descendant was pruned: the milder 0.8 next, then nothing more of this winner.
    pruned = _accuracy_done(1, spec, 0.98, state=TrialState.PRUNED, **attrs)
    params, attrs = next_winner_descent([baseline, pruned], 0.994, True)
    assert attrs == {"shrunk_from": 0, "shrink": 0.8} and count_params(decode(params, ACCURACY_CHANNELS)[0]) == 14_378
    milder = _accuracy_done(2, decode(params, ACCURACY_CHANNELS)[0], 0.9930, **attrs)  # 0.29 points under: no winner
    assert next_winner_descent([baseline, pruned, milder], 0.994, True) is None
    # A descendant within the seed spread of the best is the winner, and is shrunk in its turn.
    close = _accuracy_done(2, decode(params, ACCURACY_CHANNELS)[0], 0.9955, **attrs)
    params, attrs = next_winner_descent([baseline, pruned, close], 0.994, True)
    assert attrs == {"shrunk_from": 2, "shrink": 0.6}
    assert count_params(decode(params, ACCURACY_CHANNELS)[0]) <= 0.6 * 14_378
    # A winner whose narrowest widths (8) are over the goal has no descendant of that size: micro (4,582 params).
    assert next_winner_descent([_accuracy_done(0, PRESETS["micro"], 0.995)], 0.994, True) is None


def test_a_single_run_best_is_rerun_before_it_bars_a_net_within_two_spreads_and_the_mean_decides():
    from search.descent import next_winner_descent
    from search.space import ACCURACY_CHANNELS, decode

    baseline = _accuracy_done(0, PRESETS["baseline"], 0.9959)  # 19,674 params, one run
    # 11,146 params at 99.43%: 0.16 points under the best, outside its 0.1-point spread, inside 2 spreads.
    shrunk = _accuracy_done(1, decode(next_winner_descent([baseline], 0.994, True)[0], ACCURACY_CHANNELS)[0], 0.9943,
                            shrunk_from=0, shrink=0.6)
    assert next_winner_descent([baseline, shrunk], 0.994, True) == (
        {**baseline.params, "seed": 1}, {"rerun_of": 0, "seed": 1})
    # The seed after the best's own, whatever this worker's --seed: a run with its own seed would be its duplicate.
    seed3 = _accuracy_done(0, PRESETS["baseline"], 0.9959, config=TrainConfig(seed=3).to_dict())
    assert next_winner_descent([seed3, shrunk], 0.994, True)[1] == {"rerun_of": 0, "seed": 4}
    # 0.24 points under: outside 2 spreads, no re-run (the milder shrink instead).
    far = _accuracy_done(1, shrunk.spec, 0.9935, shrunk_from=0, shrink=0.6)
    assert next_winner_descent([baseline, far], 0.994, True)[1] == {"shrunk_from": 0, "shrink": 0.8}
    # Queued once: while it waits, the slot is taken; once pruned or failed it is not queued again.
    failed = _accuracy_done(2, PRESETS["baseline"], 0.0, state=TrialState.FAIL, rerun_of=0, seed=1)
    assert next_winner_descent([baseline, shrunk, failed], 0.994, True)[1] == {"shrunk_from": 0, "shrink": 0.8}
    # Re-run at 99.45%: the best's mean is 99.52%, so 11,146 params at 99.43% are within 0.1 points: the winner,
    # shrunk in its turn.
    again = _accuracy_done(2, PRESETS["baseline"], 0.9945, rerun_of=0, seed=1)
    assert next_winner_descent([baseline, shrunk, again], 0.994, True)[1] == {"shrunk_from": 1, "shrink": 0.6}


def test_a_winner_descendant_is_not_halved_and_stops_only_when_the_curves_say_it_cannot_reach_the_bar_or_never():
    from search.objective import winner_descent_stop

    study = optuna.create_study(direction="maximize")
    for curve in ([0.965, 0.97, 0.98, 0.99, 0.995], [0.975, 0.98, 0.985, 0.987, 0.99]):  # gains after epoch 3: 1.5, 0.5
        study.add_trial(create_trial(state=TrialState.COMPLETE, value=curve[-1], user_attrs={
            "n_params": 10_000, "outcome": "completed", "constraint": 0,
            "history": [{"val_acc": v} for v in curve]}))
    trial = study.ask()
    # Epochs 1 and 2: never judged (its first epochs swing), however low. Epoch 3, a rung of 5 epochs: the bar is
    # 99.5 - 0.1 = 99.4%, the reach best-so-far + 1.5 + 0.5 points.
    def stop(epoch, best_so_far, pruner="sha"):
        return winner_descent_stop(trial, epoch, best_so_far, 5, pruner)

    assert stop(1, 0.10) is None and stop(2, 0.10) is None
    why = stop(3, 0.9739)
    assert why.startswith("stopped after epoch 3 at 97.39%: cannot come within 0.1 points of the best (99.50%)")
    assert stop(3, 0.9741) is None
    assert stop(4, 0.10) is None  # not a rung (1, 3)
    assert stop(3, 0.9739, pruner="envelope") == why
    assert stop(3, 0.10, pruner="none") is None  # --pruner none: nothing stops early, descendants neither


def test_an_accuracy_search_with_winner_descent_trains_its_winner_shrunk(tmp_path, data_root):
    from search.options import SearchError, SearchOptions
    from search.study import run_search

    # Off unless asked for: it tripled the default search's time (docs/search.md, "Winner descent").
    assert SearchOptions().winner_descent is False and SearchOptions(objective="pareto").winner_descent is False
    with pytest.raises(SearchError, match="--winner-descent=True: applies to --objective accuracy only"):
        SearchOptions(objective="pareto", winner_descent=True)
    # A target any trained net reaches, so that the first completed trial (the `baseline` preset) is the winner.
    opts = SearchOptions(trials=3, study="descent", results_dir=str(tmp_path), epochs=1, subset=1_000,
                         data_dir=str(data_root), device="cpu", target=0.05, winner_descent=True)
    recs = {r.number: r for r in map(TrialRecord, run_search(opts, log=lambda _: None).study.get_trials())}
    first = recs[0]
    assert first.attrs.get("preset") == "baseline" and first.is_candidate
    shrunk = [r for r in recs.values() if r.shrunk_from is not None]
    assert [(r.number, r.shrunk_from, r.attrs["shrink"]) for r in shrunk] == [(1, 0, 0.6)]
    assert shrunk[0].is_trained and shrunk[0].n_params == 11_146
    # Every other slot at most: trial 2 is not a step.
    assert recs[2].shrunk_from is None and recs[2].attrs.get("parent") is None


def test_a_step_optuna_passes_over_as_an_existing_trial_gives_way_to_the_next_one(tmp_path):
    from search.descent import next_winner_descent
    from search.options import SearchOptions
    from search.record import params_key
    from search.study import Bookkeeping

    baseline = _accuracy_done(0, PRESETS["baseline"], 0.9959)
    first = next_winner_descent([baseline], 0.994, True)[0]  # the 0.6 descendant's parameters
    # A sampled draw with exactly those parameters, pruned: no step's record holds it, but Optuna's skip_if_exists
    # passes over a queued trial with its parameters.
    drawn = _accuracy_done(1, space.decode(first, space.ACCURACY_CHANNELS)[0], 0.97, state=TrialState.PRUNED)
    assert drawn.params == first
    later = _accuracy_done(2, PRESETS["micro"], 0.96, state=TrialState.PRUNED)  # the trial completed last
    study = optuna.create_study(direction="maximize")
    for r in (baseline, drawn, later):
        study.add_trial(r.trial)
    keeper = Bookkeeping(study, SearchOptions(trials=50, results_dir=str(tmp_path), target=0.994, winner_descent=True))
    keeper.after_trial(study, study.trials[-1])
    waiting = [t for t in study.trials if t.state == TrialState.WAITING]
    # Not the same 0.6 step after every trial while nothing is queued: the milder 0.8 one, queued once.
    assert [t.user_attrs for t in waiting] == [{"shrunk_from": 0, "shrink": 0.8}]
    assert params_key(first) in keeper.tally.params_keys()

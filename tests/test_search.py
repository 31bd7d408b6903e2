"""A real search on a small subset: storage, rejections, trials.csv, resuming to N and not past it."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from optuna.trial import TrialState

from search.record import TrialRecord, count_trained
from search.storage import load_existing_study
from search.options import SearchOptions
from search.study import run_search

ROOT = Path(__file__).resolve().parent.parent


def quiet(_line: str) -> None:
    pass


def test_search_stores_trials_rejects_over_budget_and_resumes(tmp_path, data_root):
    # A budget of 15,000 rejects the 19,674-parameter baseline preset, which is enqueued first.
    opts = SearchOptions(trials=4, study="s", results_dir=str(tmp_path), epochs=1, max_params=15_000, subset=1_000,
                         data_dir=str(data_root), device="cpu", seed=1)
    result = run_search(opts, log=quiet)
    study = result.study
    trials = study.get_trials()
    # bfloat16 where the CPU computes it natively (docs/engine.md), read here from the CPU's own flags.
    flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    machine_precision = "bf16" if {"avx512_bf16", "amx_bf16"} & set(flags) else "fp32"
    assert study.user_attrs["setup"]["precision"] == machine_precision
    assert {t.user_attrs["macs"] < 2_500_000 for t in trials if "shards" in t.user_attrs} == {True}
    trained = [t for t in trials if t.user_attrs.get("outcome") in ("completed", "pruned", "failed")]
    assert len(trained) == result.trained == 4

    baseline = trials[0]
    assert baseline.user_attrs["preset"] == "baseline"
    assert baseline.user_attrs["outcome"] == "rejected" and baseline.state == TrialState.PRUNED
    assert baseline.user_attrs["reason"] == "19,674 parameters, at or over the 15,000 budget (the rule is fewer than 15,000)"
    assert "history" not in baseline.user_attrs and baseline.user_attrs["n_params"] == 19_674

    for t in trained:
        assert json.loads(t.user_attrs["spec"])["blocks"]
        assert t.user_attrs["n_params"] < 15_000 and t.user_attrs["receptive_field"] > 1
        assert t.user_attrs["macs"] > 0 and t.user_attrs["config"]["epochs"] == 1
        assert len(t.user_attrs["history"]) == 1 and 0 <= t.user_attrs["history"][0]["val_acc"] <= 1
        assert t.user_attrs["wall_s"] > 0 and t.user_attrs["device"] == "cpu"
        assert t.user_attrs["precision"] == machine_precision
        # SGD nets under 2.5 M MACs shard one batch of 64 over both threads; the threads are the cores (2 on CI).
        # AdamW (a sampled candidate may draw it) takes torch's step, unsharded.
        sgd = t.user_attrs["config"]["optimizer"] == "sgd"
        assert t.user_attrs["shards"] == (min(2, os.cpu_count()) if t.user_attrs["macs"] < 2_500_000 and sgd else 1)
        assert t.intermediate_values or t.state == TrialState.COMPLETE

    csv = pd.read_csv(tmp_path / "s" / "trials.csv")
    assert list(csv["number"]) == [t.number for t in trials]
    assert list(csv["outcome"]) == [TrialRecord(t).outcome.value for t in trials]
    assert [None if pd.isna(v) else v for v in csv["n_params"]] == [t.user_attrs.get("n_params") for t in trials]

    # The same options again: the study already has 4 trained trials, nothing more is trained.
    again = run_search(opts, log=quiet)
    assert again.trained == 4 and len(again.study.get_trials()) == len(trials)

    # A larger N continues the same study up to N exactly.
    more = run_search(SearchOptions(**{**opts.__dict__, "trials": 5}), log=quiet)
    assert more.trained == 5 and count_trained(load_existing_study("s", opts.storage_url)) == 5


def test_duplicate_suggestion_reuses_the_stored_result(tmp_path, data_root):
    opts = SearchOptions(trials=1, study="d", results_dir=str(tmp_path), epochs=1, subset=500,
                         data_dir=str(data_root), device="cpu", warm_start=False, sampler="random")
    first = run_search(opts, log=quiet)
    done = first.study.get_trials()[0]
    first.study.enqueue_trial(done.params)  # the sampler suggests the very same candidate again
    second = run_search(SearchOptions(**{**opts.__dict__, "trials": 2}), log=quiet)
    dup = second.study.get_trials()[1]
    assert dup.user_attrs["outcome"] == "duplicate" and dup.user_attrs["duplicate_of"] == done.number
    assert dup.values == done.values and "history" not in dup.user_attrs


def test_a_result_is_reused_only_with_the_same_engine_settings(tmp_path, data_root):
    from models.presets import PRESETS
    from search import space
    from search.engine import TrainConfig

    # The micro preset (1.1 M MACs, SGD, batch 64) is sharded across 2 CPU threads, and not with 1 thread.
    params = space.encode(PRESETS["micro"], TrainConfig(epochs=1))
    opts = SearchOptions(trials=1, study="e", results_dir=str(tmp_path), epochs=1, subset=500, threads=2,
                         data_dir=str(data_root), device="cpu", warm_start=False, sampler="random",
                         descend=False)  # no evolution child between the enqueued copies
    from search.study import open_study

    open_study(opts).enqueue_trial(params)
    first = run_search(opts, log=quiet).study.get_trials()[0]
    assert first.user_attrs["shards"] == 2
    open_study(opts).enqueue_trial(params)
    same = run_search(SearchOptions(**{**opts.__dict__, "trials": 2}), log=quiet).study.get_trials()[1]
    assert same.user_attrs["outcome"] == "duplicate" and same.user_attrs["duplicate_of"] == 0
    open_study(opts).enqueue_trial(params)
    other = run_search(SearchOptions(**{**opts.__dict__, "trials": 2, "threads": 1}), log=quiet)
    assert other.trained == 2  # trial 2 trained: the 1-thread run did not reuse trial 0
    third = other.study.get_trials()[2]
    assert third.user_attrs["outcome"] in ("completed", "pruned") and third.user_attrs["shards"] == 1
    assert third.user_attrs["key"] != first.user_attrs["key"]


def test_repair_shrinks_an_over_budget_candidate(tmp_path, data_root):
    opts = SearchOptions(trials=1, study="r", results_dir=str(tmp_path), epochs=1, subset=500, max_params=10_000,
                         data_dir=str(data_root), device="cpu", repair=True)
    study = run_search(opts, log=quiet).study
    baseline = study.get_trials()[0]
    assert baseline.user_attrs["outcome"] == "completed"
    assert baseline.user_attrs["n_params"] < 10_000
    assert json.loads(baseline.user_attrs["repaired_from"]) != json.loads(baseline.user_attrs["spec"])
    assert "19,674 parameters" in baseline.user_attrs["repair_reason"]


def cli(*args, env=None):
    return [sys.executable, str(ROOT / "cli.py"), "search", *args]


def test_interrupted_search_resumes_to_n_and_not_more(tmp_path, data_root):
    # Three trained trials: trial 0, the interrupted trial 1's retry (run first, ahead of the presets still queued),
    # and the next preset.
    # Ctrl-C goes once trial 1 has finished its first epoch of three: it is training. No pruner, so that nothing
    # but the stop can end trial 1 then.
    args = cli("--trials", "3", "--epochs", "3", "--subset", "1000", "--study", "i", "--results-dir", str(tmp_path),
               "--data-dir", str(data_root), "--device", "cpu", "--pruner", "none")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # A shell running us in the background may have set SIGINT to "ignore", which children inherit; a terminal's
    # Ctrl-C reaches a foreground search with the default disposition, so give it that.
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    for line in proc.stdout:  # wait until the second trial is training, then press Ctrl-C
        lines.append(line)
        if line.startswith("trial 1: epoch 1/3"):
            proc.send_signal(signal.SIGINT)
            break
    out = "".join(lines) + proc.stdout.read()
    assert proc.wait(timeout=120) == 130, out
    assert "Run the same command to continue to 3 trials" in out
    assert "Traceback" not in out and "failed with" not in out, out  # one line of ours, none of Optuna's
    study = load_existing_study("i", f"sqlite:///{tmp_path / 'i.db'}")
    interrupted = [t for t in study.get_trials() if t.user_attrs.get("outcome") == "interrupted"]
    assert len(interrupted) == 1 and interrupted[0].state == TrialState.FAIL
    assert not [t for t in study.get_trials() if t.state == TrialState.RUNNING]

    resumed = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    study = load_existing_study("i", f"sqlite:///{tmp_path / 'i.db'}")
    assert count_trained(study) == 3
    retry = [t for t in study.get_trials() if t.user_attrs.get("retry_of") == interrupted[0].number]
    assert len(retry) == 1 and retry[0].params == interrupted[0].params
    assert retry[0].user_attrs["outcome"] == "completed"  # no pruner: it trained every epoch


def test_pareto_search_stores_accuracy_and_parameters(tmp_path, data_root):
    from search.retrain import pick_winner

    opts = SearchOptions(trials=2, study="p", results_dir=str(tmp_path), epochs=1, subset=500, max_params=9_000,
                         data_dir=str(data_root), device="cpu", objective="pareto", sampler="nsga2")
    study = run_search(opts, log=quiet).study
    assert len(study.directions) == 2
    done = [t for t in study.get_trials() if t.state == TrialState.COMPLETE]
    assert len(done) == 2 and all(t.values[1] == t.user_attrs["n_params"] for t in done)
    smallest = pick_winner(study, target=0.0)
    assert smallest.n_params == min(t.user_attrs["n_params"] for t in done)


def test_repeated_duplicates_stop_the_search_like_rejections(tmp_path, data_root):
    opts = SearchOptions(trials=1, study="dd", results_dir=str(tmp_path), epochs=1, subset=500,
                         data_dir=str(data_root), device="cpu", warm_start=False, sampler="random")
    done = run_search(opts, log=quiet).study.get_trials()[0]
    study = load_existing_study("dd", opts.storage_url)
    for _ in range(2):
        study.enqueue_trial(done.params)
    result = run_search(SearchOptions(**{**opts.__dict__, "trials": 2, "max_rejections": 2}), log=quiet)
    assert result.stop_reason and "2 candidates in a row were rejected or repeated" in result.stop_reason
    assert result.trained == 1


def test_a_too_small_receptive_field_is_rejected_untrained(tmp_path, data_root):
    # --min-rf 17 rejects the 16-px baseline preset; the 32-px threeblock preset, next in an accuracy search (largest
    # first), is the first to train.
    opts = SearchOptions(trials=1, study="rf", results_dir=str(tmp_path), epochs=1, subset=500, min_rf=17,
                         data_dir=str(data_root), device="cpu", seed=1)
    trials = run_search(opts, log=quiet).study.get_trials()
    by_preset = {t.user_attrs.get("preset"): t for t in trials}
    t = by_preset["baseline"]
    assert t.user_attrs["outcome"] == "rejected" and "history" not in t.user_attrs
    assert t.user_attrs["reason"].startswith("receptive field 16 px, under the 17 px minimum (--min-rf)")
    assert by_preset["threeblock"].user_attrs["outcome"] == "completed"
    assert by_preset["threeblock"].user_attrs["receptive_field"] == 32


def _reported(number: int, n_params: int, curve: list[float]):
    from optuna.trial import create_trial

    trial = create_trial(state=TrialState.PRUNED, user_attrs={"n_params": n_params,
                                                              "history": [{"val_acc": v} for v in curve]})
    trial.number = number
    return trial


def test_pareto_pruning_judges_a_trial_against_nets_no_larger():
    from search.pruning import pareto_should_prune, rungs

    assert rungs(20) == [1, 3, 9] and rungs(3) == [1] and rungs(1) == []
    others = [_reported(0, 19_674, [0.97]), _reported(1, 5_000, [0.95]), _reported(2, 4_000, [0.94]),
              _reported(3, 3_000, [0.93]), _reported(4, 6_000, [0.96, 0.97])]
    # Alone at its size: nothing smaller reported, so it goes on however weak.
    assert not pareto_should_prune(others, 9, 2_000, 1, 0.50)
    # 3 rivals at or under 5,500 params (0.95, 0.94, 0.93): it must be the best of the four.
    assert pareto_should_prune(others, 9, 5_500, 1, 0.945)
    assert not pareto_should_prune(others, 9, 5_500, 1, 0.951)
    # Every other trial is a rival at 20,000: 5 rivals + itself, the top 2 go on.
    assert not pareto_should_prune(others, 9, 20_000, 1, 0.965)
    assert pareto_should_prune(others, 9, 20_000, 1, 0.955)
    # Its own earlier record is not a rival; trials that stopped before the epoch are not either.
    assert not pareto_should_prune(others, 4, 6_000, 2, 0.90)
    # Not learning: alone at its size, it still stops under 50% once it has seen an epoch of the full split, but
    # not after a few thousand images of a quick look.
    assert pareto_should_prune(others, 9, 2_000, 1, 0.49, images_seen=50_000)
    assert not pareto_should_prune(others, 9, 2_000, 1, 0.50, images_seen=50_000)
    assert not pareto_should_prune(others, 9, 2_000, 3, 0.49, images_seen=6_000)
    # A descendant of the front descent is not halved at epoch 1, only from epoch 3 on; not learning still stops it.
    assert not pareto_should_prune(others, 9, 5_500, 1, 0.80, descendant=True)
    assert pareto_should_prune(others, 9, 5_500, 1, 0.49, images_seen=50_000, descendant=True)
    rivals_at_3 = [_reported(n, 3_000 + n, [0.95, 0.96, 0.97]) for n in range(3)]
    assert pareto_should_prune(rivals_at_3, 9, 5_500, 3, 0.955, descendant=True)
    # A study of another size metric: the rivals are the trials with no more of that figure, whatever their
    # parameters. Trial 1 has fewer parameters (1,500) but holds 9,000 activation bytes: at 2,000 bytes it is no
    # rival, though by parameters it would be, and would prune a trial at 97.1%.
    by_memory = [_reported(1, 1_500, [0.99]), _reported(2, 19_000, [0.97])]
    by_memory[0].user_attrs["activation_bytes"], by_memory[1].user_attrs["activation_bytes"] = 9_000, 1_800
    assert pareto_should_prune(by_memory, 9, 2_000, 1, 0.96, metric="activation-bytes")
    assert not pareto_should_prune(by_memory, 9, 2_000, 1, 0.971, metric="activation-bytes")
    assert pareto_should_prune(by_memory, 9, 2_000, 1, 0.971)  # by parameters trial 1 is a rival
    assert not pareto_should_prune(by_memory, 9, 1_700, 1, 0.50, metric="activation-bytes")


def _completed(number: int, n_params: int, curve: list[float], params: dict | None = None, **attrs):
    from optuna.distributions import IntDistribution
    from optuna.trial import create_trial

    params = params if params is not None else {"param_target": n_params}
    trial = create_trial(state=TrialState.COMPLETE, values=[curve[-1], float(n_params)], params=params,
                         distributions={k: IntDistribution(1, 10**6) for k in params},
                         user_attrs={"n_params": n_params, "outcome": "completed", "constraint": 0,
                                     "history": [{"val_acc": v} for v in curve], **attrs})
    trial.number = number
    return trial


def test_floor_stop_ends_a_trial_that_cannot_reach_the_floor_even_with_the_best_gain_seen():
    from search.pruning import floor_stop_reason

    # Two trials at or over the 99% floor; from their best by epoch 3 they gained 1.5 and 2.0 points.
    done = [_completed(0, 4_582, [0.95, 0.97, 0.966, 0.98, 0.99]), _completed(1, 7_442, [0.97, 0.975, 0.975, 0.99, 0.995]),
            _completed(2, 1_000, [0.90, 0.92, 0.93, 0.95, 0.96])]  # under the floor: not a reference
    # Largest gain 2.0 points + 0.5 margin: 96.5% by epoch 3 is the least that goes on.
    why = floor_stop_reason(done, 9, 3, 0.9649, floor=0.99, epochs=5)
    assert why and why.startswith("stopped after epoch 3 at 96.49%: cannot reach the 99.00% floor")
    assert "largest gain after epoch 3 of 2 trials that did, +2.00 points, and 0.5 more" in why
    assert floor_stop_reason(done, 9, 3, 0.9651, floor=0.99, epochs=5) is None
    # Never at epoch 1 (it misjudges nets that learn late), nor with fewer than two references, nor at the last epoch
    # of the references (no gain left to measure).
    assert floor_stop_reason(done, 9, 1, 0.50, floor=0.99, epochs=5) is None
    assert floor_stop_reason(done[1:], 9, 3, 0.50, floor=0.99, epochs=5) is None
    assert floor_stop_reason(done, 9, 5, 0.50, floor=0.99, epochs=5) is None
    # A trial is not its own reference.
    assert floor_stop_reason(done, 0, 3, 0.90, floor=0.99, epochs=5) is None


def test_front_descent_shrinks_the_smallest_trial_at_each_level_one_step_at_a_time():
    from search.descent import next_descent
    from search.record import TrialRecord

    layout = {"n_blocks": 2, "b1_c1": 8}
    done = [_completed(0, 4_582, [0.993], {**layout, "param_target": 4_582}, preset="micro"),
            _completed(1, 7_442, [0.9941], {**layout, "param_target": 7_442}),
            _completed(2, 19_674, [0.9948], {**layout, "param_target": 19_674})]
    recs = [TrialRecord(t) for t in done]
    # Neither level descended yet: the target (99.4%) first, from its smallest trial (7,442 params).
    params, attrs = next_descent(recs, [0.994, 0.99])
    assert params == {**layout, "param_target": 5_953}
    assert attrs == {"shrunk_from": 1, "shrink": 0.8, "descent_level": 0.994}
    # Its descendant waiting: nothing more is queued.
    waiting = _completed(3, 0, [0.0], {**layout, "param_target": 5_953}, shrunk_from=1, shrink=0.8,
                         descent_level=0.994)
    waiting.state = TrialState.WAITING
    assert next_descent(recs + [TrialRecord(waiting)], [0.994, 0.99]) is None
    # It fell short (pruned); the latest trained trial was a descendant, so the sampler has the next slot.
    short = _completed(3, 5_900, [0.97], {**layout, "param_target": 5_953}, shrunk_from=1, shrink=0.8,
                       descent_level=0.994)
    short.state, short.values = TrialState.PRUNED, None
    short.datetime_complete = done[2].datetime_complete.replace(year=2100)
    assert next_descent(recs + [TrialRecord(short)], [0.994, 0.99]) is None
    # After a sampler trial: the floor (descended less) now, from the smallest trial at 99.0% (micro, 4,582).
    drawn = _completed(4, 12_000, [0.99], {**layout, "param_target": 12_000})
    drawn.datetime_complete = short.datetime_complete.replace(year=2101)
    recs += [TrialRecord(short), TrialRecord(drawn)]
    params, attrs = next_descent(recs, [0.994, 0.99])
    assert params["param_target"] == 3_665 and attrs["shrunk_from"] == 0 and attrs["descent_level"] == 0.99
    # The target level alone: its source tries the milder shrink after the first fell short.
    params, attrs = next_descent(recs, [0.994])
    assert params["param_target"] == 6_697 and attrs["shrink"] == 0.9
    # Both shrinks tried: that level waits for the sampler to find a smaller net there.
    milder = _completed(5, 6_600, [0.993], {**layout, "param_target": 6_697}, shrunk_from=1, shrink=0.9,
                        descent_level=0.994)
    milder.datetime_complete = drawn.datetime_complete.replace(year=2099)
    assert next_descent(recs + [TrialRecord(milder)], [0.994]) is None
    # Without levels (accuracy searches, --no-descend) there is nothing to descend.
    assert next_descent(recs, []) is None


def test_a_pareto_search_queues_shrunk_copies_of_its_smallest_trial_at_the_floor(tmp_path, data_root):
    from models.budget import count_params

    # Under 8,000 parameters four presets train (the two larger are refused untrained); the fifth trial descends
    # from the smallest of them at the floor. The floor is as low as it goes, so that every completed trial is at
    # it whatever its accuracy after 2 epochs on 1,000 images (13-40%, by CPU and precision): the first to complete
    # is the source, and the descendant waits behind the presets queued before it.
    opts = SearchOptions(trials=5, study="descent", results_dir=str(tmp_path), epochs=2, subset=1000,
                         max_params=8_000, data_dir=str(data_root), device="cpu", objective="pareto", floor=1e-6)
    recs = list(map(TrialRecord, run_search(opts, log=quiet).study.get_trials()))
    by_number = {r.number: r for r in recs}
    kids = [r for r in recs if r.attrs.get("shrunk_from") is not None]
    assert len(kids) == 1, [(r.number, r.outcome.value, r.val_acc) for r in recs]
    first_completed = min((r for r in recs if r.is_candidate and r.number != kids[0].number),
                          key=lambda r: r.trial.datetime_complete)
    assert kids[0].attrs["shrunk_from"] == first_completed.number and kids[0].attrs["shrink"] == 0.8
    for kid in kids:
        source = by_number[kid.attrs["shrunk_from"]]
        assert source.is_candidate and source.values[0] >= 1e-6
        # The source's layout and recipe, its widths fitted to a smaller target.
        assert {k: v for k, v in kid.params.items() if k != "param_target"} == \
               {k: v for k, v in source.params.items() if k != "param_target"}
        assert kid.params["param_target"] == int(source.n_params * kid.attrs["shrink"])
        assert count_params(kid.spec) <= kid.params["param_target"] < source.n_params


def test_a_trial_that_trained_every_epoch_is_never_pruned(tmp_path, data_root):
    # With one epoch, successive halving's first rung is the last epoch: a trial judged there has trained in full,
    # and it completes (it stays a candidate for `best` and the leaderboard).
    opts = SearchOptions(trials=4, study="last", results_dir=str(tmp_path), epochs=1, subset=500,
                         data_dir=str(data_root), device="cpu", pruner="sha")
    trained = [r for r in map(TrialRecord, run_search(opts, log=quiet).study.get_trials()) if r.is_trained]
    assert len(trained) == 4
    assert [r.outcome.value for r in trained] == ["completed"] * 4
    assert all(r.trial.intermediate_values == {1: r.values[0]} for r in trained)


def test_workers_claim_indices_and_seed_their_samplers_from_them(tmp_path):
    import optuna

    from search.storage import claim_worker_index
    from search.study import make_sampler

    study = optuna.create_study(study_name="w", storage=f"sqlite:///{tmp_path / 'w.db'}")
    assert claim_worker_index(study, "hostA:1", settle_s=0) == 0
    assert claim_worker_index(study, "hostB:7", settle_s=0) == 1
    assert claim_worker_index(study, "hostA:1", settle_s=0) == 0  # its own index back
    opts = SearchOptions(seed=5, results_dir=str(tmp_path), storage=f"sqlite:///{tmp_path / 'w.db'}")

    def first_draws(index=None):
        sampler = make_sampler(opts, index) if index is not None else optuna.samplers.TPESampler(seed=5)
        return [sampler._rng.rng.random() for _ in range(3)]

    # Worker 0 draws what a lone search with --seed 5 draws; worker 1 its own, the same on every run.
    assert first_draws(0) == first_draws()
    assert first_draws(1) == first_draws(1) != first_draws(0)


def test_a_changed_setup_is_said_in_words(tmp_path):
    import optuna

    from search.storage import SearchError, check_setup

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'w.db'}")
    optuna.create_study(study_name="w", storage=storage).set_user_attr("setup", {"subset": 2000, "epochs": 2})
    with pytest.raises(SearchError, match="subset was 2000, now all 50,000 images"):
        check_setup(storage, "w", {"subset": None, "epochs": 2, "precision": "fp32"})  # a key it lacks: not compared

"""What the recipe benchmark (#27) needs of the engine, on small real data: a weight average (TrainConfig.ema) that is
the model evaluated and returned, on every step path; a piecewise per-epoch schedule; SGD without momentum."""

import json

import numpy as np
import pytest
import torch

from models.build import build
from models.presets import PRESETS
from search.engine import TrainConfig, fit, to_device
from search.engine.average import WeightAverage
from search.engine.loop import evaluate
from search.engine.steps import make_optimizer, make_scheduler
from search.engine.whole_step import schedule

PATHS = {"eager": dict(whole_step=False), "whole_step": dict(whole_step=True, shards=1),
         "whole_step_sharded": dict(whole_step=True, shards=2)}


def _float64_data(mnist, n_train: int, n_val: int) -> tuple:
    x, y = to_device(mnist.train.head(n_train), torch.device("cpu"))
    xv, yv = to_device(mnist.val.head(n_val), torch.device("cpu"))
    return x.double(), y, xv.double(), yv


def test_weight_average_of_a_toy_model_is_the_closed_form(float64):
    """avg_n = d^n w_0 + (1 - d) sum_k d^(n-k) w_k, for weights moved by hand and for BatchNorm statistics."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3))
    decay, steps = 0.9, 5
    average = WeightAverage(model, decay)
    trajectory = [[t.clone() for t in average.params + average.stats]]
    for _ in range(steps):
        with torch.no_grad():
            for t in average.params + average.stats:
                t.add_(torch.randn_like(t))
        average.update()
        trajectory.append([t.clone() for t in average.params + average.stats])
    for i, got in enumerate(average.avg_params + average.avg_stats):
        expected = decay ** steps * trajectory[0][i] + (1 - decay) * sum(
            decay ** (steps - k) * trajectory[k][i] for k in range(1, steps + 1))
        assert torch.allclose(got, expected, rtol=0, atol=1e-12), i
    live, averaged = ([t.clone() for t in ts] for ts in (average.params, average.avg_params))
    with average.swapped_in():
        assert all(torch.equal(p, a) for p, a in zip(average.params, averaged))
        assert not torch.equal(average.params[0], live[0])
    assert all(torch.equal(p, q) for p, q in zip(average.params, live))  # the live weights back after


def _snapshots(model, cfg, data, path: dict) -> tuple[list[dict], object]:
    """A fit of one step per epoch: the model's state after every step (the live weights, as on_epoch sees them)
    from the start, and the History."""
    start = {k: v.clone() for k, v in model.state_dict().items()}
    states = [start]
    history = fit(model, None, None, cfg, device="cpu", progress=False, precision="fp32", data_on_device=data,
                  reset_weights=False, on_epoch=lambda r: states.append(
                      {k: v.clone() for k, v in model.state_dict().items()}) and None, **path)
    return states, history


@pytest.mark.parametrize("path", PATHS)
def test_the_model_evaluated_and_returned_is_the_weight_average(mnist, float64, path):
    """With 64 training images at batch 64 each epoch is one step, so on_epoch sees every step's live weights. The
    average is the closed form of those (BatchNorm statistics included; with shards, of the shards' mean), it is
    what each epoch evaluates and what fit leaves in the model; the live training is the same as without it."""
    data, decay, epochs = _float64_data(mnist, 64, 200), 0.8, 4
    runs = {}
    for ema in (0.0, decay):
        torch.manual_seed(2)
        model = build(PRESETS["tiny"]).double()
        cfg = TrainConfig(epochs=epochs, batch_size=64, seed=1, ema=ema, momentum=0.9, schedule="step")
        runs[ema] = (model, *_snapshots(model, cfg, data, PATHS[path]))
    (plain_model, plain_states, plain_history), (model, states, history) = runs[0.0], runs[decay]
    assert history.step_path == path and plain_history.step_path == path
    for a, b in zip(plain_states, states):  # the average does not touch training
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(v, plain_states[-1][k]) for k, v in plain_model.state_dict().items())  # ema=0: live
    returned = model.state_dict()
    for name, value in returned.items():
        if name.endswith("num_batches_tracked"):
            assert torch.equal(value, states[-1][name])  # the live count
            continue
        expected = decay ** epochs * states[0][name] + (1 - decay) * sum(
            decay ** (epochs - k) * states[k][name] for k in range(1, epochs + 1))
        assert torch.allclose(value, expected, rtol=0, atol=1e-12), name
        assert not torch.allclose(value, states[-1][name], rtol=0, atol=1e-6), name  # not the live weights
    val_loss, val_acc = evaluate(model, data[2], data[3])
    assert history.epochs[-1].val_loss == pytest.approx(val_loss, rel=1e-12)
    assert history.epochs[-1].val_acc == val_acc
    assert plain_history.epochs[-1].val_loss != pytest.approx(val_loss, rel=1e-6)


def test_the_weight_average_trains_on_real_data(mnist):
    """A short real run with the average on (62 steps: decay 0.9 averages about the last 10), the engine's own
    choices (its precision and step path): it learns."""
    history = fit(build(PRESETS["tiny"]), mnist.train.head(2_000), mnist.val.head(500),
                  TrainConfig(epochs=2, ema=0.9), device="cpu", progress=False)
    assert history.status == "completed" and history.final_val_acc > 0.6


def test_piecewise_learning_rate_is_linear_between_its_points_at_every_step():
    cfg = TrainConfig(epochs=15, schedule="piecewise", lr=0.1, momentum=0.0)
    steps_per_epoch = 7
    total = cfg.epochs * steps_per_epoch
    expected = [0.1 * np.interp(s / steps_per_epoch, cfg.piecewise_epochs, cfg.piecewise_lr_factors)
                for s in range(total + 1)]
    assert expected[0] == pytest.approx(0.05) and expected[2 * 7] == pytest.approx(0.1)
    assert expected[8 * 7] == pytest.approx(0.01) and expected[12 * 7] == pytest.approx(0.005)
    assert expected[-1] == 0 and expected[3 * 7] == pytest.approx(0.1 + (0.01 - 0.1) / 6)
    opt = make_optimizer(torch.nn.Conv2d(1, 2, 3), cfg)
    sched = make_scheduler(opt, cfg, steps_per_epoch)
    seen = []
    for _ in range(total):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert all(a == b for a, b in seen)  # both parameter groups
    assert [s[0] for s in seen] == pytest.approx(expected[:-1], rel=1e-12, abs=1e-15)
    assert schedule(cfg, steps_per_epoch)[0] == pytest.approx(expected, rel=1e-12, abs=1e-15)  # the whole step's
    # Points after the last epoch trained are interpolated towards, never reached; the last factor holds after.
    short = TrainConfig(epochs=2, schedule="piecewise", piecewise_epochs=(0, 1, 4), piecewise_lr_factors=(1, 1, 0))
    assert schedule(short, 4)[0] == pytest.approx([0.1] * 5 + [0.1 * (1 - k / 12) for k in range(1, 5)])


def test_fit_reports_the_piecewise_rate_at_the_end_of_each_epoch(mnist):
    cfg = TrainConfig(epochs=2, schedule="piecewise", piecewise_epochs=(0, 1, 2), piecewise_lr_factors=(1, 0.5, 0.2))
    for whole_step in (False, True):
        history = fit(build(PRESETS["tiny"]), mnist.train.head(256), mnist.val.head(64), cfg, device="cpu",
                      progress=False, whole_step=whole_step, shards=1)
        assert [e.lr for e in history.epochs] == pytest.approx([0.05, 0.02])


def test_sgd_without_momentum_is_plain_sgd_on_every_path(mnist, float64):
    cfg = TrainConfig(epochs=2, batch_size=64, seed=3, momentum=0.0, schedule="step")
    opt = make_optimizer(torch.nn.Conv2d(1, 2, 3), cfg)
    assert opt.defaults["momentum"] == 0 and opt.defaults["nesterov"] is False
    assert schedule(cfg, 4)[1] == [0.0] * 8
    data = _float64_data(mnist, 256, 200)
    states = []
    for path in PATHS.values():
        torch.manual_seed(4)
        model = build(PRESETS["tiny"]).double()
        assert fit(model, None, None, cfg, device="cpu", progress=False, precision="fp32", data_on_device=data,
                   reset_weights=False, **path).status == "completed"
        states.append(model.state_dict())
    for k in states[0]:
        assert torch.allclose(states[0][k].double(), states[1][k].double(), rtol=0, atol=1e-9), k
    # OneCycle cycles the momentum itself (from onecycle_max_momentum): a config momentum of 0 changes nothing there.
    assert make_optimizer(torch.nn.Conv2d(1, 2, 3), TrainConfig(momentum=0.0)).defaults["nesterov"] is True


def test_new_fields_round_trip_as_json_and_old_configs_take_their_defaults():
    cfg = TrainConfig(ema=0.999, schedule="piecewise", piecewise_epochs=(0, 2.5, 15), piecewise_lr_factors=(0.5, 1, 0))
    stored = json.loads(json.dumps(cfg.to_dict()))
    assert stored == cfg.to_dict() and TrainConfig.from_dict(stored) == cfg
    before_27 = {k: v for k, v in TrainConfig().to_dict().items()
                 if k not in ("ema", "piecewise_epochs", "piecewise_lr_factors")}
    old = TrainConfig.from_dict(before_27)
    assert old == TrainConfig() and old.ema == 0.0 and old.piecewise_epochs == (0, 2, 8, 12, 15)


@pytest.mark.parametrize("changes, message", [
    ({"ema": 1.0}, "ema=1.0: must be in [0, 1) (0 = off)"),
    ({"ema": -0.1}, "ema=-0.1: must be in [0, 1)"),
    ({"piecewise_epochs": (1, 2)}, "piecewise_epochs=(1, 2): must be increasing epochs starting at 0"),
    ({"piecewise_epochs": (0, 3, 3)}, "piecewise_epochs=(0, 3, 3): must be increasing"),
    ({"piecewise_lr_factors": (1, 0)}, "piecewise_lr_factors=(1, 0): must be one factor of lr (>= 0, not all 0) "
                                       "per point of piecewise_epochs (5)"),
    ({"piecewise_lr_factors": (0, 0, 0, 0, 0)}, "piecewise_lr_factors=(0, 0, 0, 0, 0): must be one factor"),
    ({"piecewise_epochs": (), "piecewise_lr_factors": ()}, "piecewise_epochs=(): must be increasing"),
])
def test_bad_ema_or_piecewise_points_are_refused_naming_the_value(changes, message):
    with pytest.raises(ValueError) as info:
        TrainConfig(**changes)
    assert message in str(info.value)


def test_the_recipe_plan_screens_momentum_under_cosine_against_cosine():
    """The factors added for #27 come after the stored runs' ones; momentum, which OneCycle would override, runs
    under the cosine schedule, is judged against cosine at the default momentum, and brings cosine into the
    combination only where no schedule was confirmed."""
    import pandas as pd

    from benchmarks.recipe import FACTORS, planned_runs, recipe_name

    assert list(FACTORS)[-3:] == ["ema", "momentum", "precision"] and list(FACTORS)[:2] == ["lr", "batch_size"]
    screen = planned_runs(pd.DataFrame(), seeds=2)
    assert [recipe_name(c) for layout, c, _ in screen if layout == "p3702"][-5:] == [
        "ema=0.99", "ema=0.999", "momentum=0.8,schedule=cosine", "momentum=0.95,schedule=cosine", "precision=fp32"]

    def scores(good: dict) -> pd.DataFrame:  # every screened run at 0.98, those named in `good` higher
        rows = [{"layout": layout, "recipe": recipe_name(c), "seed": seed, "final_val_acc": good.get(recipe_name(c),
                 0.98)} for layout, c, seed in planned_runs(pd.DataFrame(), seeds=2)]
        return pd.DataFrame(rows)

    # Momentum 0.95 beats the default but not cosine at 0.9: not a winner.
    plan = planned_runs(scores({"momentum=0.95,schedule=cosine": 0.99, "schedule=cosine": 0.995}), seeds=2)
    confirm = {recipe_name(c) for layout, c, _ in plan[len(screen):] if layout == "p3702"}
    assert confirm == {"default", "schedule=cosine"}
    # Momentum 0.95 beats cosine at 0.9: confirmed against it, with 2 seeds, then combined with cosine.
    good = {"momentum=0.95,schedule=cosine": 0.99, "ema=0.999": 0.99}
    done = scores(good)
    plan = planned_runs(done, seeds=2)
    confirm = [(recipe_name(c), seed) for layout, c, seed in plan[len(screen):] if layout == "p3702"]
    assert confirm == [(r, s) for r in ("default", "schedule=cosine", "ema=0.999", "momentum=0.95,schedule=cosine")
                       for s in (0, 1)]
    confirmed = pd.DataFrame([{"layout": "p3702", "recipe": r, "seed": s, "final_val_acc": good.get(r, 0.98)}
                              for r, s in confirm])
    plan = planned_runs(pd.concat([done, confirmed], ignore_index=True), seeds=2)
    assert [recipe_name(c) for layout, c, _ in plan if layout == "p3702"][-2:] == [
        "ema=0.999,momentum=0.95,schedule=cosine"] * 2



def test_a_factor_screened_ahead_of_the_plan_is_confirmed_before_the_rest_is_screened():
    """`--factors precision` takes one question to its seeds: once precision is screened on a layout and beat the
    default, its confirmation is planned there although the other factors are not screened; the combination is not."""
    import pandas as pd

    from benchmarks.recipe import planned_runs, recipe_name

    rows = [{"layout": "p3702", "recipe": r, "seed": 0, "final_val_acc": a}
            for r, a in (("default", 0.9923), ("precision=fp32", 0.9934), ("lr=0.05", 0.9913))]
    rows += [{"layout": "p2510", "recipe": r, "seed": 0, "final_val_acc": a}
             for r, a in (("default", 0.99), ("precision=fp32", 0.98))]  # screened, lost: nothing to confirm
    done = pd.DataFrame(rows)
    screen = planned_runs(pd.DataFrame(), seeds=3)
    plan = planned_runs(done, seeds=3)
    assert [(layout, recipe_name(c), seed) for layout, c, seed in plan[len(screen):]] == [
        ("p3702", r, s) for r in ("default", "precision=fp32") for s in range(3)]
    # With all three seeds of both, still no combination: the layout's other factors are not screened.
    seeds = pd.DataFrame([{"layout": "p3702", "recipe": r, "seed": s, "final_val_acc": a}
                          for r, a in (("default", 0.9923), ("precision=fp32", 0.9934)) for s in (1, 2)])
    assert planned_runs(pd.concat([done, seeds], ignore_index=True), seeds=3) == plan

def test_plain_pytorch_benchmark_trains_both_ways_resumes_and_refuses_bad_input(data_root, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    import pandas as pd

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "plain_pytorch.py"
    runs = tmp_path / "runs.csv"

    def run(*extra):
        return subprocess.run([sys.executable, str(script), "--runs", str(runs), "--epochs", "1", "--subset", "256",
                               "--val", "256", "--seeds", "1", "--device", "cpu", "--data-dir", str(data_root),
                               *extra], capture_output=True, text=True, timeout=600)

    first = run()
    assert first.returncode == 0, first.stderr
    stored = pd.read_csv(runs)
    assert list(zip(stored.trainer, stored.seed)) == [("engine", 0), ("plain", 0)]
    assert set(stored.status) == {"completed"} and stored.e1.between(0, 1).all()
    assert list(stored.precision)[1] == "fp32" and list(stored.shards)[1] == 1
    assert "engine: " in first.stdout and "plain: " in first.stdout
    again = run()
    assert again.returncode == 0 and "seed 0" not in again.stdout and "2 runs stored" in again.stdout
    assert pd.read_csv(runs).equals(stored)  # nothing trained twice
    bad = run("--recipe", "nope")
    assert bad.returncode == 2 and bad.stdout == "" and "Traceback" not in bad.stderr
    assert bad.stderr == "error: --recipe 'nope': must be one of ['default', 'published']\n"


def test_a_config_that_uses_nothing_of_27_is_stored_as_before_it():
    """Stored configs key duplicates (objective.spec_key) and are compared with certificates: one that uses no
    weight average and no piecewise schedule keeps the dict it had before #27's fields."""
    before = {"ema", "piecewise_epochs", "piecewise_lr_factors"}
    for cfg in (TrainConfig(), TrainConfig(schedule="step", momentum=0.0, seed=4)):
        assert set(cfg.to_dict()) == {f for f in TrainConfig.__dataclass_fields__} - before
        assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert set(TrainConfig(ema=0.99).to_dict()) - set(TrainConfig().to_dict()) == {"ema"}
    piecewise = TrainConfig(schedule="piecewise").to_dict()  # its points always stored: defaults may change
    assert piecewise["piecewise_epochs"] == [0, 2, 8, 12, 15] and "ema" not in piecewise
    odd = TrainConfig(schedule="step", piecewise_epochs=(0, 1), piecewise_lr_factors=(1, 0))
    assert TrainConfig.from_dict(json.loads(json.dumps(odd.to_dict()))) == odd

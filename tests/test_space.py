"""The search space, tested with FixedTrial: presets are inside it, and both ends of the budget are reachable."""

import warnings

import optuna
import pytest

from models.budget import count_params
from models.presets import PRESETS
from models.spec import SpecError
from search.space import encode, suggest
from search.engine import TrainConfig


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_round_trip_through_the_space(name):
    cfg = TrainConfig(epochs=15)
    spec, again = suggest(optuna.trial.FixedTrial(encode(PRESETS[name], cfg)), epochs=15)
    assert spec == PRESETS[name] and again == cfg


def params(**over):
    base = {"n_blocks": 2, "batchnorm": True, "dropout": 0.05, "head": "conv_gap", "optimizer": "sgd",
            "batch_size": 128, "sgd_lr": 0.1, "schedule": "onecycle", "label_smoothing": 0.05, "augment": 1.0,
            "b1_convs": 2, "b1_padding": 0, "b1_pool": True, "t1": True, "t1_c": 8,
            "b2_convs": 2, "b2_padding": 0, "b2_pool": True}
    base.update(over)
    return base


def on_grid(values: dict):
    """A FixedTrial that refuses any value the space could not sample (widths come in steps of 8)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return suggest(optuna.trial.FixedTrial(values))


def test_a_network_of_about_3000_parameters_is_reachable():
    spec, _ = on_grid(params(b1_convs=1, b1_c1=16, t1_c=16, b2_c1=8, b2_c2=16))
    assert 2_900 <= count_params(spec) <= 3_100, count_params(spec)


def test_a_network_of_about_19900_parameters_is_reachable():
    spec, _ = on_grid(params(
        n_blocks=3, b1_c1=16, b1_c2=24, t1_c=16, b2_c1=24, b2_c2=32, b2_pool=False, t2=True, t2_c=16,
        b3_convs=2, b3_padding=0, b3_c1=16, b3_c2=16, b3_pool=False))
    assert 19_900 <= count_params(spec) < 20_000, count_params(spec)


def test_widths_come_in_steps_of_eight():
    with pytest.raises(UserWarning, match="out of the range"):
        on_grid(params(b1_c1=12, b1_c2=16, b2_c1=16, b2_c2=16))


def test_training_choices_come_from_the_trial():
    _, cfg = suggest(optuna.trial.FixedTrial(params(b1_c1=8, b1_c2=8, b2_c1=8, b2_c2=8, optimizer="adamw",
                                                    adamw_lr=0.003, schedule="cosine", batch_size=64)), epochs=7)
    assert (cfg.optimizer, cfg.lr, cfg.schedule, cfg.batch_size, cfg.epochs) == ("adamw", 0.003, "cosine", 64, 7)


def test_layouts_that_shrink_below_1x1_raise_spec_error():
    deep = params(n_blocks=3, b1_convs=3, b1_c1=4, b1_c2=4, b1_c3=4, b2_convs=3, b2_c1=4, b2_c2=4, b2_c3=4,
                  t2=False, b3_convs=3, b3_padding=0, b3_c1=4, b3_c2=4, b3_c3=4, b3_pool=True)
    with pytest.raises(SpecError, match="must stay at least 1x1"):
        suggest(optuna.trial.FixedTrial(deep))

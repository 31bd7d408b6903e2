"""The training engine on small real data: it learns, it is deterministic, it survives a blow-up."""


import copy

import pytest
import torch
from torch import nn

from models.budget import analyze
from models.build import build
from models.presets import PRESETS
from models.spec import Conv, ConvBlock, Head, NetSpec, Transition
from models.rules import RULES
from search.engine import TrainConfig, augment_batch, fit, to_device
from search.engine.runtime import cpu_has_native_bf16, use_bf16
from search.engine.whole_step import WholeStep, cpu_shards


def metrics(history):
    return [(e.epoch, e.train_loss, e.train_acc, e.val_loss, e.val_acc, e.lr) for e in history.epochs]


def test_short_real_run_passes_90_percent(mnist):
    torch.set_num_threads(2)
    history = fit(build(PRESETS["small"]), mnist.train.head(5_000), mnist.val.head(2_000),
                  TrainConfig(epochs=2, batch_size=64, seed=0), device="cpu", progress=False)
    assert history.status == "completed" and len(history.epochs) == 2
    assert history.final_val_acc > 0.90, metrics(history)
    assert history.epochs[-1].images_per_s > 0 and history.n_params == 7_860


def test_same_seed_same_history(mnist):
    runs = [fit(build(PRESETS["tiny"]), mnist.train.head(1_000), mnist.val.head(500),
                TrainConfig(epochs=2, seed=7), device="cpu", progress=False) for _ in range(2)]
    assert metrics(runs[0]) == metrics(runs[1])
    other = fit(build(PRESETS["tiny"]), mnist.train.head(1_000), mnist.val.head(500),
                TrainConfig(epochs=2, seed=8), device="cpu", progress=False)
    assert metrics(other) != metrics(runs[0])


def test_huge_learning_rate_ends_with_nan_status(mnist):
    history = fit(build(PRESETS["tiny"]), mnist.train.head(1_000), mnist.val.head(200),
                  TrainConfig(epochs=3, lr=1e6, augment=0.0, label_smoothing=0.0), device="cpu", progress=False)
    assert history.status == "nan"
    assert len(history.epochs) < 3


def test_on_epoch_can_stop_training(mnist):
    seen = []
    history = fit(build(PRESETS["tiny"]), mnist.train.head(500), mnist.val.head(200), TrainConfig(epochs=5),
                  device="cpu", progress=False, on_epoch=lambda r: seen.append(r.epoch) or r.epoch == 2)
    assert history.status == "stopped" and seen == [1, 2] and len(history.epochs) == 2


@pytest.mark.parametrize("field, value, message", [
    ("epochs", 21, f"epochs=21: must be from 1 to {RULES.max_epochs} (the exercise allows at most 20 epochs)"),
    ("epochs", 0, "epochs=0"),
    ("batch_size", 1, "batch_size=1"),
    ("optimizer", "lbfgs", "optimizer='lbfgs'"),
    ("schedule", "linear", "schedule='linear'"),
    ("lr", 0.0, "lr=0.0: must be positive"),
])
def test_bad_config_is_refused_naming_the_limit(field, value, message):
    with pytest.raises(ValueError) as info:
        TrainConfig(**{field: value})
    assert message in str(info.value)


def test_augmentation_moves_pixels_but_keeps_shape_and_background():
    x = torch.full((8, 1, 28, 28), -0.1307 / 0.3081)
    x[:, :, 10:18, 10:18] = 2.0
    out = augment_batch(x, 1.0, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert not torch.allclose(out, x)
    assert torch.allclose(out[:, :, 0, 0], x[:, :, 0, 0], atol=1e-5)  # corners stay background
    assert torch.equal(augment_batch(x, 0.0, torch.Generator().manual_seed(0)).round(decimals=4), x.round(decimals=4))
    # Another set's normalised black (Fashion-MNIST's is -0.81): the border stays that set's background too.
    other = torch.where(x == x[0, 0, 0, 0], torch.tensor(-0.2860 / 0.3530), x)
    out = augment_batch(other, 1.0, torch.Generator().manual_seed(0))
    assert torch.allclose(out[:, :, 0, 0], other[:, :, 0, 0], atol=1e-5)
    assert out.min() >= other.min() - 1e-5  # nothing darker than black comes in from outside


def test_config_round_trips():
    cfg = TrainConfig(epochs=3, optimizer="adamw", lr=1e-3)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown field"):
        TrainConfig.from_dict({**cfg.to_dict(), "momentum": 0.9})


def test_whole_step_trains_like_the_ordinary_loop(mnist):
    """The step that CUDA captures as one graph, run eagerly: same weights as torch's SGD + OneCycle loop."""
    cfg = TrainConfig(epochs=2, batch_size=64, seed=3)  # 4 steps per epoch, augmentation and dropout on
    models, histories = [], []
    for whole_step in (False, True):
        model = build(PRESETS["tiny"])
        histories.append(fit(model, mnist.train.head(256), mnist.val.head(200), cfg, device="cpu", progress=False,
                             precision="fp32", whole_step=whole_step, shards=1))
        models.append(model)
    ordinary, whole = (m.state_dict() for m in models)
    for name, value in ordinary.items():
        assert torch.allclose(value.float(), whole[name].float(), atol=1e-4), name
    assert [e.lr for e in histories[0].epochs] == pytest.approx([e.lr for e in histories[1].epochs])
    assert [e.train_loss for e in histories[0].epochs] == pytest.approx([e.train_loss for e in histories[1].epochs],
                                                                        rel=1e-4)


def _plain_spec(batchnorm: bool) -> NetSpec:
    """Two small conv blocks without dropout: nothing random inside the step but the augmentation."""
    return NetSpec((ConvBlock((Conv(8), Conv(8)), batchnorm=batchnorm), Transition(4, batchnorm=batchnorm),
                    ConvBlock((Conv(8), Conv(8)), batchnorm=batchnorm)), Head("conv_gap"))


def test_sharded_step_is_the_whole_batch_step_without_batchnorm(mnist):
    """Shards' gradients, weighted by their share of the batch and summed, are the whole batch's gradient."""
    cfg = TrainConfig(epochs=2, batch_size=64, seed=5)
    models = [build(_plain_spec(batchnorm=False)) for _ in range(2)]
    histories = [fit(m, mnist.train.head(256), mnist.val.head(200), cfg, device="cpu", progress=False,
                     precision="fp32", shards=shards) for m, shards in zip(models, (1, 2))]
    whole, sharded = (m.state_dict() for m in models)
    for name, value in whole.items():
        assert torch.allclose(value, sharded[name], atol=1e-5), name
    flat = [[v for record in metrics(h) for v in record] for h in histories]
    assert flat[0] == pytest.approx(flat[1], rel=1e-4)


def test_sharded_batchnorm_normalises_per_shard_and_averages_running_statistics(mnist):
    torch.manual_seed(0)
    model = build(_plain_spec(batchnorm=True))
    start = copy.deepcopy(model.state_dict())
    x, y = to_device(mnist.train.head(64), torch.device("cpu"))
    cfg = TrainConfig(epochs=1, batch_size=64, augment=0.0, lr=1e-3)
    step = WholeStep(model, x, y, cfg, nn.CrossEntropyLoss(), False, 1, capture=False, bf16=False, shards=2)
    try:
        step.start_epoch(torch.arange(64), None)
        step.step()
        step.sync()
        halves = []
        for part in (x[:32], x[32:]):  # what each shard's BatchNorm saw: its own 32 images
            replica = build(_plain_spec(batchnorm=True))
            replica.load_state_dict(start)
            replica.train()(part)
            halves.append(replica.state_dict())
        for name, value in model.state_dict().items():
            if name.endswith(("running_mean", "running_var")):
                assert torch.allclose(value, (halves[0][name] + halves[1][name]) / 2, atol=1e-6), name
                assert torch.equal(value, step.replicas[1].state_dict()[name])  # the replica goes on from the same
                assert not torch.allclose(halves[0][name], halves[1][name])
        assert step.replicas[1][0][0].weight is model[0][0].weight  # parameters shared, not copied
    finally:
        step.close()


def test_sharding_leaves_threads_and_dropout_as_they_were(mnist):
    threads = torch.get_num_threads()
    model = build(PRESETS["tiny"])
    fit(model, mnist.train.head(256), mnist.val.head(64), TrainConfig(epochs=1), device="cpu", progress=False,
        shards=2)
    assert torch.get_num_threads() == threads
    assert all(getattr(m, "generator", None) is None for m in model.modules())
    for shards in (0, 33):
        with pytest.raises(ValueError, match=f"shards={shards}: must be between 1 and batch_size / 2 = 32"):
            fit(build(PRESETS["tiny"]), mnist.train.head(256), mnist.val.head(64), TrainConfig(epochs=1),
                device="cpu", progress=False, shards=shards)
    with pytest.raises(ValueError, match="shards=2: batches are sharded by the whole SGD step only"):
        fit(build(PRESETS["tiny"]), mnist.train.head(256), mnist.val.head(64),
            TrainConfig(epochs=1, optimizer="adamw"), device="cpu", progress=False, shards=2)


def test_sharded_runs_with_one_seed_give_one_history(mnist):
    runs = [fit(build(PRESETS["tiny"]), mnist.train.head(1_000), mnist.val.head(500), TrainConfig(epochs=2, seed=7),
                device="cpu", progress=False, shards=2) for _ in range(2)]
    assert metrics(runs[0]) == metrics(runs[1])


def test_whole_step_refuses_adamw(mnist):
    with pytest.raises(ValueError, match="optimizer='adamw': the whole-step path does SGD only"):
        fit(build(PRESETS["tiny"]), mnist.train.head(128), mnist.val.head(64), TrainConfig(epochs=1, optimizer="adamw"),
            device="cpu", progress=False, whole_step=True)


def test_precision_is_checked_and_fp32_is_float32(mnist):
    with pytest.raises(ValueError, match=r"precision='fp16': must be one of \('auto', 'bf16', 'fp32'\)"):
        fit(build(PRESETS["tiny"]), mnist.train.head(128), mnist.val.head(64), TrainConfig(epochs=1),
            device="cpu", progress=False, precision="fp16")
    assert not use_bf16(torch.device("cpu"), "fp32") and use_bf16(torch.device("cpu"), "bf16")
    assert use_bf16(torch.device("cpu")) == cpu_has_native_bf16()
    for precision in ("fp32", "bf16"):
        history = fit(build(PRESETS["tiny"]), mnist.train.head(128), mnist.val.head(64), TrainConfig(epochs=1),
                      device="cpu", progress=False, precision=precision)
        assert history.precision == precision and history.to_dict()["precision"] == precision


def test_small_nets_shard_on_a_cpu_and_the_history_says_so(mnist):
    assert cpu_shards(64, analyze(PRESETS["baseline"]).macs) == 1  # big enough for torch's intra-op threads
    assert cpu_shards(64, analyze(PRESETS["small"]).macs) == min(2, torch.get_num_threads())
    assert cpu_shards(48, analyze(PRESETS["small"]).macs) == 1  # two shards would hold fewer than 32 images
    history = fit(build(PRESETS["tiny"]), mnist.train.head(256), mnist.val.head(64), TrainConfig(epochs=1),
                  device="cpu", progress=False)
    assert history.shards == cpu_shards(64, analyze(PRESETS["tiny"]).macs)
    assert fit(build(PRESETS["tiny"]), mnist.train.head(256), mnist.val.head(64), TrainConfig(epochs=1),
               device="cpu", progress=False, shards=1).shards == 1

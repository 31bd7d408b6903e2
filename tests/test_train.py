"""The training engine on small real data: it learns, it is deterministic, it survives a blow-up, and it says
which step path it took."""


import copy
import json

import pytest
import torch
from torch import nn

from models.budget import analyze
from models.build import build
from models.presets import PRESETS
from models.spec import Conv, ConvBlock, Head, NetSpec, Transition
from models.rules import RULES
from search.engine import TrainConfig, augment_batch, fit, to_device
from search.engine.whole_step import WholeStep, cpu_shards


def metrics(history):
    return [(e.epoch, e.train_loss, e.train_acc, e.val_loss, e.val_acc, e.lr) for e in history.epochs]


def test_short_real_run_passes_90_percent(mnist):
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
    cfg = TrainConfig(epochs=3, optimizer="adamw", lr=1e-3, step_milestones=(0.6, 0.9))
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # milestones a list in JSON
    assert cfg.to_dict() == json.loads(json.dumps(cfg.to_dict()))  # as stored: a certificate compares the two
    with pytest.raises(ValueError, match="unknown field"):
        TrainConfig.from_dict({**cfg.to_dict(), "nesterov": True})


def test_a_config_stored_before_the_recipe_constants_takes_their_defaults():
    stored = {"epochs": 15, "batch_size": 128, "optimizer": "sgd", "lr": 0.05, "weight_decay": 5e-4,
              "schedule": "step", "label_smoothing": 0.1, "augment": 1.0, "seed": 2}  # a trial's config before #28
    cfg = TrainConfig.from_dict(stored)
    assert cfg == TrainConfig(**stored) and cfg.momentum == 0.9 and cfg.step_milestones == (0.5, 0.75)
    del stored["epochs"]  # a field it always had, whose default has changed since: refused, not guessed
    with pytest.raises(ValueError, match=r"missing field\(s\) \['epochs'\]"):
        TrainConfig.from_dict(stored)


def test_the_default_recipe_is_torchs_onecycle_and_says_what_it_does_to_momentum():
    """The recipe's constants reproduce what training did before they were named (torch's OneCycleLR defaults,
    milestones at 1/2 and 3/4): the whole step's per-step schedule against torch's own schedulers."""
    from search.engine.whole_step import schedule

    steps_per_epoch, cfg = 10, TrainConfig(epochs=4)
    total = cfg.epochs * steps_per_epoch
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=total, pct_start=0.3)
    lrs, moms = [], []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        moms.append(opt.param_groups[0]["momentum"])
        opt.step()
        sched.step()
    assert schedule(cfg, steps_per_epoch)[0][:-1] == lrs and schedule(cfg, steps_per_epoch)[1] == moms
    # Momentum: 0.95 at the start, 0.85 at the end of the 30% warm-up (the learning rate's peak), 0.95 at the end.
    warm = int(cfg.onecycle_warmup * total) - 1
    assert moms[0] == cfg.onecycle_max_momentum == 0.95 and moms[warm] == pytest.approx(0.85)
    assert min(moms) == pytest.approx(cfg.onecycle_base_momentum) and moms[-1] == pytest.approx(0.95, abs=1e-3)
    assert lrs[0] == pytest.approx(cfg.lr / 25) and max(lrs) == pytest.approx(cfg.lr)
    step_lrs, step_moms = schedule(TrainConfig(epochs=4, schedule="step"), steps_per_epoch)
    assert step_lrs[total // 2 - 1] == 0.1 and step_lrs[total // 2] == pytest.approx(0.01)
    assert step_lrs[total * 3 // 4] == pytest.approx(0.001) and set(step_moms) == {0.9}  # `momentum`, constant


def _double(mnist, n_train: int, n_val: int) -> tuple:
    """(x_train, y_train, x_val, y_val) as fit's data_on_device, the images in float64."""
    x, y = to_device(mnist.train.head(n_train), torch.device("cpu"))
    xv, yv = to_device(mnist.val.head(n_val), torch.device("cpu"))
    return x.double(), y, xv.double(), yv


def _max_difference(a: dict, b: dict) -> tuple[float, str]:
    return max(((a[k].double() - b[k].double()).abs().max().item(), k) for k in a)


def test_whole_step_trains_like_the_ordinary_loop(mnist, float64):
    """The step that CUDA captures as one graph, run eagerly: torch's SGD + OneCycle loop's weights, in float64.

    Both paths run the same ops in another order, so in float64 they agree to about 1e-15; a real difference in the
    update rule (Nesterov, weight decay groups, the schedule, the augmentation or dropout draws) shows far above
    1e-9."""
    cfg = TrainConfig(epochs=2, batch_size=64, seed=3)  # 4 steps per epoch, augmentation and dropout on
    data = _double(mnist, 256, 200)
    models, histories = [], []
    for whole_step in (False, True):
        model = build(PRESETS["tiny"])
        histories.append(fit(model, None, None, cfg, device="cpu", progress=False, precision="fp32",
                             whole_step=whole_step, shards=1, data_on_device=data))
        models.append(model)
    assert next(models[1].parameters()).dtype == torch.float64
    ordinary, whole = (m.state_dict() for m in models)
    difference, name = _max_difference(ordinary, whole)
    assert difference < 1e-9, name
    assert [e.lr for e in histories[0].epochs] == pytest.approx([e.lr for e in histories[1].epochs], rel=1e-12)
    assert [e.train_loss for e in histories[0].epochs] == pytest.approx([e.train_loss for e in histories[1].epochs],
                                                                        rel=1e-9)


def test_one_float32_whole_step_is_as_close_to_float64_as_torchs_own_step(mnist):
    """In float32, one step of each path against the same step in float64 from the same weights: the whole step's
    rounding error stays within a few times that of torch's own float32 loop, whatever the CPU's summation order.
    No augmentation: its matrices are drawn in the default dtype, so float32 and float64 would warp differently."""
    cfg = TrainConfig(epochs=1, batch_size=64, seed=3, augment=0.0)
    torch.manual_seed(11)
    start = build(PRESETS["tiny"]).state_dict()
    x, y = to_device(mnist.train.head(64), torch.device("cpu"))  # 64 images: one step
    xv, yv = to_device(mnist.val.head(64), torch.device("cpu"))
    results = {}
    for dtype in (torch.float32, torch.float64):
        for whole_step in (False, True):
            model = build(PRESETS["tiny"]).to(dtype)
            model.load_state_dict(start)
            fit(model, None, None, cfg, device="cpu", progress=False, precision="fp32", whole_step=whole_step,
                shards=1, data_on_device=(x.to(dtype), y, xv.to(dtype), yv), reset_weights=False)
            results[dtype, whole_step] = model.state_dict()
    reference = results[torch.float64, False]
    torch_error, _ = _max_difference(results[torch.float32, False], reference)
    whole_error, name = _max_difference(results[torch.float32, True], reference)
    assert _max_difference(results[torch.float64, True], reference)[0] < 1e-12
    assert 0 < torch_error < 1e-4  # float32 rounding, not another computation
    assert whole_error <= 4 * torch_error + 1e-6, (name, whole_error, torch_error)


def _plain_spec(batchnorm: bool) -> NetSpec:
    """Two small conv blocks without dropout: nothing random inside the step but the augmentation."""
    return NetSpec((ConvBlock((Conv(8), Conv(8)), batchnorm=batchnorm), Transition(4, batchnorm=batchnorm),
                    ConvBlock((Conv(8), Conv(8)), batchnorm=batchnorm)), Head("conv_gap"))


def test_sharded_step_is_the_whole_batch_step_without_batchnorm(mnist, float64):
    """Shards' gradients, weighted by their share of the batch and summed, are the whole batch's gradient (float64:
    the sum in another order agrees to about 1e-15)."""
    cfg = TrainConfig(epochs=2, batch_size=64, seed=5)
    data = _double(mnist, 256, 200)
    models = [build(_plain_spec(batchnorm=False)) for _ in range(2)]
    histories = [fit(m, None, None, cfg, device="cpu", progress=False, precision="fp32", shards=shards,
                     data_on_device=data) for m, shards in zip(models, (1, 2))]
    assert [h.shards for h in histories] == [1, 2]
    difference, name = _max_difference(*(m.state_dict() for m in models))
    assert difference < 1e-9, name
    flat = [[v for record in metrics(h) for v in record[:-1]] for h in histories]  # all but the learning rate
    assert flat[0] == pytest.approx(flat[1], rel=1e-9)


def test_sharded_batchnorm_normalises_per_shard_and_averages_running_statistics(mnist, float64):
    torch.manual_seed(0)
    model = build(_plain_spec(batchnorm=True))
    start = copy.deepcopy(model.state_dict())
    x, y = to_device(mnist.train.head(64), torch.device("cpu"))
    x = x.double()
    cfg = TrainConfig(epochs=1, batch_size=64, augment=0.0, lr=1e-3)
    step = WholeStep(model, x, y, cfg, nn.CrossEntropyLoss(), 1, capture=False, bf16=False, shards=2)
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
                assert torch.allclose(value, (halves[0][name] + halves[1][name]) / 2, rtol=0, atol=1e-12), name
                assert torch.equal(value, step.replicas[1].state_dict()[name])  # the replica goes on from the same
                assert (halves[0][name] - halves[1][name]).abs().max() > 1e-6  # the shards' images differ
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


def _dtypes_inside_the_step(precision: str, mnist) -> tuple[set, set]:
    """(dtypes of the first conv's output while training, those of its weight) in a one-epoch fit."""
    model = build(PRESETS["tiny"])
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    seen: set = set()
    conv.register_forward_hook(lambda module, inputs, output: seen.add(output.dtype) if module.training else None)
    history = fit(model, mnist.train.head(128), mnist.val.head(64), TrainConfig(epochs=1), device="cpu",
                  progress=False, precision=precision)
    return seen, {conv.weight.dtype}, history


def test_precision_is_checked_and_each_trains_in_its_dtype(mnist):
    with pytest.raises(ValueError, match=r"precision='fp16': must be one of \('auto', 'bf16', 'fp32'\)"):
        fit(build(PRESETS["tiny"]), mnist.train.head(128), mnist.val.head(64), TrainConfig(epochs=1),
            device="cpu", progress=False, precision="fp16")
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        seen, weights, history = _dtypes_inside_the_step(precision, mnist)
        assert seen == {dtype} and weights == {torch.float32}  # autocast: bf16 arithmetic, float32 master weights
        assert history.precision == precision and history.to_dict()["precision"] == precision


@pytest.mark.parametrize("native, dtype", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_precision_is_bf16_only_on_a_cpu_that_computes_it(mnist, monkeypatch, native, dtype):
    from search.engine import runtime

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    seen, _, history = _dtypes_inside_the_step("auto", mnist)
    assert seen == {dtype} and history.precision == ("bf16" if native else "fp32")


def test_native_bfloat16_is_read_from_the_cpu_flags():
    from search.engine.runtime import flags_have_native_bf16

    epyc = "flags\t\t: fpu sse sse2 avx2 avx512f avx512_bf16 avx512_vnni"
    sapphire_rapids = "flags\t\t: fpu avx2 avx512f amx_bf16 amx_tile"
    older = "flags\t\t: fpu sse sse2 avx2 avx512f avx512_vnni"
    assert flags_have_native_bf16(epyc) and flags_have_native_bf16(sapphire_rapids)
    assert not flags_have_native_bf16(older) and not flags_have_native_bf16("")
    assert not flags_have_native_bf16("flags\t\t: avx512_bf16x")  # a whole flag, not a prefix


def test_small_nets_shard_on_a_cpu_and_the_history_says_so(mnist):
    small, baseline = analyze(PRESETS["small"]).macs, analyze(PRESETS["baseline"]).macs
    assert small < 2_000_000 < 3_000_000 < baseline  # either side of the 2.5 M MACs at which sharding stops
    torch.set_num_threads(2)
    assert cpu_shards(64, small) == 2 and cpu_shards(128, small) == 2  # one shard per thread
    assert cpu_shards(64, baseline) == 1  # big enough for torch's intra-op threads
    assert cpu_shards(48, small) == 1  # two shards would hold fewer than 32 images
    torch.set_num_threads(1)
    assert cpu_shards(64, small) == 1
    torch.set_num_threads(2)
    history = fit(build(PRESETS["tiny"]), mnist.train.head(256), mnist.val.head(64), TrainConfig(epochs=1),
                  device="cpu", progress=False)
    assert history.shards == 2
    assert fit(build(PRESETS["tiny"]), mnist.train.head(256), mnist.val.head(64), TrainConfig(epochs=1),
               device="cpu", progress=False, shards=1).shards == 1


def test_the_history_records_the_step_path_the_planned_engine_names(mnist):
    from search.engine import planned_engine

    torch.set_num_threads(2)
    data = (*to_device(mnist.train.head(256), torch.device("cpu")), *to_device(mnist.val.head(64), torch.device("cpu")))
    macs = analyze(PRESETS["tiny"]).macs
    for cfg, options, path in ((TrainConfig(epochs=1), {}, "whole_step_sharded"),
                               (TrainConfig(epochs=1), {"shards": 1}, "whole_step"),
                               (TrainConfig(epochs=1), {"whole_step": False}, "eager"),
                               (TrainConfig(epochs=1, optimizer="adamw"), {}, "eager")):
        history = fit(build(PRESETS["tiny"]), None, None, cfg, device="cpu", progress=False, data_on_device=data,
                      **options)
        assert history.step_path == path and history.fallback is None
        assert history.to_dict()["step_path"] == path
        if not options:  # what the search plans before training, and the key's engine part after
            assert planned_engine(cfg, torch.device("cpu"), macs, 256) == history.engine()


def test_a_refused_capture_is_recorded_and_other_errors_are_raised(mnist, monkeypatch):
    """The fallback logic without a GPU: the trainer told to capture, with the capture made to fail as torch's does."""
    from search.engine import loop, runtime

    x, y = to_device(mnist.train.head(128), torch.device("cpu"))

    def trainer(cfg):
        return loop._Trainer(build(PRESETS["tiny"]), x, y, cfg, torch.device("cpu"), False, 2, graphs=True,
                             whole_step=cfg.optimizer == "sgd", shards=1, compile_model=False)

    def refused(*args, **kwargs):
        with runtime.capturing():
            raise RuntimeError("operation not permitted when stream is capturing\nmore text")

    monkeypatch.setattr(WholeStep, "_capture", refused)
    with pytest.warns(UserWarning, match="CUDA graph capture failed, training uncaptured"):
        sgd = trainer(TrainConfig(epochs=1))
    assert sgd.step_path == "whole_step" and sgd.stepper.graph is None
    assert sgd.fallback == "RuntimeError: operation not permitted when stream is capturing"
    monkeypatch.setattr(loop, "graph_model", refused)
    with pytest.warns(UserWarning):
        adamw = trainer(TrainConfig(epochs=1, optimizer="adamw"))
    assert adamw.step_path == "eager" and adamw.fallback.startswith("RuntimeError")

    def broken(*args, **kwargs):
        raise ValueError("a bug, not a capture")

    monkeypatch.setattr(WholeStep, "_capture", broken)
    with pytest.raises(ValueError, match="a bug, not a capture"):
        trainer(TrainConfig(epochs=1))
    for error in (torch.OutOfMemoryError("CUDA out of memory"), ValueError("not torch's refusal")):
        with pytest.raises(type(error)):
            with runtime.capturing():
                raise error


def test_cudnn_benchmark_is_set_once_per_process(monkeypatch):
    from search.engine import runtime

    before = torch.backends.cudnn.benchmark
    monkeypatch.setattr(runtime, "_cudnn_benchmark_set", False)
    try:
        runtime.configure(torch.device("cuda"), graphs=True)
        assert torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = False  # the caller's choice after the first fit stands
        runtime.configure(torch.device("cuda"), graphs=True)
        assert not torch.backends.cudnn.benchmark
    finally:
        torch.backends.cudnn.benchmark = before


def test_the_recipe_by_size_drops_label_smoothing_for_small_nets_only():
    from search.engine import recipe_for
    from search.engine.config import SMALL_NET_PARAMS

    assert SMALL_NET_PARAMS == 5_000
    assert recipe_for(4_582).label_smoothing == 0.0 and recipe_for(5_000).label_smoothing == 0.0
    assert recipe_for(5_001) == TrainConfig() and recipe_for(19_674).label_smoothing == 0.05
    assert recipe_for(4_582, label_smoothing=0.1, epochs=3) == TrainConfig(label_smoothing=0.1, epochs=3)


def test_the_search_queues_each_preset_with_the_recipe_for_its_size(tmp_path, data_root):
    from models.budget import count_params
    from models.presets import PRESETS
    from search.options import SearchOptions
    from search.study import open_study

    opts = SearchOptions(study="warm", storage=f"sqlite:///{tmp_path / 'warm.db'}", data_dir=str(data_root),
                         device="cpu", epochs=1)
    queued = {t.user_attrs["preset"]: t.params.get("label_smoothing", t.system_attrs["fixed_params"]
                                                   ["label_smoothing"]) for t in open_study(opts).trials}
    assert queued and queued == {name: 0.0 if count_params(spec) <= 5_000 else 0.05 for name, spec in PRESETS.items()}
    assert queued["micro"] == 0.0 and queued["baseline"] == 0.05

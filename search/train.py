"""The training engine: the whole dataset as tensors on the device, batches by index, augmentation on whole batches.

`fit(model, data, cfg, on_epoch)` trains and returns a `History`; it knows nothing of Optuna. `on_epoch` is called
once per epoch with that epoch's record and stops training by returning True (this is how pruning plugs in).
A NaN or infinite loss ends training with status "nan" rather than an exception.
"""

from __future__ import annotations

import ctypes
import functools
import inspect
import math
import os
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from search.data import MEAN, STD, Split

MAX_EPOCHS = 20  # the exercise's rule
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("onecycle", "step", "cosine")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class TrainConfig:
    """Every training hyperparameter, with its default, in one place."""

    epochs: int = 15  # passes over the training split; the rules allow at most 20
    batch_size: int = 64  # images per step: baseline reached 99.51% validation at 64, 99.37% at 128 (15 epochs)
    optimizer: str = "sgd"  # "sgd" (Nesterov, momentum 0.9) or "adamw"
    lr: float = 0.1  # peak learning rate: OneCycle's maximum, the start of step and cosine schedules
    weight_decay: float = 5e-4  # L2 on conv weights, scaled by the learning rate as usual for SGD
    schedule: str = "onecycle"  # "onecycle" (30% warm-up, cosine down), "step" (x0.1 at 50% and 75%), "cosine"
    label_smoothing: float = 0.05  # probability mass spread over the other classes
    # Strength of the random affine: 1.0 = +-8 deg, +-8% scale, +-2 px shift; 0 = off. 0.5 because small nets
    # underfit under more: the 7,442-parameter compact preset reached 99.42% validation at 0.5, 99.34% at 1.0.
    augment: float = 0.5
    seed: int = 0  # weights, batch order and augmentation

    def __post_init__(self) -> None:
        def bad(name, value, limit):
            raise ValueError(f"{name}={value!r}: {limit}")

        if not isinstance(self.epochs, int) or not 1 <= self.epochs <= MAX_EPOCHS:
            bad("epochs", self.epochs, f"must be from 1 to {MAX_EPOCHS} (the exercise allows at most {MAX_EPOCHS} epochs)")
        if not isinstance(self.batch_size, int) or self.batch_size < 2:
            bad("batch_size", self.batch_size, "must be an integer of at least 2 (BatchNorm needs two images)")
        if self.optimizer not in OPTIMIZERS:
            bad("optimizer", self.optimizer, f"must be one of {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            bad("schedule", self.schedule, f"must be one of {SCHEDULES}")
        if not self.lr > 0:
            bad("lr", self.lr, "must be positive")
        if not self.weight_decay >= 0:
            bad("weight_decay", self.weight_decay, "must be zero or positive")
        if not 0 <= self.label_smoothing < 1:
            bad("label_smoothing", self.label_smoothing, "must be in [0, 1)")
        if not 0 <= self.augment <= 3:
            bad("augment", self.augment, "must be from 0 (off) to 3")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"training config: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)


@dataclass
class EpochRecord:
    epoch: int  # 1-based
    train_loss: float
    train_acc: float  # fraction, on the augmented batches as trained
    val_loss: float
    val_acc: float  # fraction
    lr: float  # at the end of the epoch
    seconds: float  # training and evaluation
    images_per_s: float  # training images per second, evaluation excluded


@dataclass
class History:
    epochs: list[EpochRecord] = field(default_factory=list)
    status: str = "running"  # "completed", "stopped" (by on_epoch), "nan"
    device: str = "cpu"
    n_params: int = 0
    precision: str = "fp32"  # "bf16" (autocast) or "fp32"
    shards: int = 1  # threads each CPU batch was split across; BatchNorm normalised each shard on its own

    @property
    def final_val_acc(self) -> float:
        return self.epochs[-1].val_acc if self.epochs else float("nan")

    @property
    def best_val_acc(self) -> float:
        return max((e.val_acc for e in self.epochs), default=float("nan"))

    def to_dict(self) -> dict:
        return {"status": self.status, "device": self.device, "n_params": self.n_params, "precision": self.precision,
                "epochs": [asdict(e) for e in self.epochs]}

    @classmethod
    def from_dict(cls, data: dict) -> "History":
        return cls([EpochRecord(**e) for e in data["epochs"]], data["status"], data["device"], data["n_params"],
                   data.get("precision", "unrecorded"))


def resolve_device(device: str = "auto") -> torch.device:
    if device not in DEVICES:
        raise ValueError(f"device={device!r}: must be one of {DEVICES}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda': no CUDA GPU is available here; use --device cpu or auto")
    return torch.device(device)


def to_device(split: Split, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images -> normalised float32 (N, 1, 28, 28) on the device, once."""
    x = split.images.to(device).float().div_(255).sub_(MEAN).div_(STD).unsqueeze(1)
    return x, split.labels.to(device)


def random_affine(n: int, strength: float, generator: torch.Generator) -> torch.Tensor:
    """n random affine matrices (n, 2, 3) for `affine_grid`: rotation, scale and translation, uniform in their ranges.

    A whole epoch's matrices are drawn at once, so that a step launches only affine_grid and grid_sample for its
    augmentation instead of some twenty small kernels. On H200s the baseline's epoch took 1.91 s before this and
    1.53 s after, measured on two different machines (the eager loop varied 3.2 to 3.7 s between them).
    """
    r = torch.rand(n, 4, generator=generator, device=generator.device) * 2 - 1  # uniform in [-1, 1]
    angle = r[:, 0] * math.radians(8.0 * strength)
    scale = 1 + r[:, 1] * 0.08 * strength
    shift = r[:, 2:] * (2.0 * strength / (28 / 2))  # +-2 px in grid units ([-1, 1] spans the 28-px image)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    return torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)


def apply_affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Warp every image of the batch by its matrix with one grid_sample; the border is the digit's background."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    background = -MEAN / STD  # a normalised black pixel
    return F.grid_sample(x - background, grid, align_corners=False, padding_mode="zeros") + background


def augment_batch(x: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Random rotation, scale and translation of every image in the batch."""
    return apply_affine(x, random_affine(x.shape[0], strength, generator).to(x.device))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim > 1]  # conv weights; BatchNorm and biases are not decayed
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=0.3)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[total // 2, total * 3 // 4], gamma=0.1)


@torch.inference_mode()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2000,
             channels_last: bool = False, bf16: bool | None = None) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (fraction) in large batches, with the model in eval mode."""
    if len(y) == 0:
        return float("nan"), float("nan")
    model.eval()
    loss_sum, correct = torch.zeros((), device=x.device), torch.zeros((), device=x.device, dtype=torch.long)
    for i in range(0, len(y), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with autocast(x.device, bf16):
            logits = model(xb)
        loss_sum += F.cross_entropy(logits.float(), yb, reduction="sum")
        correct += (logits.argmax(1) == yb).sum()
    return loss_sum.item() / len(y), correct.item() / len(y)


PRECISIONS = ("auto", "bf16", "fp32")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 dot products in hardware (AVX512-BF16 or AMX), from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line for line in info if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_bf16(device: torch.device, precision: str = "auto") -> bool:
    """bfloat16 autocast: on CUDA always for "auto"; on the CPU where the hardware computes it natively.

    Measured on the 2-core CPU (AVX512-BF16, no AMX), batch 64, medians of 3 interleaved: baseline 3,363 -> 4,133
    img/s, compact 5,082 -> 5,149 (the baseline's convs ran about 1.5x faster in bfloat16, torch.profiler).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: must be one of {PRECISIONS}")
    if precision != "auto":
        return precision == "bf16"
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())


def autocast(device: torch.device, bf16: bool | None = None):
    # bfloat16: tensor-core convs on CUDA and AVX512-BF16 convs on the CPU; no loss scaling needed.
    # cache_enabled=False: CUDA-graphed modules require it (the cast weights must not outlive the capture).
    enabled = use_bf16(device) if bf16 is None else bf16
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled, cache_enabled=False)


def tune_cpu_allocator() -> None:
    """Keep freed activation memory in the process instead of handing it back to the kernel (glibc malloc).

    glibc serves blocks over its mmap threshold with fresh pages and trims freed memory back to the kernel, so the
    engine paid a page fault per 4 KiB it touched again. Measured on the 2-core CPU (resource.getrusage, separate
    processes, baseline, batch 64, bfloat16): in a process's first epoch 4,400-5,900 faults per step and
    3,000-3,400 img/s with glibc's defaults against ~300 and ~4,550 img/s tuned; later epochs train alike (glibc
    raises its own threshold once blocks are freed), but evaluating 10,000 images at batch 500 took 0.73-0.82 s
    against 0.39-0.41 s tuned. Raising the mmap threshold to its 32 MiB maximum and the trim threshold to 1 GiB
    keeps those blocks for reuse.
    Set BUDGETNAS_MALLOC=default to leave malloc as it is. Once per process; a no-op away from glibc.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED or os.environ.get("BUDGETNAS_MALLOC") == "default":
        return
    _ALLOCATOR_TUNED = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    mallopt(m_mmap_threshold, 32 << 20)
    mallopt(m_trim_threshold, 1 << 30)


_ALLOCATOR_TUNED = False
CAPTURE_LOCK = threading.Lock()  # one capture at a time in this process


def quiet_stream_mismatch() -> None:
    """Captures warm up on a side stream, which torch >= 2.11 then warns of at every backward."""
    quiet = getattr(torch.autograd.graph, "set_warn_on_accumulate_grad_stream_mismatch", None)
    if quiet is not None:
        quiet(False)


def _graph_model(model: nn.Module, example: torch.Tensor, bf16: bool) -> nn.Module:
    """Capture the model's training forward and backward as CUDA graphs (torch.cuda.make_graphed_callables).

    A step then costs two graph launches instead of one kernel launch per layer and op, which is what bounds a
    20k-parameter net on a GPU. Evaluation (model.eval()) still runs the ordinary forward. The capture's warm-up
    passes update BatchNorm's running statistics and draw dropout masks, so buffers and the RNG are put back.
    """
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.cuda.get_rng_state(example.device)
    extra = {}
    if "capture_error_mode" in inspect.signature(torch.cuda.make_graphed_callables).parameters:
        extra["capture_error_mode"] = "thread_local"  # other trials' threads may use the GPU meanwhile
    quiet_stream_mismatch()
    try:
        with CAPTURE_LOCK, autocast(example.device, bf16):
            return torch.cuda.make_graphed_callables(model, (example,), **extra)
    finally:
        model.load_state_dict(state)
        torch.cuda.set_rng_state(rng, example.device)


def _use_channels_last(device: torch.device) -> bool:
    # Measured on the 2-core CPU (batch 64, augmentation on, 2nd epoch, contiguous -> channels_last):
    # baseline 2,017 -> 2,578 img/s (+28%), tiny 3,621 -> 4,075 (+13%), small 2,789 -> 2,440 (-13%). The large
    # nets dominate a search's time, so on everywhere. On CUDA, cuDNN's NHWC kernels are the fast path for
    # bfloat16 convs (not measured: every H200 run used channels_last).
    return True


def fit(model: nn.Module, train: Split | None, val: Split | None, cfg: TrainConfig, *, device: str | torch.device = "auto",
        on_epoch: Callable[[EpochRecord], bool | None] | None = None, progress: bool | None = None,
        data_on_device: tuple | None = None, compile_model: bool = False,
        cuda_graphs: bool = True, precision: str = "auto", whole_step: bool | None = None,
        shards: int | None = None) -> History:
    """Train `model` on `train`, evaluating on `val` after every epoch.

    `data_on_device`: the (x_train, y_train, x_val, y_val) tensors from `to_device`, to share one copy across trials.
    `progress`: a rich progress bar; by default only when stderr is a terminal.
    `compile_model`: run the steps through torch.compile; its compile time lands in the first epoch's seconds
    (benchmarks/train_throughput.py measures whether it pays off).
    `whole_step`: SGD steps through search/whole_step.py (everything a step needs read from device tensors); by
    default with SGD, unless compiling. Its batches are all full: the last partial batch of an epoch is dropped.
    `shards`: on the CPU, the whole step splits each batch across this many single-threaded workers (BatchNorm
    statistics per shard); by default, for nets under 2.5 M multiply-accumulates per image, one per torch thread with
    at least 32 images each (search/whole_step.py, cpu_shards); 1 trains the whole batch on torch's intra-op threads.
    `cuda_graphs`: on CUDA, replay training as CUDA graphs: the whole step as one graph, or with AdamW the forward
    and backward (the last partial batch dropped too).
    `precision`: "auto" (bfloat16 autocast on CUDA and on CPUs with native bfloat16, else float32), "bf16", "fp32".
    """
    device = device if isinstance(device, torch.device) else resolve_device(device)
    bf16 = use_bf16(device, precision)
    if device.type == "cpu":
        tune_cpu_allocator()
    torch.manual_seed(cfg.seed)
    for module in model.modules():  # initial weights from the seed, however the model was built
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    if data_on_device is None:
        x_train, y_train = to_device(train, device)
        x_val, y_val = to_device(val, device)
    else:
        x_train, y_train, x_val, y_val = data_on_device
    channels_last = _use_channels_last(device)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    n = len(y_train)
    graphs = cuda_graphs and device.type == "cuda" and not compile_model and n >= cfg.batch_size
    if whole_step is None:  # measured on the 2-core CPU too: 3,849 -> 3,970 img/s baseline, 5,056 -> 5,203 compact
        whole_step = cfg.optimizer == "sgd" and not compile_model and n >= cfg.batch_size
    if shards not in (None, 1) and not whole_step:
        raise ValueError(f"shards={shards}: batches are sharded by the whole SGD step only (optimizer="
                         f"{cfg.optimizer!r}, whole_step={whole_step})")
    if whole_step and n < cfg.batch_size:
        raise ValueError(f"batch_size={cfg.batch_size}: more than the {n} training images (the whole step takes "
                         "full batches only)")
    full_batches = graphs or whole_step  # fixed shapes: the last partial batch is dropped
    steps_per_epoch = n // cfg.batch_size if full_batches else n // cfg.batch_size + (n % cfg.batch_size > 1)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    step_model, stepper = model, None
    if graphs:
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels once
    try:
        if whole_step:
            from search.whole_step import WholeStep, cpu_shards

            if shards is None and device.type == "cpu":
                from models.budget import module_table

                macs = sum(row.macs for row in module_table(model, (1, *x_train.shape[1:]))[0])
                shards = cpu_shards(cfg.batch_size, macs)
            stepper = WholeStep(model, x_train, y_train, cfg, criterion, channels_last, steps_per_epoch,
                                capture=graphs, bf16=bf16, shards=1 if shards is None else shards)
        elif graphs:
            example = x_train[:cfg.batch_size].contiguous(memory_format=torch.channels_last if channels_last
                                                           else torch.contiguous_format)
            step_model = _graph_model(model, example, bf16)
    except Exception as err:  # a model the capture cannot take still trains, eagerly
        if device.type != "cuda":
            raise
        warnings.warn(f"CUDA graph capture failed, training eagerly: {type(err).__name__}: {err}", stacklevel=2)
        step_model, stepper = model, None
    if stepper is None:
        step_model = torch.compile(model) if compile_model else step_model
        opt = make_optimizer(model, cfg)
        sched = make_scheduler(opt, cfg, steps_per_epoch)
    history = History(device=str(device), n_params=sum(p.numel() for p in model.parameters()),
                      precision="bf16" if bf16 else "fp32",
                      shards=stepper.shards if stepper is not None else 1)
    # Images per evaluation batch. On the CPU 500 keeps a baseline's bfloat16 activations under the allocator's
    # 32 MiB threshold (see tune_cpu_allocator): 10,000 images took 0.39-0.41 s at 500 and 0.78-0.90 s at 2,000.
    eval_batch = 2000 if device.type == "cuda" else 500

    show = sys.stderr.isatty() if progress is None else progress
    bar = _Progress(cfg.epochs * steps_per_epoch) if show else None
    try:
        for epoch in range(1, cfg.epochs + 1):
            start = time.perf_counter()
            model.train()
            order = torch.randperm(n, device=device, generator=gen)
            thetas = random_affine(n, cfg.augment, gen) if cfg.augment > 0 else None
            if stepper is not None:
                stepper.start_epoch(order, thetas)
                for _ in range(steps_per_epoch):
                    stepper.step()
                    if bar:
                        bar.advance(epoch)
                loss_sum, correct = stepper.sums()
                stepper.sync()
                seen = steps_per_epoch * cfg.batch_size
            else:
                loss_sum, correct, seen = _train_epoch(step_model, opt, sched, criterion, x_train, y_train, order,
                                                       thetas, cfg.batch_size, steps_per_epoch, channels_last, bf16,
                                                       (lambda: bar.advance(epoch)) if bar else None)
            if device.type == "cuda":
                torch.cuda.synchronize()
            train_seconds = time.perf_counter() - start
            train_loss = loss_sum.item() / seen
            if not math.isfinite(train_loss):
                history.status = "nan"
                return history
            val_loss, val_acc = evaluate(step_model, x_val, y_val, eval_batch, channels_last=channels_last, bf16=bf16)
            lr = stepper.lr if stepper is not None else opt.param_groups[0]["lr"]
            record = EpochRecord(epoch, train_loss, correct.item() / seen, val_loss, val_acc, lr,
                                 time.perf_counter() - start, seen / train_seconds)
            history.epochs.append(record)
            if bar:
                bar.describe(record)
            if on_epoch is not None and on_epoch(record):
                history.status = "stopped"
                return history
        history.status = "completed"
        return history
    finally:
        if bar:
            bar.close()
        if stepper is not None:
            stepper.close()


def batch_loss(model: nn.Module, criterion: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor,
               idx: torch.Tensor, thetas: torch.Tensor | None, channels_last: bool, bf16: bool):
    """Gather a batch by index, warp it by its affine matrices, run the model: (logits, loss, labels)."""
    xb, yb = x_train[idx], y_train[idx]
    if thetas is not None:
        xb = apply_affine(xb, thetas)
    if channels_last:
        xb = xb.contiguous(memory_format=torch.channels_last)
    with autocast(xb.device, bf16):
        logits = model(xb)
        loss = criterion(logits.float(), yb)
    return logits, loss, yb


def _train_epoch(step_model, opt, sched, criterion, x_train, y_train, order, thetas, batch_size: int,
                 steps: int, channels_last: bool, bf16: bool, advance) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One epoch of ordinary steps; returns the summed loss, the number correct and the number of images seen."""
    loss_sum = torch.zeros((), device=x_train.device)
    correct = torch.zeros((), device=x_train.device, dtype=torch.long)
    seen = 0
    for step in range(steps):
        batch = slice(step * batch_size, (step + 1) * batch_size)
        logits, loss, yb = batch_loss(step_model, criterion, x_train, y_train, order[batch],
                                      None if thetas is None else thetas[batch], channels_last, bf16)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_sum += loss.detach() * len(yb)
        correct += (logits.detach().argmax(1) == yb).sum()
        seen += len(yb)
        if advance:
            advance()
    return loss_sum, correct, seen


class _Progress:
    """A rich progress bar over all steps of a fit, with the latest epoch's figures."""

    def __init__(self, total: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                                  TimeRemainingColumn(), TextColumn("{task.fields[info]}"), transient=True)
        self._task = self._progress.add_task("train", total=total, epoch=1, info="")
        self._progress.start()

    def advance(self, epoch: int) -> None:
        self._progress.update(self._task, advance=1, epoch=epoch)

    def describe(self, r: EpochRecord) -> None:
        self._progress.update(self._task, info=f"val {r.val_acc:.2%}  loss {r.train_loss:.3f}  {r.images_per_s:,.0f} img/s")

    def close(self) -> None:
        self._progress.stop()

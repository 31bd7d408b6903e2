"""`fit`: train a model on tensors already on the device, evaluate after every epoch, call back once per epoch.

It knows nothing of Optuna. `on_epoch` gets each epoch's record and stops training by returning True (this is how
pruning plugs in). A NaN or infinite loss ends training with status "nan" rather than an exception. The History
records the step path the fit took.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from typing import Callable

import torch
from torch import nn

from search.data import Split
from search.engine import runtime
from search.engine.average import WeightAverage
from search.engine.config import EpochRecord, History, TrainConfig, resolve_device
from search.engine.runtime import CaptureFailed
from search.engine.steps import graph_model, make_optimizer, make_scheduler, random_affine, to_device, train_epoch
from search.engine.whole_step import WholeStep, cpu_shards


@torch.inference_mode()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = TrainConfig.eval_batch_cuda,
             channels_last: bool = False, bf16: bool | None = None) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (fraction) in batches of `batch_size` images, with the model in eval mode."""
    if len(y) == 0:
        return float("nan"), float("nan")
    model.eval()
    loss_sum, correct = torch.zeros((), device=x.device), torch.zeros((), device=x.device, dtype=torch.long)
    for i in range(0, len(y), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with runtime.autocast(x.device, bf16):
            logits = model(xb)
        loss_sum += torch.nn.functional.cross_entropy(logits.float(), yb, reduction="sum")
        correct += (logits.argmax(1) == yb).sum()
        runtime.stop_point()  # between batches: evaluating a whole split on a CPU takes long enough to want one
    return loss_sum.item() / len(y), correct.item() / len(y)


def fit(model: nn.Module, train: Split | None, val: Split | None, cfg: TrainConfig, *,
        device: str | torch.device = "auto", on_epoch: Callable[[EpochRecord], bool | None] | None = None,
        progress: bool | None = None, data_on_device: tuple | None = None, reset_weights: bool = True,
        compile_model: bool = False, cuda_graphs: bool = True, precision: str = "auto",
        whole_step: bool | None = None, shards: int | None = None) -> History:
    """Train `model` on `train`, evaluating on `val` after every epoch; returns the History, which says the step
    path the fit took (`step_path`) and, where a CUDA capture was refused and it went on uncaptured, why (`fallback`).

    Outside the model it changes: torch's global seed (cfg.seed), and once per process `runtime.configure` (glibc's
    malloc thresholds on a CPU, cuDNN's benchmark mode with CUDA graphs). Weights and activations are channels_last.
    `reset_weights`: draw the model's initial weights from cfg.seed (every module's reset_parameters), so one seed
    gives one run however the model was built; False trains the weights it has (a module's own initialisation).
    `data_on_device`: the (x_train, y_train, x_val, y_val) tensors from `to_device`, to share one copy across trials.
    With cfg.ema the weight average is what each epoch evaluates and what the model holds when fit returns.
    `progress`: a rich progress bar; by default only when stderr is a terminal.
    `compile_model`: run the steps through torch.compile (its compile time lands in the first epoch's seconds).
    `whole_step`: SGD steps through engine/whole_step.py (everything a step needs read from device tensors); by
    default with SGD, unless compiling. Its batches are all full: the last partial batch of an epoch is dropped.
    `shards`: on the CPU, the whole step splits each batch across this many single-threaded workers (BatchNorm
    statistics per shard); by default `cpu_shards` decides; 1 trains the whole batch on torch's intra-op threads.
    `cuda_graphs`: on CUDA, replay training as CUDA graphs: the whole step as one graph, or with AdamW the forward
    and backward (the last partial batch dropped too).
    `precision`: "auto" (bfloat16 autocast on CUDA and on CPUs with native bfloat16, else float32), "bf16", "fp32".
    """
    device = device if isinstance(device, torch.device) else resolve_device(device)
    bf16 = runtime.use_bf16(device, precision)
    torch.manual_seed(cfg.seed)
    if reset_weights:
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    x_train, y_train, x_val, y_val = data_on_device or (*to_device(train, device), *to_device(val, device))
    model = model.to(device).to(memory_format=torch.channels_last)
    n = len(y_train)
    graphs, whole_step = _step_path(cfg, device, n, cuda_graphs, compile_model, whole_step, shards)
    runtime.configure(device, graphs)
    full_batches = graphs or whole_step  # fixed shapes: the last partial batch is dropped
    steps_per_epoch = n // cfg.batch_size if full_batches else n // cfg.batch_size + (n % cfg.batch_size > 1)
    trainer = _Trainer(model, x_train, y_train, cfg, device, bf16, steps_per_epoch, graphs, whole_step, shards,
                       compile_model)
    history = History(device=str(device), n_params=sum(p.numel() for p in model.parameters()),
                      precision="bf16" if bf16 else "fp32", shards=trainer.shards, step_path=trainer.step_path,
                      fallback=trainer.fallback)
    bar = _Progress(cfg.epochs * steps_per_epoch) if (sys.stderr.isatty() if progress is None else progress) else None
    try:
        history.status = _epochs(trainer, history, gen, (x_val, y_val), on_epoch, bar)
        trainer.keep_average()
        return history
    finally:
        if bar:
            bar.close()
        trainer.close()


def epoch_line(who: str, epoch: int, epochs: int, measured: str, accuracy: float, seconds: float,
               left_s: float = 0.0) -> str:
    """One line after an epoch, the search's trials' and certification's seeds' alike, printed also where no
    progress bar shows (a file, a pipe): "<who>: epoch e/E, <measured> x.xx%, s.s s, about t s left".
    `seconds`: the epoch's wall time, training and evaluation; `left_s`: the seconds still to train, estimated by
    the caller, said when over 0 (and in minutes too from 10 minutes on)."""
    line = f"{who}: epoch {epoch}/{epochs}, {measured} {accuracy:.2%}, {seconds:.1f} s"
    if left_s > 0:
        line += f", about {left_s:.0f} s left" + (f" ({left_s / 60:.0f} min)" if left_s >= 600 else "")
    return line


def _epochs(trainer: "_Trainer", history: History, gen: torch.Generator, val: tuple, on_epoch, bar) -> str:
    """Train and evaluate epoch by epoch, appending to `history`; the status it ended with."""
    cfg, device = trainer.cfg, trainer.x_train.device
    for epoch in range(1, cfg.epochs + 1):
        start = time.perf_counter()
        loss_sum, correct, seen = trainer.epoch(gen, (lambda: bar.advance(epoch)) if bar else None)
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_seconds = time.perf_counter() - start
        train_loss = loss_sum.item() / seen
        if not math.isfinite(train_loss):
            return "nan"
        val_loss, val_acc = trainer.evaluate(*val)
        record = EpochRecord(epoch, train_loss, correct.item() / seen, val_loss, val_acc, trainer.lr,
                             time.perf_counter() - start, seen / train_seconds)
        history.epochs.append(record)
        if bar:
            bar.describe(record)
        if on_epoch is not None and on_epoch(record):
            return "stopped"
    return "completed"


def planned_engine(cfg: TrainConfig, device: torch.device, macs_per_image: int, n_train: int,
                   precision: str = "auto") -> dict:
    """What `fit` (with its defaults) will train with here, known before training: precision, CPU shard count and
    step path. Each changes how a net trains (bf16 rounding; BatchNorm statistics per shard; the update's
    arithmetic), so a stored result is reused only where they match. `History.engine()` says what the fit did."""
    bf16 = runtime.use_bf16(device, precision)
    graphs, whole_step = _step_path(cfg, device, n_train, cuda_graphs=True, compile_model=False, whole_step=None,
                                    shards=None)
    shards = cpu_shards(cfg.batch_size, macs_per_image) if whole_step and device.type == "cpu" else 1
    return {"precision": "bf16" if bf16 else "fp32", "shards": shards,
            "step_path": _path_name(graphs, whole_step, shards, compile_model=False)}


def _step_path(cfg: TrainConfig, device: torch.device, n: int, cuda_graphs: bool, compile_model: bool,
               whole_step: bool | None, shards: int | None) -> tuple[bool, bool]:
    """(CUDA graphs, whole SGD step) for this run; refuses combinations that cannot work."""
    graphs = cuda_graphs and device.type == "cuda" and not compile_model and n >= cfg.batch_size
    if whole_step is None:
        whole_step = cfg.optimizer == "sgd" and not compile_model and n >= cfg.batch_size
    if shards not in (None, 1) and not whole_step:
        raise ValueError(f"shards={shards}: batches are sharded by the whole SGD step only (optimizer="
                         f"{cfg.optimizer!r}, whole_step={whole_step})")
    if whole_step and n < cfg.batch_size:
        raise ValueError(f"batch_size={cfg.batch_size}: more than the {n} training images (the whole step takes "
                         "full batches only)")
    return graphs, whole_step


def _path_name(graphs: bool, whole_step: bool, shards: int, compile_model: bool) -> str:
    """The step path (config.STEP_PATHS) of a run with these settings, when every capture succeeds."""
    if whole_step:
        return "cuda_graph" if graphs else "whole_step_sharded" if shards > 1 else "whole_step"
    if graphs:
        return "graphed_callables"
    return "compiled" if compile_model else "eager"


class _Trainer:
    """One of the step paths fit can take: the whole SGD step (eager, sharded, or one CUDA graph), or torch's
    optimizer with the model as it is, compiled, or captured as forward and backward graphs. Where torch refuses a
    capture, the same steps uncaptured (the whole step eagerly, or torch's optimizer with the model as it is), the
    refusal kept in `fallback`; every other error is raised."""

    def __init__(self, model, x_train, y_train, cfg: TrainConfig, device, bf16: bool, steps_per_epoch: int,
                 graphs: bool, whole_step: bool, shards: int | None, compile_model: bool):
        self.model, self.x_train, self.y_train, self.cfg, self.bf16 = model, x_train, y_train, cfg, bf16
        self.steps_per_epoch = steps_per_epoch
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.step_model, self.stepper, self.fallback = model, None, None
        # cfg.ema: the weight average every path updates after each step (inside the whole step's graph too).
        self.average = WeightAverage(model, cfg.ema) if cfg.ema > 0 else None
        if whole_step:
            if shards is None and device.type == "cpu":
                from models.budget import module_table

                macs = sum(row.macs for row in module_table(model, (1, *x_train.shape[1:]))[0])
                shards = cpu_shards(cfg.batch_size, macs)
            shards = 1 if shards is None else shards
            try:
                self.stepper = WholeStep(model, x_train, y_train, cfg, self.criterion, steps_per_epoch,
                                         capture=graphs, bf16=bf16, shards=shards, average=self.average)
            except CaptureFailed as err:
                self._fell_back(err)
                self.stepper = WholeStep(model, x_train, y_train, cfg, self.criterion, steps_per_epoch,
                                         capture=False, bf16=bf16, shards=shards, average=self.average)
        else:
            if graphs:
                try:
                    example = x_train[:cfg.batch_size].contiguous(memory_format=torch.channels_last)
                    self.step_model = graph_model(model, example, bf16)
                except CaptureFailed as err:
                    self._fell_back(err)
            self.step_model = torch.compile(model) if compile_model else self.step_model
            self.opt = make_optimizer(model, cfg)
            self.sched = make_scheduler(self.opt, cfg, steps_per_epoch)
        self.shards = self.stepper.shards if self.stepper is not None else 1
        self.step_path = _path_name(graphs and self.fallback is None, whole_step, self.shards, compile_model)

    def _fell_back(self, err: CaptureFailed) -> None:
        self.fallback = str(err)
        warnings.warn(f"CUDA graph capture failed, training uncaptured: {err}", stacklevel=4)

    def epoch(self, gen: torch.Generator, advance) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One epoch: its shuffled order and augmentation drawn from `gen`; the summed loss, correct, images seen."""
        self.model.train()
        n, cfg = len(self.y_train), self.cfg
        order = torch.randperm(n, device=self.x_train.device, generator=gen)
        thetas = random_affine(n, cfg.augment, gen) if cfg.augment > 0 else None
        if self.stepper is None:
            return train_epoch(self.step_model, self.opt, self.sched, self.criterion, self.x_train, self.y_train,
                               order, thetas, cfg.batch_size, self.steps_per_epoch, self.bf16, advance,
                               self.average)
        self.stepper.start_epoch(order, thetas)
        for _ in range(self.steps_per_epoch):
            self.stepper.step()
            runtime.stop_point()  # between steps: no shard worker is running
            if advance:
                advance()
        loss_sum, correct = self.stepper.sums()
        self.stepper.sync()
        return loss_sum, correct, self.steps_per_epoch * cfg.batch_size

    def evaluate(self, x_val: torch.Tensor, y_val: torch.Tensor) -> tuple[float, float]:
        """Validation loss and accuracy of the model, or of its weight average when cfg.ema is on."""
        batch = self.cfg.eval_batch(self.x_train.device)
        if self.average is None:
            return evaluate(self.step_model, x_val, y_val, batch, True, self.bf16)
        with self.average.swapped_in():
            return evaluate(self.step_model, x_val, y_val, batch, True, self.bf16)

    def keep_average(self) -> None:
        """At the end of a fit: the averaged weights into the model for good (it is the model trained)."""
        if self.average is not None:
            self.average.swap()
            self.average = None

    @property
    def lr(self) -> float:
        return self.stepper.lr if self.stepper is not None else self.opt.param_groups[0]["lr"]

    def close(self) -> None:
        if self.stepper is not None:
            self.stepper.close()


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
        info = f"val {r.val_acc:.2%}  loss {r.train_loss:.3f}  {r.images_per_s:,.0f} img/s"
        self._progress.update(self._task, info=info)

    def close(self) -> None:
        self._progress.stop()

"""What a training run takes and gives back: `TrainConfig` (every training constant, with its default, unit or
reason), `EpochRecord` and `History` (with the step path the fit took), and the device name."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch

from models.rules import RULES

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("onecycle", "step", "cosine", "piecewise")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "bf16", "fp32")
# The step paths a fit can take (History.step_path): the whole SGD step of engine/whole_step.py eagerly, split
# across CPU threads, or replayed as one CUDA graph; torch's optimizer with the forward and backward as CUDA graphs,
# as it is, or through torch.compile.
STEP_PATHS = ("whole_step", "whole_step_sharded", "cuda_graph", "graphed_callables", "eager", "compiled")
# Weight decay per optimizer, as the search space sets it: L2 added to the gradient for SGD, decoupled for AdamW
# (which is why its value is 20x SGD's; it is multiplied by the learning rate in both).
WEIGHT_DECAY = {"sgd": 5e-4, "adamw": 1e-2}
# What augment=1.0 means: a rotation of up to +-8 degrees, a scale of up to +-8%, a shift of up to +-2 px, each
# uniform in its range and multiplied by `augment`.
AUGMENT_UNIT = {"degrees": 8.0, "scale": 0.08, "shift_px": 2.0}
# Fields added by issue #28: a training config stored before them lacks them and takes their defaults, which are
# what training did then. Any other missing field is an error (the defaults of the others may have changed since).
_ADDED_IN_28 = ("momentum", "onecycle_warmup", "onecycle_max_momentum", "onecycle_base_momentum",
                "onecycle_start_div", "onecycle_end_div", "step_milestones", "step_gamma", "eval_batch_cpu",
                "eval_batch_cuda")
# Fields added by issue #27, likewise: their defaults (no weight average; the piecewise points, unused by the other
# schedules) are what training did before them.
_ADDED_IN_27 = ("ema", "piecewise_epochs", "piecewise_lr_factors")


# The recipe by size: nets of at most SMALL_NET_PARAMS parameters train without label smoothing. Why: on three
# layouts of 2,510-4,582 parameters it gained validation accuracy over 3 seeds on each, and micro's certified test
# accuracy with it (figures and commands: docs/recipe.md, "SGD momentum and label smoothing"). Larger nets keep
# TrainConfig's 0.05: not measured against 0 on them.
SMALL_NET_PARAMS = 5_000
SMALL_NET_LABEL_SMOOTHING = 0.0


@dataclass(frozen=True)
class TrainConfig:
    """Every training constant, with its default, in one place. The defaults are the recipe the search and the
    presets train with; the search space draws optimizer, lr, batch size, schedule, smoothing and augmentation."""

    epochs: int = RULES.max_epochs  # passes over the training split: the most the rules allow (20)
    batch_size: int = 64  # images per step (docs/engine.md has the batch sizes measured)
    optimizer: str = "sgd"  # "sgd" (Nesterov momentum) or "adamw" (beta2 0.999 and eps 1e-8: torch's)
    # Peak learning rate: OneCycle's maximum, the start of step and cosine schedules, the unit of piecewise's factors.
    lr: float = 0.1
    # SGD's Nesterov momentum, or AdamW's beta1, under the step, cosine and piecewise schedules; 0 = plain SGD
    # (torch's Nesterov needs a momentum, so SGD then steps without it). OneCycle overrides it: it cycles the
    # momentum (or beta1) itself, below.
    momentum: float = 0.9
    weight_decay: float = WEIGHT_DECAY["sgd"]  # on conv weights only (BatchNorm and biases not decayed)
    # "onecycle", "step", "cosine" (down to 0 at the last step) or "piecewise"; set per step, not per epoch.
    schedule: str = "onecycle"
    # OneCycle: the learning rate rises from lr / onecycle_start_div to lr over the first onecycle_warmup of the
    # steps, then falls along a cosine to lr / (onecycle_start_div * onecycle_end_div) at the last step. The momentum
    # (SGD) or beta1 (AdamW) moves the other way: onecycle_max_momentum at the start, down to
    # onecycle_base_momentum at the peak, back up to onecycle_max_momentum at the end (torch's OneCycleLR defaults).
    onecycle_warmup: float = 0.3  # fraction of all steps
    onecycle_max_momentum: float = 0.95
    onecycle_base_momentum: float = 0.85
    onecycle_start_div: float = 25.0  # the first step's learning rate is lr / 25
    onecycle_end_div: float = 1e4  # the last step's is the first's / 10,000
    # "step": the learning rate times step_gamma after each of these fractions of all steps.
    step_milestones: tuple[float, ...] = (0.5, 0.75)
    step_gamma: float = 0.1
    # "piecewise": the learning rate is lr times piecewise_lr_factors[i] at epoch piecewise_epochs[i] (epochs from 0,
    # the start of training; fractions allowed), linear in between at every step, and the last factor after the last
    # point. The defaults are #27's published recipe with lr 0.1: 0.05 at epoch 0, 0.1 at 2, 0.01 at 8, 0.005 at 12,
    # 0 at 15.
    piecewise_epochs: tuple[float, ...] = (0, 2, 8, 12, 15)
    piecewise_lr_factors: tuple[float, ...] = (0.5, 1.0, 0.1, 0.05, 0.0)
    label_smoothing: float = 0.05  # probability mass spread over the other classes
    # Strength of the random affine, in units of AUGMENT_UNIT (1.0 = +-8 deg, +-8% scale, +-2 px shift); 0 = off.
    # 0.5 because small nets underfit under more (figures in docs/engine.md).
    augment: float = 0.5
    # Images per evaluation batch (evaluation only: the results do not depend on it beyond float rounding). On the
    # CPU a baseline's activations at 500 stay under the malloc threshold runtime.tune_cpu_allocator sets; on CUDA
    # larger batches mean fewer launches (docs/engine.md).
    eval_batch_cpu: int = 500
    eval_batch_cuda: int = 2000
    # Exponential moving average of the weights, its decay per step (0 = off; 0.999 averages over about the last
    # 1,000 steps). When on, the averaged weights, with BatchNorm running statistics averaged alongside them, are
    # the model evaluated after every epoch and the one fit leaves in the module (engine/average.py says why).
    ema: float = 0.0
    seed: int = 0  # weights, batch order, augmentation and dropout

    def __post_init__(self) -> None:
        for name in ("step_milestones", "piecewise_epochs", "piecewise_lr_factors"):  # lists from JSON; hashable
            object.__setattr__(self, name, tuple(getattr(self, name)))
        top = RULES.max_epochs
        for name, ok, limit in (
                ("epochs", isinstance(self.epochs, int) and 1 <= self.epochs <= top,
                 f"must be from 1 to {top} (the exercise allows at most {top} epochs)"),
                ("batch_size", isinstance(self.batch_size, int) and self.batch_size >= 2,
                 "must be an integer of at least 2 (BatchNorm needs two images)"),
                ("optimizer", self.optimizer in OPTIMIZERS, f"must be one of {OPTIMIZERS}"),
                ("schedule", self.schedule in SCHEDULES, f"must be one of {SCHEDULES}"),
                ("lr", self.lr > 0, "must be positive"),
                ("momentum", 0 <= self.momentum < 1, "must be in [0, 1)"),
                ("weight_decay", self.weight_decay >= 0, "must be zero or positive"),
                ("onecycle_warmup", 0 < self.onecycle_warmup < 1, "must be in (0, 1)"),
                ("onecycle_base_momentum", 0 <= self.onecycle_base_momentum <= self.onecycle_max_momentum < 1,
                 f"must be in [0, onecycle_max_momentum={self.onecycle_max_momentum!r}], which must be under 1"),
                ("onecycle_start_div", self.onecycle_start_div >= 1, "must be at least 1"),
                ("onecycle_end_div", self.onecycle_end_div >= 1, "must be at least 1"),
                ("step_milestones", all(a < b for a, b in zip((0, *self.step_milestones), (*self.step_milestones, 1))),
                 "must be increasing fractions in (0, 1)"),
                ("step_gamma", 0 < self.step_gamma <= 1, "must be in (0, 1]"),
                ("piecewise_epochs", self.piecewise_epochs[:1] == (0,) and all(
                    a < b for a, b in zip(self.piecewise_epochs, self.piecewise_epochs[1:])),
                 "must be increasing epochs starting at 0"),
                ("piecewise_lr_factors", len(self.piecewise_lr_factors) == len(self.piecewise_epochs) > 0
                 and min(self.piecewise_lr_factors) >= 0 and max(self.piecewise_lr_factors) > 0,
                 f"must be one factor of lr (>= 0, not all 0) per point of piecewise_epochs "
                 f"({len(self.piecewise_epochs)})"),
                ("ema", 0 <= self.ema < 1, "must be in [0, 1) (0 = off)"),
                ("label_smoothing", 0 <= self.label_smoothing < 1, "must be in [0, 1)"),
                ("augment", 0 <= self.augment <= 3, "must be from 0 (off) to 3"),
                ("eval_batch_cpu", isinstance(self.eval_batch_cpu, int) and self.eval_batch_cpu >= 1,
                 "must be a positive integer"),
                ("eval_batch_cuda", isinstance(self.eval_batch_cuda, int) and self.eval_batch_cuda >= 1,
                 "must be a positive integer")):
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r}: {limit}")

    def eval_batch(self, device: torch.device) -> int:
        return self.eval_batch_cuda if device.type == "cuda" else self.eval_batch_cpu

    def to_dict(self) -> dict:
        """The fields as JSON has them (tuples as lists), so that a stored config compares equal to a fresh one.
        The fields of #27 are left out where they change nothing (no weight average; the piecewise points at their
        defaults under another schedule): a config that does not use them is stored, and so keyed for duplicates
        and compared with certificates, as before them."""
        data = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        defaults = {f.name: f.default for f in fields(self)}
        for name in _ADDED_IN_27:
            unused = name == "ema" or self.schedule != "piecewise"
            if unused and getattr(self, name) == defaults[name]:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        """A stored config; one stored before issue #28 or #27 lacks their fields and takes their defaults (what
        training did then)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"training config: unknown field(s) {unknown}; known: {sorted(known)}")
        missing = sorted(known - set(data) - {*_ADDED_IN_28, *_ADDED_IN_27})
        if missing:
            raise ValueError(f"training config: missing field(s) {missing}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


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
    step_path: str = "eager"  # the path the steps took: one of STEP_PATHS
    fallback: str | None = None  # why the planned CUDA capture failed, when the fit went on another path

    @property
    def final_val_acc(self) -> float:
        return self.epochs[-1].val_acc if self.epochs else float("nan")

    def engine(self) -> dict:
        """What the engine did that changes the result: precision, CPU shards and the step path. The same dict as
        `planned_engine` gave before training unless the fit fell back to another path: the duplicate key's engine
        part once trained."""
        return {"precision": self.precision, "shards": self.shards, "step_path": self.step_path}

    def to_dict(self) -> dict:
        return {"status": self.status, "device": self.device, "n_params": self.n_params, **self.engine(),
                "fallback": self.fallback, "epochs": [asdict(e) for e in self.epochs]}


def resolve_device(device: str = "auto") -> torch.device:
    if device not in DEVICES:
        raise ValueError(f"device={device!r}: must be one of {DEVICES}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda': no CUDA GPU is available here; use --device cpu or auto")
    return torch.device(device)


def recipe_for(n_params: int, **fields) -> TrainConfig:
    """The default recipe for a net of `n_params` parameters, with `fields` set as given: TrainConfig's defaults,
    without label smoothing for a small net (SMALL_NET_PARAMS). Presets, `certify` of a preset, spec or module and
    the search's warm start train with it; a stored trial keeps its own recipe."""
    if n_params <= SMALL_NET_PARAMS:
        fields.setdefault("label_smoothing", SMALL_NET_LABEL_SMOOTHING)
    return TrainConfig(**fields)

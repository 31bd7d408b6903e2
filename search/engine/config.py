"""What a training run takes and gives back: `TrainConfig` (every hyperparameter, with its default), `EpochRecord`
and `History`, and the device name."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch

from models.rules import RULES

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("onecycle", "step", "cosine")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass(frozen=True)
class TrainConfig:
    """Every training hyperparameter, with its default, in one place."""

    epochs: int = 15  # passes over the training split; the rules allow at most RULES.max_epochs
    batch_size: int = 64  # images per step (docs/engine.md has the batch sizes measured)
    optimizer: str = "sgd"  # "sgd" (Nesterov, momentum 0.9) or "adamw"
    lr: float = 0.1  # peak learning rate: OneCycle's maximum, the start of step and cosine schedules
    weight_decay: float = 5e-4  # L2 on conv weights, scaled by the learning rate as usual for SGD
    schedule: str = "onecycle"  # "onecycle" (30% warm-up, cosine down), "step" (x0.1 at 50% and 75%), "cosine"
    label_smoothing: float = 0.05  # probability mass spread over the other classes
    # Strength of the random affine: 1.0 = +-8 deg, +-8% scale, +-2 px shift; 0 = off. 0.5 because small nets
    # underfit under more (the compact preset did better at 0.5 than at 1.0; figures in docs/engine.md).
    augment: float = 0.5
    seed: int = 0  # weights, batch order and augmentation

    def __post_init__(self) -> None:
        def bad(name, value, limit):
            raise ValueError(f"{name}={value!r}: {limit}")

        top = RULES.max_epochs
        if not isinstance(self.epochs, int) or not 1 <= self.epochs <= top:
            bad("epochs", self.epochs, f"must be from 1 to {top} (the exercise allows at most {top} epochs)")
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

    def to_dict(self) -> dict:
        return {"status": self.status, "device": self.device, "n_params": self.n_params, "precision": self.precision,
                "epochs": [asdict(e) for e in self.epochs]}


def resolve_device(device: str = "auto") -> torch.device:
    if device not in DEVICES:
        raise ValueError(f"device={device!r}: must be one of {DEVICES}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda': no CUDA GPU is available here; use --device cpu or auto")
    return torch.device(device)

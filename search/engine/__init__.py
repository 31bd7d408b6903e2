"""The training engine: the whole split as tensors on the device, batches by index, augmentation on whole batches,
and SGD steps that a GPU replays as one CUDA graph. No Optuna here.

    config.py      TrainConfig (every training constant), EpochRecord, History (with the step path), resolve_device
    runtime.py     process-wide settings, done once: threads, malloc, cuDNN, bfloat16, capture lock; safe-point stops
    steps.py       data on the device, augmentation, optimizer and schedule, one batch's loss, the ordinary epoch
    whole_step.py  the whole SGD step on fixed buffers (CUDA graph; sharded across threads on a CPU)
    average.py     the exponential moving average of the weights (TrainConfig.ema), swapped in to evaluate
    loop.py        fit and evaluate
"""

from search.engine.config import STEP_PATHS, EpochRecord, History, TrainConfig, recipe_for, resolve_device
from search.engine.loop import epoch_line, evaluate, fit, planned_engine
from search.engine.steps import augment_batch, to_device

__all__ = ["STEP_PATHS", "EpochRecord", "History", "TrainConfig", "augment_batch", "epoch_line", "evaluate", "fit",
           "planned_engine", "recipe_for", "resolve_device", "to_device"]

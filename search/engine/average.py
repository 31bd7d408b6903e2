"""An exponential moving average of the weights (TrainConfig.ema), kept beside the model and swapped into it to
evaluate it, and at the end of a fit.

After every optimizer step, avg = decay * avg + (1 - decay) * weights (torch's `get_ema_multi_avg_fn`, one
`_foreach_lerp_`), starting from the initial weights: after n steps avg_n = d^n w_0 + (1 - d) sum_k d^(n-k) w_k.
The update is device work on fixed tensors, so the whole step's CUDA graph captures it with the rest of the step.

BatchNorm's running statistics are averaged alongside the weights (as timm's ModelEma does), not copied from the
live model: the live statistics (momentum 0.1: about the last 10 steps) describe the live weights' activations,
while the averaged weights are a mix of about the last 1 / (1 - decay) steps' weights (1,000 at 0.999); statistics
averaged over the same steps describe that mix, without the extra pass over the data that torch's `update_bn`
would cost per evaluation. With CPU shards the statistics averaged are the shards' weighted mean at every step
(what `WholeStep.sync` gives before an evaluation; both are linear, so averaging the mean is the mean of averages).
The batch counter (`num_batches_tracked`, an integer) is the live model's.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn


def running_stats(model: nn.Module) -> list[torch.Tensor]:
    """BatchNorm running means and variances of `model`, in module order."""
    return [t for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            for t in (m.running_mean, m.running_var)]


class WeightAverage:
    """The averaged parameters and BatchNorm statistics of `model`, updated by `update()` after every step."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"ema={decay!r}: the decay per step must be in (0, 1)")
        self.decay = decay
        self.params = list(model.parameters())
        self.stats = running_stats(model)
        self._lerp = get_ema_multi_avg_fn(decay)
        self.avg_params = [p.detach().clone() for p in self.params]
        self.avg_stats = [t.detach().clone() for t in self.stats]

    def reset(self) -> None:
        """Start again from the model's weights as they are now (after a capture's warm-up steps put them back)."""
        with torch.no_grad():
            for avg, live in zip(self.avg_params + self.avg_stats, self.params + self.stats):
                avg.copy_(live)

    def update(self, shard_stats: list[tuple[list[torch.Tensor], float]] | None = None) -> None:
        """One step of the average. `shard_stats`: (statistics, weight) of every shard's replica, whose weighted
        mean is averaged; None: the model's own statistics."""
        with torch.no_grad():
            self._lerp(self.avg_params, self.params, None)
            if not self.avg_stats:
                return
            if shard_stats is None:
                self._lerp(self.avg_stats, self.stats, None)
                return
            torch._foreach_mul_(self.avg_stats, self.decay)
            for stats, weight in shard_stats:  # in shard order, so the sum is the same every run
                torch._foreach_add_(self.avg_stats, stats, alpha=(1 - self.decay) * weight)

    def swap(self) -> None:
        """Exchange the model's weights and statistics with the averaged ones, in place (a CUDA graph and the
        shards' replicas keep pointing at the same tensors); twice is the identity."""
        with torch.no_grad():
            for avg, live in zip(self.avg_params + self.avg_stats, self.params + self.stats):
                kept = live.clone()
                live.copy_(avg)
                avg.copy_(kept)

    @contextmanager
    def swapped_in(self):
        """The averaged weights in the model for the block (to evaluate it), the live ones back after."""
        self.swap()
        try:
            yield
        finally:
            self.swap()

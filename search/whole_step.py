"""A whole SGD training step on fixed buffers, so that CUDA can capture it as one graph and replay it per batch.

The step reads everything that changes from tensors on the device: the epoch's shuffled order and augmentation
matrices, a step counter, and the learning rate and momentum of every step of the schedule (computed up front by
torch's own schedulers). Gather, augmentation, forward, loss, backward, the Nesterov SGD update and the epoch's loss
and accuracy sums are then all device work, and a step costs one graph launch instead of a kernel launch per
operation and the Python between them: a 20k-parameter net on a GPU is bound by those launches, not by arithmetic
(on an H200 the baseline's epoch took 4.28 s eagerly and 0.39 s as one graph per step).

Without capture (on the CPU) the same step runs eagerly, a little faster than torch's optimizer and scheduler
(their Python per step is gone); tests/test_train.py holds it to the ordinary loop's weights.
"""

from __future__ import annotations

import torch
from torch import nn

from search.train import CAPTURE_LOCK, batch_loss, make_optimizer, make_scheduler, quiet_stream_mismatch


def schedule(cfg, steps_per_epoch: int) -> tuple[list[float], list[float]]:
    """Learning rate and momentum of every step, as torch's SGD and scheduler would set them (OneCycle cycles both).

    The learning rates have one more entry: the rate after the last step.
    """
    dummy = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([dummy], lr=cfg.lr, momentum=0.9, nesterov=True)
    sched = make_scheduler(opt, cfg, steps_per_epoch)
    opt.step()  # no gradient, so a no-op; once, so that the scheduler does not warn of the call order
    group = opt.param_groups[0]
    lrs, moms = [], []
    for _ in range(cfg.epochs * steps_per_epoch):  # 20 OneCycle epochs of 781 steps: 0.05 s (0.24 s with opt.step)
        lrs.append(group["lr"])
        moms.append(group["momentum"])
        sched.step()
    lrs.append(opt.param_groups[0]["lr"])  # after the last step, as the ordinary loop reports it
    return lrs, moms


class WholeStep:
    """One SGD step per call: `start_epoch(order, thetas)`, then `step()` n // batch_size times, then `sums()`."""

    def __init__(self, model: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor, cfg, criterion: nn.Module,
                 channels_last: bool, steps_per_epoch: int, capture: bool, bf16: bool):
        if cfg.optimizer != "sgd":
            raise ValueError(f"optimizer={cfg.optimizer!r}: the whole-step path does SGD only")
        device = x_train.device
        self.model, self.x_train, self.y_train, self.cfg, self.criterion = model, x_train, y_train, cfg, criterion
        self.channels_last, self.bf16 = channels_last, bf16
        n = len(y_train)
        self.order = torch.arange(n, device=device)
        self.thetas = torch.zeros(n, 2, 3, device=device)
        self.thetas[:, 0, 0] = self.thetas[:, 1, 1] = 1  # identity until the first epoch fills them
        self.offsets = torch.arange(cfg.batch_size, device=device)
        self.epoch_step = torch.zeros((), dtype=torch.long, device=device)
        self.global_step = torch.zeros((), dtype=torch.long, device=device)
        lrs, moms = schedule(cfg, steps_per_epoch)
        self._lrs = lrs  # for `lr`, without reading the device
        self.lrs = torch.tensor(lrs, device=device)
        self.moms = torch.tensor(moms, device=device)
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        # The same parameter groups as torch's optimizer: conv weights decayed, BatchNorm and biases not.
        groups = make_optimizer(model, cfg).param_groups
        self.decay = [p for g in groups if g["weight_decay"] > 0 for p in g["params"]]
        self.params = [p for g in groups for p in g["params"]]
        self.bufs = [torch.zeros_like(p) for p in self.params]
        self.graph = self._capture() if capture else None

    def _step(self) -> None:
        cfg = self.cfg
        pos = self.epoch_step * cfg.batch_size + self.offsets
        logits, loss, yb = batch_loss(self.model, self.criterion, self.x_train, self.y_train, self.order[pos],
                                      self.thetas[pos] if cfg.augment > 0 else None, self.channels_last, self.bf16)
        loss.backward()
        with torch.no_grad():
            at = self.global_step.view(1)  # index_select, not [], which would read the step back to the host
            self._sgd(self.lrs.index_select(0, at).squeeze(), self.moms.index_select(0, at).squeeze())
            self.loss_sum += loss.detach() * cfg.batch_size
            self.correct += (logits.argmax(1) == yb).sum()
            self.epoch_step += 1
            self.global_step += 1

    def _sgd(self, lr: torch.Tensor, momentum: torch.Tensor) -> None:
        """torch.optim.SGD(nesterov=True) with the learning rate and momentum as device tensors."""
        grads = [p.grad for p in self.params]
        if self.cfg.weight_decay > 0:
            torch._foreach_add_([p.grad for p in self.decay], self.decay, alpha=self.cfg.weight_decay)
        torch._foreach_mul_(self.bufs, momentum)
        torch._foreach_add_(self.bufs, grads)  # buf = momentum * buf + grad (buf starts at 0: torch's first step)
        torch._foreach_add_(grads, torch._foreach_mul(self.bufs, momentum))  # Nesterov: grad + momentum * buf
        torch._foreach_mul_(grads, lr)
        torch._foreach_sub_(self.params, grads)

    def _capture(self) -> torch.cuda.CUDAGraph:
        """Warm up on a side stream (cuDNN picks its kernels), capture one step, then put back what warm-up changed.

        One capture at a time in the process; "thread_local" lets other trials' threads use the GPU meanwhile.
        """
        state = {k: v.clone() for k, v in self.model.state_dict().items()}
        rng = torch.cuda.get_rng_state(self.x_train.device)
        quiet_stream_mismatch()
        try:
            with CAPTURE_LOCK:
                side = torch.cuda.Stream(self.x_train.device)
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(3):
                        self._reset_step()
                        self._step()
                torch.cuda.current_stream().wait_stream(side)
                self._reset_step()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    self._step()
            return graph
        finally:  # also when the capture fails and the trial goes on eagerly
            self.model.load_state_dict(state)  # copies in place: the graph keeps pointing at the same tensors
            for t in (*self.bufs, self.global_step):
                t.zero_()
            torch.cuda.set_rng_state(rng, self.x_train.device)

    def _reset_step(self) -> None:
        for p in self.params:
            p.grad = None
        for t in (self.epoch_step, self.global_step):
            t.zero_()

    def start_epoch(self, order: torch.Tensor, thetas: torch.Tensor | None) -> None:
        self.order.copy_(order)
        if thetas is not None:
            self.thetas.copy_(thetas)
        for t in (self.epoch_step, self.loss_sum, self.correct):
            t.zero_()

    def step(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            for p in self.params:
                p.grad = None
            self._step()

    def sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The epoch's summed training loss and number of correct predictions so far."""
        return self.loss_sum, self.correct

    @property
    def lr(self) -> float:
        """The learning rate for the next step, as torch's scheduler reports it after the last one."""
        return self._lrs[int(self.global_step.item())]


"""A whole SGD training step on fixed buffers, so that CUDA can capture it as one graph and replay it per batch.

The step reads everything that changes from tensors on the device: the epoch's shuffled order and augmentation
matrices, a step counter, and the learning rate and momentum of every step of the schedule (computed up front by
torch's own schedulers). Gather, augmentation, forward, loss, backward, the Nesterov SGD update and the epoch's loss
and accuracy sums are then all device work, and a step costs one graph launch instead of a kernel launch per
operation and the Python between them: a 20k-parameter net on a GPU is bound by those launches, not by arithmetic
(docs/engine.md has the figures).

Without capture (on the CPU, or where torch refuses to capture the step) the same step runs eagerly, without the
Python of torch's optimizer and scheduler per step; tests/test_train.py holds it to the ordinary loop's weights.

On a CPU with several threads the step of a small net splits its batch into shards of at least 32 images, one per
thread (`cpu_shards`): each shard gathers, augments, runs forward and backward on its own single-threaded worker and
a replica of the model that shares its parameters; the gradients are summed in a fixed order and one SGD update
follows. Small convolutions gain little from torch's intra-op threads, while independent single-threaded workers
each run at full speed (a baseline-sized net, whose convolutions keep the threads busy, gains nothing and is not
sharded; docs/engine.md has the figures). BatchNorm then normalises each shard by its own statistics ("ghost
batch" normalisation, as on several GPUs without SyncBatchNorm); its running statistics are averaged across shards
before every evaluation, so evaluation sees one set.
"""

from __future__ import annotations

import copy
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from search.engine.average import WeightAverage, running_stats
from search.engine.runtime import capture_guard, capturing
from search.engine.steps import batch_loss, first_momentum, make_optimizer, make_scheduler


def schedule(cfg, steps_per_epoch: int) -> tuple[list[float], list[float]]:
    """Learning rate and momentum of every step, as torch's SGD and scheduler would set them (OneCycle cycles both).

    The learning rates have one more entry: the rate after the last step.
    """
    dummy = torch.zeros(1, requires_grad=True)
    momentum = first_momentum(cfg)
    opt = torch.optim.SGD([dummy], lr=cfg.lr, momentum=momentum, nesterov=momentum > 0)
    sched = make_scheduler(opt, cfg, steps_per_epoch)
    opt.step()  # no gradient, so a no-op; once, so that the scheduler does not warn of the call order
    group = opt.param_groups[0]
    lrs, moms = [], []
    for _ in range(cfg.epochs * steps_per_epoch):  # the scheduler alone: an optimizer step per entry costs more
        lrs.append(group["lr"])
        moms.append(group["momentum"])
        sched.step()
    lrs.append(opt.param_groups[0]["lr"])  # after the last step, as the ordinary loop reports it
    return lrs, moms


# Engine constants, not recipe: they decide how a CPU step is spread over threads, and what that changes in training
# (BatchNorm statistics per shard) is recorded as the fit's shard count, in History and in the duplicate key.
MIN_SHARD = 32  # images per shard: BatchNorm statistics over at least the hand-made answers' batch of 32
# Forward multiply-accumulates per image from which a CPU step does not shard: a net this large keeps every thread
# busy in its convolutions, and sharding it measured slower (docs/engine.md).
SHARD_MAX_MACS = 2_500_000
WARMUP_STEPS = 3  # eager steps on a side stream before a capture, in which cuDNN picks its kernels


def cpu_shards(batch_size: int, macs_per_image: int) -> int:
    """Shards of a CPU step: for a net under SHARD_MAX_MACS, one per intra-op thread of the calling thread, each of
    at least MIN_SHARD images; otherwise 1."""
    if macs_per_image >= SHARD_MAX_MACS:
        return 1
    return max(1, min(torch.get_num_threads(), batch_size // MIN_SHARD))


def _tied_replica(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters are the model's own tensors; buffers (BatchNorm statistics) its own."""
    replica = copy.deepcopy(model)
    for mine, theirs in zip(replica.modules(), model.modules()):
        for name, param in theirs._parameters.items():
            mine._parameters[name] = param
    return replica


class WholeStep:
    """One SGD step per call: `start_epoch(order, thetas)`, then `step()` n // batch_size times, then `sums()` and,
    before the model is evaluated, `sync()`.

    `shards` > 1 (CPU only) splits each batch across that many worker threads; `close()` stops them.
    `average`: the weight average (cfg.ema) to update after every SGD update, inside the captured graph too.
    """

    def __init__(self, model: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor, cfg, criterion: nn.Module,
                 steps_per_epoch: int, capture: bool, bf16: bool, shards: int = 1,
                 average: WeightAverage | None = None):
        if cfg.optimizer != "sgd":
            raise ValueError(f"optimizer={cfg.optimizer!r}: the whole-step path does SGD only")
        if shards > 1 and (capture or x_train.device.type != "cpu"):
            raise ValueError(f"shards={shards}: sharded steps run on the CPU only")
        if not 1 <= shards <= cfg.batch_size // 2:
            raise ValueError(f"shards={shards}: must be between 1 and batch_size / 2 = {cfg.batch_size // 2} "
                             "(BatchNorm needs two images per shard)")
        device = x_train.device
        self.model, self.x_train, self.y_train, self.cfg, self.criterion = model, x_train, y_train, cfg, criterion
        self.bf16, self.shards, self.average = bf16, shards, average
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
        self.momentum_on = any(m > 0 for m in moms)  # without, the update is plain SGD: no buffer work
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        # The same parameter groups as torch's optimizer: conv weights decayed, BatchNorm and biases not.
        groups = make_optimizer(model, cfg).param_groups
        decay = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
        self.params = [p for g in groups for p in g["params"]]
        self.decay_idx = [i for i, p in enumerate(self.params) if id(p) in decay]
        self.bufs = [torch.zeros_like(p) for p in self.params]
        self.graph = self._capture() if capture else None
        if average is not None:
            average.reset()  # the capture's warm-up steps moved it; capture_guard has put the weights back
        self.pool = None
        if shards > 1:
            self._start_shards(shards, device)

    def _start_shards(self, shards: int, device: torch.device) -> None:
        """Split the batch's offsets, build the replicas and their dropout streams, start one worker per shard."""
        size = self.cfg.batch_size
        bounds = [size * i // shards for i in range(shards + 1)]
        self.shard_offsets = [self.offsets[a:b] for a, b in zip(bounds, bounds[1:])]
        self.shard_weights = [(b - a) / size for a, b in zip(bounds, bounds[1:])]
        self.replicas = [self.model] + [_tied_replica(self.model) for _ in range(shards - 1)]
        self.shard_stats = [running_stats(r) for r in self.replicas]
        for i, replica in enumerate(self.replicas):  # each shard's dropout masks from its own seeded stream
            gen = torch.Generator(device=device).manual_seed(self.cfg.seed * 1_000_003 + i)
            for m in replica.modules():
                if hasattr(m, "generator"):
                    m.generator = gen
        # Every worker runs single-threaded (threads x shards <= the caller's threads). torch.set_num_threads sets
        # the calling thread's OpenMP team size and the default for threads started later, so the caller's default
        # is put back once the workers are up.
        threads = max(1, torch.get_num_threads() // shards)
        ready = threading.Barrier(shards + 1)

        def init() -> None:
            torch.get_num_threads()  # torch's lazy per-thread set-up first, or it would undo the next line later
            torch.set_num_threads(threads)

        restore = torch.get_num_threads()
        self.pool = ThreadPoolExecutor(shards, thread_name_prefix="budgetnas-shard", initializer=init)
        started = [self.pool.submit(ready.wait) for _ in range(shards)]
        try:
            ready.wait()
            for f in started:
                f.result()
        except BaseException:  # Ctrl-C or SIGTERM here: free the workers at the barrier, or exit would wait forever
            ready.abort()
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
            raise
        finally:
            torch.set_num_threads(restore)

    def close(self) -> None:
        """Stop the shard workers and give the model's dropout back torch's default generator."""
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None
            for m in self.model.modules():
                if hasattr(m, "generator"):
                    m.generator = None

    def _forward(self, model: nn.Module, offsets: torch.Tensor):
        pos = self.epoch_step * self.cfg.batch_size + offsets
        return batch_loss(model, self.criterion, self.x_train, self.y_train, self.order[pos],
                          self.thetas[pos] if self.cfg.augment > 0 else None, self.bf16)

    def _step(self) -> None:
        logits, loss, yb = self._forward(self.model, self.offsets)
        loss.backward()
        with torch.no_grad():
            self._update([p.grad for p in self.params], loss.detach() * self.cfg.batch_size,
                         (logits.argmax(1) == yb).sum())

    def _shard(self, i: int):
        """Shard i's share of the step (in its worker): its gradients, summed loss and number correct."""
        logits, loss, yb = self._forward(self.replicas[i], self.shard_offsets[i])
        grads = torch.autograd.grad(loss * self.shard_weights[i], self.params)
        with torch.no_grad():
            return grads, loss.detach() * len(yb), (logits.argmax(1) == yb).sum()

    def _sharded_step(self) -> None:
        parts = [f.result() for f in [self.pool.submit(self._shard, i) for i in range(len(self.replicas))]]
        with torch.no_grad():
            grads = list(parts[0][0])
            for other, _, _ in parts[1:]:  # in shard order, so the sum is the same every run
                torch._foreach_add_(grads, other)
            self._update(grads, sum(p[1] for p in parts), sum(p[2] for p in parts))

    def sync(self) -> None:
        """Bring every shard's BatchNorm running statistics to their weighted mean (before evaluating the model).

        The running statistics are exponential moving averages, linear in the batch statistics: the mean of the
        shards' own averages, taken once, equals averaging after every step; all replicas go on from the mean.
        """
        stats = self.shard_stats[0] if self.pool is not None else []
        if stats:
            with torch.no_grad():
                torch._foreach_mul_(stats, self.shard_weights[0])
                for other, w in zip(self.shard_stats[1:], self.shard_weights[1:]):
                    torch._foreach_add_(stats, other, alpha=w)
                for other in self.shard_stats[1:]:
                    torch._foreach_copy_(other, stats)

    def _update(self, grads: list[torch.Tensor], loss_sum: torch.Tensor, correct: torch.Tensor) -> None:
        """The SGD update from `grads` (aligned with self.params; changed in place) and the epoch's sums."""
        at = self.global_step.view(1)  # index_select, not [], which would read the step back to the host
        self._sgd(grads, self.lrs.index_select(0, at).squeeze(), self.moms.index_select(0, at).squeeze())
        if self.average is not None:
            self.average.update(list(zip(self.shard_stats, self.shard_weights)) if self.pool is not None else None)
        self.loss_sum += loss_sum
        self.correct += correct
        self.epoch_step += 1
        self.global_step += 1

    def _sgd(self, grads: list[torch.Tensor], lr: torch.Tensor, momentum: torch.Tensor) -> None:
        """torch.optim.SGD(nesterov=True) with the learning rate and momentum as device tensors; plain SGD where the
        momentum is 0 at every step (as torch's SGD without momentum)."""
        if self.cfg.weight_decay > 0:
            torch._foreach_add_([grads[i] for i in self.decay_idx], [self.params[i] for i in self.decay_idx],
                                alpha=self.cfg.weight_decay)
        if self.momentum_on:
            torch._foreach_mul_(self.bufs, momentum)
            torch._foreach_add_(self.bufs, grads)  # buf = momentum * buf + grad (buf starts at 0: torch's first step)
            torch._foreach_add_(grads, torch._foreach_mul(self.bufs, momentum))  # Nesterov: grad + momentum * buf
        torch._foreach_mul_(grads, lr)
        torch._foreach_sub_(self.params, grads)

    def _capture(self) -> torch.cuda.CUDAGraph:
        """Warm up on a side stream (cuDNN picks its kernels), capture one step, then put back what warm-up changed.

        One capture at a time in the process (capture_guard, which also puts back what warm-up changed, also when the
        capture fails); "thread_local" lets other trials' threads use the GPU meanwhile. A capture torch refuses
        raises CaptureFailed (an error in the warm-up steps is the model's, and raised as it is).
        """
        with capture_guard(self.model, self.x_train.device, also_zero=(*self.bufs, self.global_step)):
            side = torch.cuda.Stream(self.x_train.device)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):
                    self._reset_step()
                    self._step()
            torch.cuda.current_stream().wait_stream(side)
            self._reset_step()
            graph = torch.cuda.CUDAGraph()
            with capturing(), torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self._step()
        return graph

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
        if self.pool is not None:
            for replica in self.replicas[1:]:
                replica.train(self.model.training)

    def step(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        elif self.pool is not None:
            self._sharded_step()
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


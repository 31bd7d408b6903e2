"""What the benchmarks share: the device, the CPU threads, and the training and validation splits on the device."""

from search.data import load_mnist
from search.engine import resolve_device, to_device
from search.engine.runtime import set_cpu_threads


def split_on_device(device_name: str, data_dir: str | None, subset: int | None = None, val: int | None = None):
    """(device, train split, validation split, data_on_device for `fit`): the first `subset` training and `val`
    validation images (all when None), with torch's CPU threads set to the cores on a CPU."""
    device = resolve_device(device_name)
    if device.type == "cpu":
        set_cpu_threads(None)
    mnist = load_mnist(data_dir)
    train = mnist.train.head(subset) if subset else mnist.train
    held_out = mnist.val.head(val) if val else mnist.val
    return device, train, held_out, (*to_device(train, device), *to_device(held_out, device))

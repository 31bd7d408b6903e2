"""What the benchmarks share: the data (found by the CLI's one rule, search/data.py), the device, the CPU threads,
and the training and validation splits on the device."""

import argparse
import sys

from search.data import DEFAULT_ROOT, ENV_VAR, DataError, Data, load_data
from search.engine import resolve_device, to_device
from search.engine.runtime import set_cpu_threads

UNUSABLE_INPUT = 2  # exit status for a data set that is absent or broken, as the CLI's


def add_data_dir(parser: argparse.ArgumentParser) -> None:
    """The --data-dir option of every benchmark, with the CLI's default."""
    parser.add_argument("--data-dir", default=None, help=f"the data root [default: ${ENV_VAR}, else {DEFAULT_ROOT}]")


def load_or_exit(data_dir: str | None, **kwargs) -> Data:
    """The set by the CLI's rule, or its one-line error on stderr and exit 2 (no traceback)."""
    try:
        return load_data(data_dir, **kwargs)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(UNUSABLE_INPUT) from None


def split_on_device(device_name: str, data_dir: str | None, subset: int | None = None, val: int | None = None):
    """(device, train split, validation split, data_on_device for `fit`): the first `subset` training and `val`
    validation images (all when None), with torch's CPU threads set to the cores on a CPU."""
    device = resolve_device(device_name)
    if device.type == "cpu":
        set_cpu_threads(None)
    mnist = load_or_exit(data_dir)
    train = mnist.train.head(subset) if subset else mnist.train
    held_out = mnist.val.head(val) if val else mnist.val
    return device, train, held_out, (*to_device(train, device), *to_device(held_out, device))

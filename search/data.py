"""MNIST as uint8 tensors: a checked reader for torchvision's layout, and the fixed train/validation split.

The data root comes from `--data-dir`, else the environment variable BUDGETNAS_DATA, else `./data`. It holds
`MNIST/raw/*-ubyte` (the root may also be the `raw` folder itself). Only when all four files are absent is
torchvision's download tried; every present file is checked (IDX header, item count, size, md5) and a broken one
is named, never silently replaced. The test images are loaded only when asked for: the search selects on the
validation split, and only `best` touches the test set.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from search.fsio import atomic_write_text

ENV_VAR = "BUDGETNAS_DATA"
DEFAULT_ROOT = "./data"
MNIST_CLASSES = 10  # digits 0-9: a network must output this many logits
N_VAL = 10_000  # held out from the 60,000 training images for model selection
SPLIT_SEED = 20_000  # fixed: every trial and every study sees the same validation images
MEAN, STD = 0.1307, 0.3081  # of MNIST training pixels scaled to [0, 1]

# name: (IDX magic, items, bytes, md5 of the uncompressed file)
FILES = {
    "train-images-idx3-ubyte": (2051, 60_000, 47_040_016, "6bbc9ace898e44ae57da46a324031adb"),
    "train-labels-idx1-ubyte": (2049, 60_000, 60_008, "a25bea736e30d166cdddb491f175f624"),
    "t10k-images-idx3-ubyte": (2051, 10_000, 7_840_016, "2646ac647ad5339dbf082846283269ea"),
    "t10k-labels-idx1-ubyte": (2049, 10_000, 10_008, "27ae3e4e09519cfbb04c329615203637"),
}


class DataError(RuntimeError):
    """MNIST could not be found, read or downloaded; the message says which file and what to do."""


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # uint8, (N, 28, 28)
    labels: torch.Tensor  # int64, (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int) -> "Split":
        return Split(self.images[:n], self.labels[:n])


@dataclass(frozen=True)
class MNIST:
    train: Split  # 50,000 images the search trains on (60,000 with full_train)
    val: Split  # 10,000 held out from the training set; empty with full_train
    test: Split | None  # the 10,000 official test images, only when asked for
    root: Path


def resolve_root(data_dir: str | os.PathLike | None = None) -> Path:
    return Path(data_dir or os.environ.get(ENV_VAR) or DEFAULT_ROOT).expanduser()


def raw_dir(root: Path) -> Path:
    """The folder with the IDX files, whichever of three folders --data-dir names: the data root (`root/MNIST/raw`),
    the `MNIST` folder (`root/raw`), or the `raw` folder itself."""
    for folder in (root, root / "raw"):
        if any((folder / name).exists() for name in FILES):
            return folder
    return root / "MNIST" / "raw"


# md5 sums verified once per file and remembered across commands (a stamp per file: path, size and modification
# time), in the user's cache, never beside the data (which may be read-only or shared). Reading 55 MB for md5 cost
# every command about 4 s.
STAMPS = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "budgetnas" / "verified-md5.json"


def _stamp(path: Path, size: int, mtime_ns: int) -> str:
    return f"{path.resolve()}|{size}|{mtime_ns}"


def _verified_before(path: Path, size: int, mtime_ns: int, md5: str) -> bool:
    try:
        return json.loads(STAMPS.read_text()).get(_stamp(path, size, mtime_ns)) == md5
    except (OSError, ValueError):
        return False


def _remember_verified(path: Path, size: int, mtime_ns: int, md5: str) -> None:
    try:
        known = json.loads(STAMPS.read_text()) if STAMPS.exists() else {}
        known[_stamp(path, size, mtime_ns)] = md5
        atomic_write_text(STAMPS, json.dumps(known, indent=1))
    except (OSError, ValueError):
        pass  # a cache: without it, the next command checks the md5 again


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_file(path: Path) -> None:
    """Raise DataError naming the file if its header, item count, size or checksum is off."""
    if not path.is_file():
        raise DataError(f"{path}: missing")
    stat = path.stat()
    _check_file(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _check_file(path: Path, actual: int, mtime_ns: int) -> None:
    """Keyed by size and mtime: the md5 of an unchanged file is read once per process, not once per caller."""
    magic, items, size, md5 = FILES[path.name]
    with path.open("rb") as f:
        header = f.read(8)
    if len(header) < 8:
        raise DataError(f"{path}: truncated, {actual} bytes, too short for an IDX header (expected {size:,} bytes)")
    got_magic, got_items = int.from_bytes(header[:4], "big"), int.from_bytes(header[4:8], "big")
    if got_magic != magic:
        raise DataError(f"{path}: not an IDX file of this kind: magic number {got_magic}, expected {magic}")
    if got_items != items:
        raise DataError(f"{path}: header says {got_items:,} items, expected {items:,}")
    if actual != size:
        raise DataError(f"{path}: {actual:,} bytes, expected {size:,}: the file is truncated or padded")
    if _verified_before(path, actual, mtime_ns, md5):
        return
    digest = _md5(path)
    if digest != md5:
        raise DataError(f"{path}: md5 {digest} does not match the published {md5}: the file is corrupted")
    _remember_verified(path, actual, mtime_ns, md5)


def _download(root: Path) -> None:
    created = [p for p in (root / "MNIST" / "raw", root / "MNIST", root) if not p.exists()]
    try:
        from torchvision.datasets import MNIST as TorchvisionMNIST

        TorchvisionMNIST(str(root), train=True, download=True)
        TorchvisionMNIST(str(root), train=False, download=True)
    except Exception as exc:  # no network, read-only folder, ...
        for folder in created:  # leave nothing behind: the folders torchvision made for the download
            try:
                for partial in folder.glob("*.gz"):
                    partial.unlink()
                folder.rmdir()
            except OSError:
                pass
        raise DataError(
            f"MNIST is not under {root.resolve()} (expected MNIST/raw/train-images-idx3-ubyte and the three other "
            f"IDX files) and downloading it failed ({type(exc).__name__}: {' '.join(str(exc).split())[:300]}). "
            f"Point --data-dir or the {ENV_VAR} environment variable at a folder that holds MNIST/raw/*-ubyte."
        ) from None


def _read(path: Path) -> torch.Tensor:
    from torchvision.datasets.mnist import read_image_file, read_label_file

    return read_label_file(str(path)).long() if "labels" in path.name else read_image_file(str(path))


@functools.lru_cache(maxsize=4)
def _load_raw(folder: Path, part: str) -> Split:
    prefix = "train" if part == "train" else "t10k"
    paths = [folder / f"{prefix}-images-idx3-ubyte", folder / f"{prefix}-labels-idx1-ubyte"]
    for path in paths:
        check_file(path)
    return Split(_read(paths[0]), _read(paths[1]))


def load_mnist(data_dir: str | os.PathLike | None = None, *, with_test: bool = False,
               full_train: bool = False) -> MNIST:
    """MNIST from the data root: a 50,000/10,000 train/validation split (or all 60,000 with `full_train`)."""
    root = resolve_root(data_dir)
    folder = raw_dir(root)
    if not any((folder / name).exists() for name in FILES):
        _download(root)
        folder = raw_dir(root)
    train_all = _load_raw(folder.resolve(), "train")
    if full_train:
        train, val = train_all, Split(train_all.images[:0], train_all.labels[:0])
    else:
        order = torch.randperm(len(train_all), generator=torch.Generator().manual_seed(SPLIT_SEED))
        val_idx, train_idx = order[:N_VAL], order[N_VAL:]
        train = Split(train_all.images[train_idx], train_all.labels[train_idx])
        val = Split(train_all.images[val_idx], train_all.labels[val_idx])
    test = _load_raw(folder.resolve(), "test") if with_test else None
    return MNIST(train, val, test, root)


def check_data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """Check the four files up front (for commands that refuse bad input before doing any work)."""
    root = resolve_root(data_dir)
    folder = raw_dir(root)
    if not any((folder / name).exists() for name in FILES):
        return root  # absent: load_mnist will try the download and explain if it fails
    for name in FILES:
        check_file(folder / name)
    return root

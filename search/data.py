"""A 28x28 grey image set loaded from the data root: its folder found (or downloaded), its files checked, and the
fixed train/validation split made, with its classes and normalisation.

Sets (`--dataset`): `mnist` (the default), `fashion-mnist`, `kmnist`, and `idx`, any set in the same layout: four IDX
files (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, each
possibly gzipped), 28x28 uint8 images, integer labels. The data root comes from `--data-dir`, else the environment
variable BUDGETNAS_DATA, else `./data`; a known set is looked for under the root in torchvision's folder names
(`MNIST/raw`, `FashionMNIST/raw`, `KMNIST/raw`), and `--data-dir` may also name that folder or its `raw` folder, or
the folder holding the files. Only when all four files are absent is torchvision's download tried (known sets); an
`idx` set without files gets the exact names expected. Every file is checked (IDX header, counts, shape, size) and
a known set's against its published md5 sums; a broken file is named, never silently replaced. The test images are
loaded only when asked for: the search selects on the validation split, and only certification touches the test set.

The files themselves: search/idx_files.py; the known sets: search/known_sets.py. Their names stay importable here.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from search.idx_files import FILES, SIDE, DataError, check_file, find_file, read_idx, require_file  # noqa: F401
from search.known_sets import (DATASETS, KNOWN, MEAN, MNIST_CLASSES, STD, TORCHVISION_CLASSES,  # noqa: F401
                               KnownSet)

ENV_VAR = "BUDGETNAS_DATA"
DEFAULT_ROOT = "./data"
N_VAL = 10_000  # held out from the 60,000 training images for model selection
SPLIT_SEED = 20_000  # fixed: every trial and every study sees the same validation images


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # uint8, (N, 28, 28)
    labels: torch.Tensor  # int64, (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int) -> "Split":
        return Split(self.images[:n], self.labels[:n])


@dataclass(frozen=True)
class Data:
    train: Split  # 50,000 images the search trains on (60,000 with full_train)
    val: Split  # 10,000 held out from the training set; empty with full_train
    test: Split | None  # the 10,000 official test images, only when asked for
    root: Path  # the folder holding the four files
    name: str = "mnist"
    md5: dict[str, str] = field(default_factory=dict)  # file name -> md5 of its uncompressed content
    classes: int = MNIST_CLASSES  # from the labels
    mean: float = MEAN  # normalisation: of the training images' pixels, scaled to [0, 1]
    std: float = STD

    @property
    def stats(self) -> tuple[float, float]:
        return self.mean, self.std

    def record(self) -> dict:
        """What a study's set-up and a certificate remember of the data."""
        return {"name": self.name, "md5": dict(sorted(self.md5.items())), "classes": self.classes,
                "mean": round(self.mean, 6), "std": round(self.std, 6)}


def resolve_root(data_dir: str | os.PathLike | None = None) -> Path:
    return Path(data_dir or os.environ.get(ENV_VAR) or DEFAULT_ROOT).expanduser()


def raw_dir(root: Path, dataset: str = "mnist") -> Path:
    """The folder with the four files, whichever folder --data-dir names: the data root (`root/<Folder>/raw`), the
    set's folder (`root/raw`), or the folder holding the files; the known set's other places after that. When none
    holds a file, the folder the files are expected in (and downloaded to)."""
    known = KNOWN.get(dataset)
    candidates = [root, root / "raw"]
    if known:
        candidates += [root / known.folder / "raw", root / known.folder, *map(Path, known.also)]
    for folder in candidates:
        if any(find_file(folder, name) for name in FILES):
            return folder
    return root / known.folder / "raw" if known else root


@functools.lru_cache(maxsize=8)
def _load_raw(folder: Path, part: str, dataset: str) -> tuple[Split, dict[str, str]]:
    prefix = "train" if part == "train" else "t10k"
    paths = [require_file(folder, f"{prefix}-images-idx3-ubyte"),
             require_file(folder, f"{prefix}-labels-idx1-ubyte")]
    md5 = {p.name.removesuffix(".gz"): check_file(p, dataset) for p in paths}
    images, labels = read_idx(paths[0]), read_idx(paths[1]).long()
    if len(images) != len(labels):
        raise DataError(f"{paths[0]} holds {len(images):,} images and {paths[1]} {len(labels):,} labels; they must "
                        "match")
    return Split(images, labels), md5


def _download(root: Path, dataset: str) -> None:
    known = KNOWN.get(dataset)
    if known is None:
        raise DataError(f"no IDX set under {root.resolve()}: expected the four files {', '.join(FILES)} (each may be "
                        f"gzipped) in {root.resolve()} or {root.resolve() / 'raw'}")
    created = [p for p in (root / known.folder / "raw", root / known.folder, root) if not p.exists()]
    try:
        import torchvision.datasets

        cls = getattr(torchvision.datasets, TORCHVISION_CLASSES[dataset])
        cls(str(root), train=True, download=True)
        cls(str(root), train=False, download=True)
    except Exception as exc:  # no network, read-only folder, ...
        for folder in created:  # leave nothing behind: the folders torchvision made for the download
            try:
                for partial in folder.glob("*.gz"):
                    partial.unlink()
                folder.rmdir()
            except OSError:
                pass
        raise DataError(
            f"{known.title} is not under {root.resolve()} (expected {known.folder}/raw/train-images-idx3-ubyte and the "
            f"three other IDX files) and downloading it failed ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:300]}). Point --data-dir or the {ENV_VAR} environment variable at a folder "
            f"that holds {known.folder}/raw/*-ubyte."
        ) from None


def _stats(images: torch.Tensor) -> tuple[float, float]:
    x = images.float().div_(255)
    return float(x.mean()), float(x.std())


def load_data(data_dir: str | os.PathLike | None = None, *, dataset: str = "mnist", with_test: bool = False,
              full_train: bool = False) -> Data:
    """A set from the data root: a 50,000/10,000 train/validation split (or all training images with
    `full_train`), the number of classes from the labels, normalisation statistics and every file's md5."""
    if dataset not in DATASETS:
        raise DataError(f"--dataset {dataset!r}: must be one of {', '.join(DATASETS)}")
    root = resolve_root(data_dir)
    folder = raw_dir(root, dataset)
    if not any(find_file(folder, name) for name in FILES):
        _download(root, dataset)
        folder = raw_dir(root, dataset)
    train_all, md5 = _load_raw(folder.resolve(), "train", dataset)
    classes = int(train_all.labels.max()) + 1
    if int(train_all.labels.min()) < 0 or classes < 2:
        raise DataError(f"{folder}: labels from {int(train_all.labels.min())} to {classes - 1}; expected 0 to at least 1")
    if full_train:
        train, val = train_all, Split(train_all.images[:0], train_all.labels[:0])
    else:
        if len(train_all) <= N_VAL:
            raise DataError(f"{folder}: {len(train_all):,} training images, more than the {N_VAL:,} held out for "
                            "validation are needed")
        order = torch.randperm(len(train_all), generator=torch.Generator().manual_seed(SPLIT_SEED))
        val_idx, train_idx = order[:N_VAL], order[N_VAL:]
        train = Split(train_all.images[train_idx], train_all.labels[train_idx])
        val = Split(train_all.images[val_idx], train_all.labels[val_idx])
    test = None
    if with_test:
        test, test_md5 = _load_raw(folder.resolve(), "test", dataset)
        md5 = {**md5, **test_md5}
        if int(test.labels.max()) >= classes:
            raise DataError(f"{folder}: test labels up to {int(test.labels.max())}, the training labels only to "
                            f"{classes - 1}")
    else:  # the test files' sums belong to the set's identity too: checked (once) without reading their data
        md5 = {**md5, **{name: check_file(require_file(folder, name), dataset) for name in FILES
                         if name.startswith("t10k")}}
    known = KNOWN.get(dataset)
    mean, std = known.stats if known and known.stats else _stats(train_all.images)
    return Data(train, val, test, folder, dataset, md5, classes, mean, std)


load_mnist = load_data  # the name from before other sets were read; MNIST unless dataset= says otherwise


def check_data_root(data_dir: str | os.PathLike | None = None, dataset: str = "mnist") -> Path:
    """Check the four files up front (for commands that refuse bad input before doing any work)."""
    if dataset not in DATASETS:
        raise DataError(f"--dataset {dataset!r}: must be one of {', '.join(DATASETS)}")
    root = resolve_root(data_dir)
    folder = raw_dir(root, dataset)
    if not any(find_file(folder, name) for name in FILES):
        return root  # absent: loading will try the download and explain if it fails
    for name in FILES:
        check_file(require_file(folder, name), dataset)
    return root

"""A 28x28 grey image set loaded from the data root: its folder found (or downloaded), its files checked, and the
fixed train/validation split made, with its classes and normalisation.

Sets (`--dataset`): `mnist` (the default), `fashion-mnist`, `kmnist`, and `idx`, any set in the same layout: four IDX
files (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, each
possibly gzipped), 28x28 uint8 images, integer labels. Where the data is found is one rule, here (`resolve_root`),
for the CLI, the Makefile and the benchmarks: `--data-dir`, else the environment variable BUDGETNAS_DATA, else the
first of `./data` and `../shared/datasets` that holds the set, looked for from the current folder and then from the
repository's (so `budgetnas` finds the set from any folder). A known set is looked for under the root in
torchvision's folder names (`MNIST/raw`, `FashionMNIST/raw`, `KMNIST/raw`), and `--data-dir` may also name that
folder or its `raw` folder, or the folder holding the files. Only when no place holds a file is torchvision's
download tried (known sets; search/download.py says when and for how long); an `idx` set without files gets the
exact names expected. Every file is checked (IDX header, counts, shape, size) and a known set's against its
published md5 sums; a broken file is named, never silently replaced. The test images are loaded only when asked for:
the search selects on the validation split, and only certification touches the test set.

The files themselves: search/idx_files.py; the known sets: search/known_sets.py. Their names stay importable here."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from search.download import download
from search.idx_files import FILES, SIDE, DataError, check_file, find_file, read_idx, require_file  # noqa: F401
from search.known_sets import (DATASETS, KNOWN, MEAN, MNIST_CLASSES, STD, TORCHVISION_CLASSES,  # noqa: F401
                               KnownSet)

ENV_VAR = "BUDGETNAS_DATA"
# Relative data roots, tried in order when neither --data-dir nor $BUDGETNAS_DATA names one: torchvision's usual
# folder, then where this project's machines keep MNIST (beside the repository). The first is where a download goes.
DEFAULT_ROOTS = ("data", "../shared/datasets")
REPOSITORY = Path(__file__).resolve().parent.parent  # the default roots are looked for from here after the cwd
DEFAULT_ROOT = ("the first of ./data and ../shared/datasets that holds the set, from the current folder, then from "
                "the repository's")  # the rule in words, for --help
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


def default_roots() -> list[Path]:
    """The default roots in the order they are tried: each of DEFAULT_ROOTS from the current folder, then from the
    repository's, each folder once."""
    roots: list[Path] = []
    for base in (Path.cwd(), REPOSITORY):
        for relative in DEFAULT_ROOTS:
            root = Path(os.path.normpath(base / relative))
            if root not in roots:
                roots.append(root)
    return roots


def _places(root: Path, dataset: str) -> list[Path]:
    """The folders under `root` that may hold the files: the root itself or its `raw` folder (--data-dir naming the
    set's folder or the files'), then the known set's folder under it."""
    known = KNOWN.get(dataset)
    return [root, root / "raw", *([root / known.folder / "raw", root / known.folder] if known else [])]


def _holds(folder: Path) -> bool:
    return any(find_file(folder, name) for name in FILES)


def resolve_root(data_dir: str | os.PathLike | None = None, dataset: str = "mnist") -> Path:
    """The data root: `data_dir`, else $BUDGETNAS_DATA, else the first default root that holds the set (the first
    default root when none does: where a download goes)."""
    given = data_dir or os.environ.get(ENV_VAR)
    if given:
        return Path(given).expanduser()
    roots = default_roots()
    return next((root for root in roots if any(map(_holds, _places(root, dataset)))), roots[0])


def raw_dir(root: Path, dataset: str = "mnist") -> Path:
    """The folder with the four files, whichever folder --data-dir names: the data root (`root/<Folder>/raw`), the
    set's folder (`root/raw`), or the folder holding the files; the known set's other places after that. When none
    holds a file, the folder the files are expected in (and downloaded to)."""
    known = KNOWN.get(dataset)
    folder = next((f for f in [*_places(root, dataset), *map(Path, known.also if known else ())] if _holds(f)), None)
    return folder or (root / known.folder / "raw" if known else root)


def _looked(data_dir: str | os.PathLike | None, known: KnownSet) -> str:
    """Every place the set was looked for, in words, for the message that says it was not found."""
    given = data_dir or os.environ.get(ENV_VAR)
    source = " (--data-dir)" if data_dir else f" (${ENV_VAR})" if given else ""
    roots = [resolve_root(data_dir, known.name)] if given else default_roots()
    places = [f"{root.absolute()}{source}" for root in roots] + list(known.also)
    return (f"{', '.join(places)} for {known.folder}/raw/train-images-idx3-ubyte and the three other IDX files (each "
            "may be gzipped, and may lie in the named folder itself)")


def locate(data_dir: str | os.PathLike | None = None, dataset: str = "mnist") -> Path:
    """The folder holding the set's files by the rule; when no place holds one, a known set is downloaded (if that
    can work) and an absent one is one DataError line naming every place looked and how to point at the data."""
    if dataset not in DATASETS:
        raise DataError(f"--dataset {dataset!r}: must be one of {', '.join(DATASETS)}")
    root = resolve_root(data_dir, dataset)
    folder = raw_dir(root, dataset)
    if _holds(folder):
        return folder
    known = KNOWN.get(dataset)
    if known is None:
        raise DataError(f"no IDX set under {root.absolute()}: expected the four files {', '.join(FILES)} (each may be "
                        f"gzipped) in {root.absolute()} or {root.absolute() / 'raw'}")
    download(root, known, _looked(data_dir, known),
             f"Point --data-dir or ${ENV_VAR} at the folder that holds {known.folder}/raw/*-ubyte.")
    return raw_dir(root, dataset)


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


def _stats(images: torch.Tensor) -> tuple[float, float]:
    x = images.float().div_(255)
    return float(x.mean()), float(x.std())


def load_data(data_dir: str | os.PathLike | None = None, *, dataset: str = "mnist", with_test: bool = False,
              full_train: bool = False) -> Data:
    """A set from the data root: a 50,000/10,000 train/validation split (or all training images with
    `full_train`), the number of classes from the labels, normalisation statistics and every file's md5."""
    folder = locate(data_dir, dataset)
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


def check_data_root(data_dir: str | os.PathLike | None = None, dataset: str = "mnist", *,
                    recompute_md5: bool = False) -> Path:
    """Find the set (downloading it if it is absent and that can work) and check its four files up front, for
    commands that refuse bad input before doing any work; `recompute_md5` computes every md5 now instead of using
    sums remembered from an earlier check of the same unchanged files. Returns the folder holding the files."""
    folder = locate(data_dir, dataset)
    for name in FILES:
        check_file(require_file(folder, name), dataset, recompute=recompute_md5)
    return folder

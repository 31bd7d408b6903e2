"""28x28 grey image sets as uint8 tensors: a checked IDX reader, the known sets' published checksums, and the fixed
train/validation split.

Sets (`--dataset`): `mnist` (the default), `fashion-mnist`, `kmnist`, and `idx`, any set in the same layout: four IDX
files (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, each
possibly gzipped), 28x28 uint8 images, integer labels. The data root comes from `--data-dir`, else the environment
variable BUDGETNAS_DATA, else `./data`; a known set is looked for under the root in torchvision's folder names
(`MNIST/raw`, `FashionMNIST/raw`, `KMNIST/raw`), and `--data-dir` may also name that folder or its `raw` folder, or
the folder holding the files. Only when all four files are absent is torchvision's download tried (known sets); an
`idx` set without files gets the exact names expected. Every file is checked (IDX header, counts, shape, size) and
a known set's against its published md5 sums; a broken file is named, never silently replaced. The test images are
loaded only when asked for: the search selects on the validation split, and only certification touches the test set.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from search.fsio import atomic_write_text

ENV_VAR = "BUDGETNAS_DATA"
DEFAULT_ROOT = "./data"
MNIST_CLASSES = 10  # digits 0-9: a network must output this many logits
N_VAL = 10_000  # held out from the 60,000 training images for model selection
SPLIT_SEED = 20_000  # fixed: every trial and every study sees the same validation images
MEAN, STD = 0.1307, 0.3081  # of MNIST's 60,000 training pixels scaled to [0, 1] (published; other sets: computed)
SIDE = 28  # pixels

# name: (IDX magic, items in MNIST-sized sets, bytes uncompressed in MNIST-sized sets)
FILES = {
    "train-images-idx3-ubyte": (2051, 60_000, 47_040_016),
    "train-labels-idx1-ubyte": (2049, 60_000, 60_008),
    "t10k-images-idx3-ubyte": (2051, 10_000, 7_840_016),
    "t10k-labels-idx1-ubyte": (2049, 10_000, 10_008),
}


@dataclass(frozen=True)
class KnownSet:
    name: str  # --dataset
    title: str
    folder: str  # torchvision's folder under the data root
    md5: dict[str, str]  # of the uncompressed files, as published
    gz_md5: dict[str, str]  # of the .gz files, as published (torchvision's resources)
    stats: tuple[float, float] | None = None  # fixed normalisation; None: computed from the training images
    target: float | None = None  # the default target accuracy (fraction); None: the user gives one
    also: tuple[str, ...] = ()  # other folders searched when the root holds none (a Debian package's)


KNOWN: dict[str, KnownSet] = {s.name: s for s in (
    KnownSet("mnist", "MNIST", "MNIST",
             {"train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
              "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
              "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
              "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637"},
             {"train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
              "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
              "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
              "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c"},
             stats=(MEAN, STD), target=0.994),
    KnownSet("fashion-mnist", "Fashion-MNIST", "FashionMNIST",
             {"train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
              "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
              "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
              "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965"},
             {"train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
              "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
              "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
              "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310"},
             also=("/usr/share/datasets/fashion-mnist",)),  # Debian's dataset-fashion-mnist
    KnownSet("kmnist", "Kuzushiji-MNIST", "KMNIST",
             {},  # the uncompressed files' sums are not published: the .gz files' are
             {"train-images-idx3-ubyte": "bdb82020997e1d708af4cf47b453dcf7",
              "train-labels-idx1-ubyte": "e144d726b3acfaa3e44228e80efcd344",
              "t10k-images-idx3-ubyte": "5c965bf0a639b31b8f53240b1b52f4d7",
              "t10k-labels-idx1-ubyte": "7320c461ea6c1c855c0b718fb2a4b134"}),
)}
DATASETS = (*KNOWN, "idx")
TORCHVISION_CLASSES = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "kmnist": "KMNIST"}


class DataError(RuntimeError):
    """A data set that could not be found, read or downloaded; the message says which file and what to do."""


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


def _present(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def raw_dir(root: Path, dataset: str = "mnist") -> Path:
    """The folder with the four files, whichever folder --data-dir names: the data root (`root/<Folder>/raw`), the
    set's folder (`root/raw`), or the folder holding the files; the known set's other places after that. When none
    holds a file, the folder the files are expected in (and downloaded to)."""
    known = KNOWN.get(dataset)
    candidates = [root, root / "raw"]
    if known:
        candidates += [root / known.folder / "raw", root / known.folder, *map(Path, known.also)]
    for folder in candidates:
        if any(_present(folder, name) for name in FILES):
            return folder
    return root / known.folder / "raw" if known else root


def _file(folder: Path, name: str) -> Path:
    path = _present(folder, name)
    if path is None:
        raise DataError(f"{folder / name}: missing (or {name}.gz); the four files are {', '.join(FILES)}")
    return path


# ---- md5 sums, verified once per file ------------------------------------------------------------------------------

# md5 sums verified once per file and remembered across commands (a stamp per file: path, size and modification
# time), in the user's cache, never beside the data (which may be read-only or shared).
STAMPS = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "budgetnas" / "verified-md5.json"


def _stamp(path: Path, size: int, mtime_ns: int) -> str:
    return f"{path.resolve()}|{size}|{mtime_ns}"


def _remembered(path: Path, size: int, mtime_ns: int) -> str | None:
    try:
        return json.loads(STAMPS.read_text()).get(_stamp(path, size, mtime_ns))
    except (OSError, ValueError):
        return None


def _remember(path: Path, size: int, mtime_ns: int, md5: str) -> None:
    try:
        known = json.loads(STAMPS.read_text()) if STAMPS.exists() else {}
        known[_stamp(path, size, mtime_ns)] = md5
        atomic_write_text(STAMPS, json.dumps(known, indent=1))
    except (OSError, ValueError):
        pass  # a cache: without it, the next command checks the md5 again


def _md5(path: Path, as_stored: bool = False) -> str:
    """md5 of the file's content, uncompressed (a .gz file read through gzip), or of its bytes as stored."""
    digest = hashlib.md5()
    with (gzip.open(path, "rb") if path.suffix == ".gz" and not as_stored else path.open("rb")) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _header(path: Path) -> bytes:
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")) as f:
            return f.read(16)
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from None


def _which_known(name: str, digest: str) -> str | None:
    return next((s.title for s in KNOWN.values() if s.md5.get(name) == digest), None)


def check_file(path: Path, dataset: str = "mnist") -> str:
    """Check one file's header, counts, shape, size and (known sets) md5; return the md5 of its content. Raises
    DataError naming the file and what is wrong."""
    if not path.is_file():
        raise DataError(f"{path}: missing")
    stat = path.stat()
    return _check_file(path, stat.st_size, stat.st_mtime_ns, dataset)


@functools.lru_cache(maxsize=32)
def _check_file(path: Path, actual: int, mtime_ns: int, dataset: str) -> str:
    """Keyed by size and mtime: an unchanged file is read once per process, its md5 once per machine."""
    name = path.name.removesuffix(".gz")
    magic, items, size = FILES[name]
    header = _header(path)
    dims = 3 if "images" in name else 1
    if len(header) < 4 + 4 * dims:
        raise DataError(f"{path}: truncated, too short for an IDX header")
    got_magic = int.from_bytes(header[:4], "big")
    if got_magic != magic:
        raise DataError(f"{path}: not an IDX file of this kind: magic number {got_magic}, expected {magic}")
    shape = [int.from_bytes(header[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    if dims == 3 and shape[1:] != [SIDE, SIDE]:
        raise DataError(f"{path}: images of {shape[1]}x{shape[2]} pixels, expected {SIDE}x{SIDE}")
    known = KNOWN.get(dataset)
    if known is not None and shape[0] != items:
        raise DataError(f"{path}: header says {shape[0]:,} items, expected {items:,}")
    if path.suffix != ".gz" and known is not None and actual != size:
        raise DataError(f"{path}: {actual:,} bytes, expected {size:,}: the file is truncated or padded")
    remembered = _remembered(path, actual, mtime_ns)  # the content's md5, read before: not read again
    digest = remembered or _md5(path)
    if known is not None:
        expected = known.md5.get(name)
        if expected is None and path.suffix == ".gz" and remembered is None:  # only .gz sums published (KMNIST)
            expected_gz, got_gz = known.gz_md5.get(name), _md5(path, as_stored=True)
            if expected_gz and got_gz != expected_gz:
                raise DataError(f"{path}: md5 {got_gz} does not match the published {expected_gz}: not {known.title}'s"
                                " file, or corrupted")
        elif expected is not None and digest != expected:
            other = _which_known(name, digest)
            if other and other != known.title:
                raise DataError(f"{path}: these are {other}'s files, not {known.title}'s; give --dataset "
                                f"{next(s.name for s in KNOWN.values() if s.title == other)}")
            raise DataError(f"{path}: md5 {digest} does not match the published {expected}: the file is corrupted")
    if remembered is None:
        _remember(path, actual, mtime_ns, digest)
    return digest


def _read_idx(path: Path) -> torch.Tensor:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    body = raw[4 + 4 * dims:]
    expected = 1
    for n in shape:
        expected *= n
    if len(body) != expected:
        raise DataError(f"{path}: {len(body):,} bytes of data, the header's {shape} needs {expected:,}")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).view(*shape)


@functools.lru_cache(maxsize=8)
def _load_raw(folder: Path, part: str, dataset: str) -> tuple[Split, dict[str, str]]:
    prefix = "train" if part == "train" else "t10k"
    paths = [_file(folder, f"{prefix}-images-idx3-ubyte"), _file(folder, f"{prefix}-labels-idx1-ubyte")]
    md5 = {p.name.removesuffix(".gz"): check_file(p, dataset) for p in paths}
    images, labels = _read_idx(paths[0]), _read_idx(paths[1]).long()
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
    if not any(_present(folder, name) for name in FILES):
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
        md5 = {**md5, **{name: check_file(_file(folder, name), dataset) for name in FILES if name.startswith("t10k")}}
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
    if not any(_present(folder, name) for name in FILES):
        return root  # absent: loading will try the download and explain if it fails
    for name in FILES:
        check_file(_file(folder, name), dataset)
    return root

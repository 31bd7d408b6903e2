"""The known 28x28 grey image sets (`--dataset`): their folders under the data root, their published md5 sums and
MNIST's published normalisation; `idx` names any other set in the same layout."""

from __future__ import annotations

from dataclasses import dataclass

MNIST_CLASSES = 10  # digits 0-9: a network must output this many logits
MEAN, STD = 0.1307, 0.3081  # of MNIST's 60,000 training pixels scaled to [0, 1] (published; other sets: computed)


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

"""Shared fixtures: the MNIST data root, found by the CLI's rule (search/data.py: $BUDGETNAS_DATA, else ./data or
../shared/datasets)."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from search.data import resolve_root  # noqa: E402  (after the path above)

DATA_ROOT = resolve_root()


@pytest.fixture(autouse=True)
def process_settings_restored():
    """Each test leaves torch's process-wide settings as it found them (thread count, default dtype, grad mode), so
    that no result depends on the order tests run in."""
    import torch

    threads, dtype, grad = torch.get_num_threads(), torch.get_default_dtype(), torch.is_grad_enabled()
    yield
    torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)
    torch.set_grad_enabled(grad)


@pytest.fixture
def float64():
    """Within the test, new tensors and modules are float64: two paths that run the same ops then agree to about
    1e-15 on any CPU, so an equivalence test can use a tight tolerance that float32's summation order would break."""
    import torch

    torch.set_default_dtype(torch.float64)
    yield torch.float64  # process_settings_restored puts float32 back


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not (DATA_ROOT / "MNIST" / "raw" / "train-images-idx3-ubyte").exists():
        pytest.fail(f"MNIST not found under {DATA_ROOT}: set BUDGETNAS_DATA to a folder holding MNIST/raw/*-ubyte")
    return DATA_ROOT


@pytest.fixture
def mnist_copy(data_root, tmp_path) -> Path:
    """A writable copy of the data root, to damage: returns the folder holding MNIST/raw."""
    import shutil

    raw = tmp_path / "copy" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in (data_root / "MNIST" / "raw").glob("*-ubyte"):
        shutil.copy(f, raw / f.name)
    return tmp_path / "copy"


@pytest.fixture(scope="session")
def mnist(data_root):
    from search.data import load_mnist

    return load_mnist(data_root)

"""MNIST loading: the checked reader, the fixed split, and clear errors for missing or broken files."""

import pytest
import torch

from search.data import DataError, check_data_root, load_data


def test_split_is_fixed_and_disjoint(mnist, data_root):
    assert len(mnist.train) == 50_000 and len(mnist.val) == 10_000 and mnist.test is None
    assert mnist.train.images.dtype == torch.uint8 and mnist.train.images.shape[1:] == (28, 28)
    again = load_data(data_root)
    assert torch.equal(again.val.labels, mnist.val.labels)
    # no image of the validation split is in the training split (compare by row hashes of a sample)
    train_rows = {bytes(r.numpy()) for r in mnist.train.images[:50_000].flatten(1)}
    assert sum(bytes(r.numpy()) in train_rows for r in mnist.val.images[:500].flatten(1)) <= 2  # MNIST has a few exact duplicates


def test_test_set_only_when_asked_for(data_root):
    full = load_data(data_root, with_test=True, full_train=True)
    assert len(full.train) == 60_000 and len(full.test) == 10_000 and len(full.val) == 0


def test_env_var_gives_the_root(monkeypatch, data_root):
    monkeypatch.setenv("BUDGETNAS_DATA", str(data_root))
    assert load_data().root == data_root / "MNIST" / "raw"  # the folder holding the four files


def test_truncated_file_is_named(mnist_copy):
    raw = mnist_copy / "MNIST" / "raw"
    with open(raw / "train-labels-idx1-ubyte", "r+b") as f:
        f.truncate(30_000)
    with pytest.raises(DataError) as info:
        check_data_root(mnist_copy)
    assert "train-labels-idx1-ubyte: 30,000 bytes, expected 60,008" in str(info.value)


def test_corrupted_file_is_named(mnist_copy):
    raw = mnist_copy / "MNIST" / "raw"
    with open(raw / "t10k-labels-idx1-ubyte", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))  # flip one label byte
    with pytest.raises(DataError) as info:
        check_data_root(mnist_copy)
    assert "t10k-labels-idx1-ubyte: md5" in str(info.value) and "corrupted" in str(info.value)


def test_wrong_header_is_named(mnist_copy):
    raw = mnist_copy / "MNIST" / "raw"
    with open(raw / "train-images-idx3-ubyte", "r+b") as f:
        f.write((1234).to_bytes(4, "big"))
    with pytest.raises(DataError, match="train-images-idx3-ubyte: not an IDX file of this kind: magic number 1234"):
        check_data_root(mnist_copy)


def test_missing_root_with_failed_download_says_what_to_do(tmp_path, monkeypatch):
    class Offline:
        def __init__(self, *a, **k):
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "MNIST", Offline)
    with pytest.raises(DataError) as info:
        load_data(tmp_path / "nowhere")
    message = str(info.value)
    assert "downloading it failed" in message and "--data-dir" in message and "BUDGETNAS_DATA" in message


def test_data_dir_may_name_the_root_the_mnist_folder_or_the_raw_folder(data_root):
    from typer.testing import CliRunner

    from cli import app

    for folder in (data_root, data_root / "MNIST", data_root / "MNIST" / "raw"):
        out = CliRunner().invoke(app, ["data", "--data-dir", str(folder)])
        assert out.exit_code == 0 and "all four files match the published md5 sums" in out.output, (folder, out.output)


def test_md5_is_read_once_per_file_and_again_when_the_file_changes(mnist_copy, tmp_path, monkeypatch):
    from search import idx_files as data

    monkeypatch.setattr(data, "STAMPS", tmp_path / "cache" / "verified-md5.json")
    reads = []
    real_md5 = data._md5
    monkeypatch.setattr(data, "_md5", lambda path: reads.append(path.name) or real_md5(path))
    data._check_file.cache_clear()
    check_data_root(mnist_copy)
    assert sorted(reads) == sorted(data.FILES)
    data._check_file.cache_clear()  # a new command: the process cache is gone, the stamps are not
    check_data_root(mnist_copy)
    assert len(reads) == 4
    labels = mnist_copy / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    with open(labels, "r+b") as f:  # damaged in place, same size: a new modification time, so read again
        f.seek(100)
        old = f.read(1)[0]
        f.seek(100)
        f.write(bytes([(old + 1) % 10]))  # another label
    data._check_file.cache_clear()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte: md5"):
        check_data_root(mnist_copy)

"""MNIST loading: the checked reader, the fixed split, and clear errors for missing or broken files."""

import json
import os
import re
from pathlib import Path

import pytest
import torch

from search.data import FILES, DataError, check_data_root, load_data


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
        mirrors = ["https://example.invalid/mnist/"]

        def __init__(self, *a, **k):
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    import torchvision.datasets

    from search import download

    monkeypatch.setattr(download, "_unreachable", lambda url: None)  # a mirror answers: torchvision's download runs
    monkeypatch.setattr(torchvision.datasets, "MNIST", Offline)
    with pytest.raises(DataError) as info:
        load_data(tmp_path / "nowhere")
    message = str(info.value)
    assert f"looked in {tmp_path / 'nowhere'} (--data-dir)" in message
    assert re.search(r"download from https://example.invalid/mnist/ failed after \d+\.\d s: RuntimeError: Error "
                     r"downloading train-images-idx3-ubyte.gz\. Point --data-dir or \$BUDGETNAS_DATA", message)
    assert not (tmp_path / "nowhere").exists()  # the folders the download made are removed


def symlinked_set(data_root: Path, root: Path) -> Path:
    """`root`/MNIST/raw holding links to the four files (no 60 MB copy); returns `root`."""
    (root / "MNIST" / "raw").mkdir(parents=True)
    for name in FILES:
        (root / "MNIST" / "raw" / name).symlink_to(data_root / "MNIST" / "raw" / name)
    return root


@pytest.fixture
def places(tmp_path, monkeypatch):
    """A current folder (work/cwd) and a repository (repo) under tmp_path, neither holding a set yet, and no
    $BUDGETNAS_DATA: the default search order's four places are cwd/data, work/shared/datasets, repo/data and
    shared/datasets (beside repo)."""
    from search import data

    cwd, repo = tmp_path / "work" / "cwd", tmp_path / "repo"
    cwd.mkdir(parents=True), repo.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("BUDGETNAS_DATA", raising=False)
    monkeypatch.setattr(data, "REPOSITORY", repo)
    return tmp_path


def test_the_default_search_order(places, data_root, monkeypatch):
    from search.data import default_roots, resolve_root

    cwd_data, cwd_shared = places / "work" / "cwd" / "data", places / "work" / "shared" / "datasets"
    repo_data, repo_shared = places / "repo" / "data", places / "shared" / "datasets"
    assert default_roots() == [cwd_data, cwd_shared, repo_data, repo_shared]
    assert resolve_root() == cwd_data  # none holds the set: the first, where a download goes
    symlinked_set(data_root, repo_shared)
    assert load_data().root == repo_shared / "MNIST" / "raw"  # from any folder: the repository's places
    symlinked_set(data_root, repo_data)
    assert resolve_root() == repo_data
    symlinked_set(data_root, cwd_shared)
    assert resolve_root() == cwd_shared  # the current folder's places before the repository's
    symlinked_set(data_root, cwd_data)
    assert load_data().root == cwd_data / "MNIST" / "raw"  # ./data first
    monkeypatch.setenv("BUDGETNAS_DATA", str(repo_shared))
    assert load_data().root == repo_shared / "MNIST" / "raw"  # $BUDGETNAS_DATA over the defaults
    assert load_data(repo_data).root == repo_data / "MNIST" / "raw"  # --data-dir over $BUDGETNAS_DATA


def test_a_missing_set_is_one_line_naming_every_place_looked_and_exit_2(places, monkeypatch):
    from typer.testing import CliRunner

    from cli import app
    from search import download

    monkeypatch.setattr(download, "_unreachable", lambda url: f"cannot reach {url} (test: offline)")
    out = CliRunner().invoke(app, ["data"])
    assert out.exit_code == 2 and len(out.output.strip().splitlines()) == 1, out.output
    assert "Traceback" not in out.output and out.output.startswith("error: MNIST not found: looked in ")
    for place in ("work/cwd/data", "work/shared/datasets", "repo/data", "shared/datasets"):
        assert str(places / place) in out.output
    assert re.search(r"download from \S+ or \S+ failed after \d+\.\d s: cannot reach \S+ \(test: offline\)", out.output)
    assert "Point --data-dir or $BUDGETNAS_DATA at the folder that holds MNIST/raw/*-ubyte." in out.output
    assert not (places / "work" / "cwd" / "data").exists()  # nothing made where the download would have gone


def test_no_download_is_tried_where_it_cannot_write(tmp_path, monkeypatch):
    import torchvision.datasets

    calls = []
    monkeypatch.setattr(torchvision.datasets.MNIST, "download", lambda self: calls.append(self))
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(DataError, match=f"download not tried: {tmp_path / 'a-file'} is not a writable folder"):
        load_data(tmp_path / "a-file" / "root")
    assert calls == []


def test_a_mirror_that_does_not_answer_is_given_up_on_in_the_probe_time(monkeypatch):
    import threading
    import time

    from search import download

    monkeypatch.setattr(download, "DOWNLOAD_PROBE_S", 0.2)
    released = threading.Event()  # the mirror hangs until the test has its answer

    def hung_lookup(*args, **kwargs):
        released.wait(30)
        raise OSError("answered too late")

    monkeypatch.setattr(download.socket, "create_connection", hung_lookup)
    start = time.perf_counter()
    try:
        why = download._unreachable("https://example.invalid/mnist/")
    finally:
        released.set()
    assert why == "example.invalid:443 did not answer within 0.2 s" and time.perf_counter() - start < 1


def test_data_dir_may_name_the_root_the_mnist_folder_or_the_raw_folder(data_root):
    from typer.testing import CliRunner

    from cli import app

    for folder in (data_root, data_root / "MNIST", data_root / "MNIST" / "raw"):
        out = CliRunner().invoke(app, ["data", "--data-dir", str(folder)])
        assert out.exit_code == 0, (folder, out.output)
        assert "the md5 sums of all four files, computed now, match the published ones" in out.output


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


def test_data_computes_every_md5_now_and_the_cache_sees_a_flipped_byte_behind_a_restored_mtime(mnist_copy, tmp_path,
                                                                                                monkeypatch):
    from typer.testing import CliRunner

    from cli import app

    from search import idx_files

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the user's own cache untouched
    reads, real_md5 = [], idx_files._md5
    monkeypatch.setattr(idx_files, "_md5", lambda path: reads.append(path.name) or real_md5(path))
    for run in (1, 2):  # the second run finds all four sums remembered, and computes them again all the same
        out = CliRunner().invoke(app, ["data", "--data-dir", str(mnist_copy)])
        assert out.exit_code == 0 and "computed now, match the published ones" in out.output, out.output
        assert sorted(reads) == sorted(list(FILES) * run)
    assert len(json.loads((tmp_path / "cache" / "budgetnas" / "verified-md5.json").read_text())) == 4
    labels = mnist_copy / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    before = labels.stat()
    with open(labels, "r+b") as f:  # one label byte flipped in place: same size
        f.seek(100)
        old = f.read(1)[0]
        f.seek(100)
        f.write(bytes([old ^ 0x01]))
    os.utime(labels, ns=(before.st_atime_ns, before.st_mtime_ns))  # and the modification time put back
    assert labels.stat().st_mtime_ns == before.st_mtime_ns and labels.stat().st_size == before.st_size
    again = CliRunner().invoke(app, ["data", "--data-dir", str(mnist_copy)])
    assert again.exit_code == 2 and len(again.output.strip().splitlines()) == 1, again.output
    assert f"{labels}: md5 " in again.output and "(computed now) does not match the published" in again.output
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte: md5 [0-9a-f]{32} \\(computed now\\)"):
        check_data_root(mnist_copy)  # the other commands' path, which may use the cache: its stamp has changed


def test_the_makefile_leaves_the_data_to_the_clis_rule_unless_data_is_given():
    import shutil
    import subprocess

    from conftest import ROOT

    if shutil.which("make") is None:
        pytest.skip("no make")
    # Under `make test DATA=...` (as .ci/run calls it) the parent make passes DATA on through MAKEFLAGS: drop it.
    env = {k: v for k, v in os.environ.items()
           if k not in ("BUDGETNAS_DATA", "DATA", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    plain = subprocess.run(["make", "-n", "search", "best", "test"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=60).stdout
    assert "cli.py search --trials 50" in plain and "--data-dir" not in plain and "BUDGETNAS_DATA" not in plain
    given = subprocess.run(["make", "-n", "search", "test", "DATA=/some/root"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=60).stdout
    assert "--data-dir /some/root" in given and "BUDGETNAS_DATA=/some/root" in given

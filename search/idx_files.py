"""IDX files: found in a folder (each possibly gzipped), checked (header, counts, shape, size and, for a known set,
the published md5) and read as uint8 tensors. A broken file is named, never silently replaced. An md5 is computed
once per file and remembered across commands, keyed by the file's path, size, modification time, inode change time
and inode number (a write changes the change time, and os.utime cannot set it back); `recompute=True` computes it
again regardless, and every message that gives an md5 says whether it was computed now or remembered."""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
from pathlib import Path

import torch

from search.fsio import atomic_write_text
from search.known_sets import KNOWN

SIDE = 28  # pixels

# name: (IDX magic, items in MNIST-sized sets, bytes uncompressed in MNIST-sized sets)
FILES = {
    "train-images-idx3-ubyte": (2051, 60_000, 47_040_016),
    "train-labels-idx1-ubyte": (2049, 60_000, 60_008),
    "t10k-images-idx3-ubyte": (2051, 10_000, 7_840_016),
    "t10k-labels-idx1-ubyte": (2049, 10_000, 10_008),
}


class DataError(RuntimeError):
    """A data set that could not be found, read or downloaded; the message says which file and what to do."""


def find_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def require_file(folder: Path, name: str) -> Path:
    path = find_file(folder, name)
    if path is None:
        raise DataError(f"{folder / name}: missing (or {name}.gz); the four files are {', '.join(FILES)}")
    return path


# ---- md5 sums, verified once per file ------------------------------------------------------------------------------

# md5 sums verified once per file and remembered across commands, in the user's cache, never beside the data (which
# may be read-only or shared). None: $XDG_CACHE_HOME (else ~/.cache)/budgetnas/verified-md5.json, read at each use.
STAMPS: Path | None = None


def _stamps() -> Path:
    return STAMPS or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "budgetnas" / "verified-md5.json"


def _stamp(path: Path, stat: os.stat_result) -> str:
    """What identifies one state of a file: path, size in bytes, modification and inode change times in ns (the
    change time moves on any write, and os.utime cannot restore it), inode number (another file put in its place)."""
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}|{stat.st_ino}"


def _remembered(stamp: str) -> str | None:
    try:
        return json.loads(_stamps().read_text()).get(stamp)
    except (OSError, ValueError):
        return None


def _remember(stamp: str, md5: str) -> None:
    try:
        stamps = _stamps()
        known = json.loads(stamps.read_text()) if stamps.exists() else {}
        path = stamp.rsplit("|", 4)[0]
        known = {k: v for k, v in known.items() if k.rsplit("|", 4)[0] != path}  # the file's earlier states: stale
        known[stamp] = md5
        atomic_write_text(stamps, json.dumps(known, indent=1))
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


def check_file(path: Path, dataset: str = "mnist", *, recompute: bool = False) -> str:
    """Check one file's header, counts, shape, size and (known sets) md5; return the md5 of its content, computed
    now with `recompute`, else remembered when the file is unchanged since it was last computed. Raises DataError
    naming the file and what is wrong."""
    if not path.is_file():
        raise DataError(f"{path}: missing")
    stat = path.stat()
    check = _verify if recompute else _check_file  # recompute: not even this process's earlier result is used
    return check(path, _stamp(path, stat), stat.st_size, dataset, recompute)


def _check_header(path: Path, actual: int, dataset: str) -> None:
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


def _verify(path: Path, stamp: str, actual: int, dataset: str, recompute: bool) -> str:
    """The header checks, then the md5: remembered by the stamp (an unchanged file's md5 is computed once per
    machine) unless `recompute`."""
    _check_header(path, actual, dataset)
    name = path.name.removesuffix(".gz")
    remembered = None if recompute else _remembered(stamp)  # the content's md5, computed before: not read again
    digest = remembered or _md5(path)
    how = "remembered from an earlier check of this unchanged file" if remembered else "computed now"
    known = KNOWN.get(dataset)
    if known is not None:
        expected = known.md5.get(name)
        if expected is None and path.suffix == ".gz" and remembered is None:  # only .gz sums published (KMNIST)
            expected_gz, got_gz = known.gz_md5.get(name), _md5(path, as_stored=True)
            if expected_gz and got_gz != expected_gz:
                raise DataError(f"{path}: md5 {got_gz} (computed now) does not match the published {expected_gz}: "
                                f"not {known.title}'s file, or corrupted")
        elif expected is not None and digest != expected:
            other = _which_known(name, digest)
            if other and other != known.title:
                raise DataError(f"{path}: these are {other}'s files, not {known.title}'s; give --dataset "
                                f"{next(s.name for s in KNOWN.values() if s.title == other)}")
            raise DataError(f"{path}: md5 {digest} ({how}) does not match the published {expected}: the file is "
                            "corrupted")
    if remembered is None:
        _remember(stamp, digest)
    return digest


_check_file = functools.lru_cache(maxsize=32)(_verify)  # keyed by the stamp: an unchanged file read once per process


def read_idx(path: Path) -> torch.Tensor:
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

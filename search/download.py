"""torchvision's download of a known set, tried only when it can work and bounded in time.

It is tried only when the folder it would write to can be written and one of the set's mirrors answers a TCP
connection within DOWNLOAD_PROBE_S; while it runs, no socket operation may stall longer than DOWNLOAD_STALL_S. A
failure says how long it waited and why, and leaves behind nothing the download made.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from search.idx_files import DataError
from search.known_sets import TORCHVISION_CLASSES, KnownSet

DOWNLOAD_PROBE_S = 3.0  # seconds a mirror has to accept a connection (name lookup included) before none is tried
DOWNLOAD_STALL_S = 10.0  # seconds any one connect or read of the download may wait for the network


def _unreachable(url: str) -> str | None:
    """None when `url`'s host accepts a TCP connection within DOWNLOAD_PROBE_S, else why not. The lookup and connect
    run in a daemon thread: a name lookup ignores socket timeouts and can hang far longer."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((parts.hostname, port), timeout=DOWNLOAD_PROBE_S).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(f"{type(exc).__name__}: {exc}")

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(DOWNLOAD_PROBE_S)
    if not outcome:
        return f"{parts.hostname}:{port} did not answer within {DOWNLOAD_PROBE_S:g} s"
    return outcome[0] and f"cannot reach {parts.hostname}:{port} ({outcome[0]})"


def _unwritable(root: Path) -> str | None:
    """Why the download could not write under `root` (its nearest existing folder not writable), or None."""
    existing = next((p for p in (root.absolute(), *root.absolute().parents) if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing or root} is not a writable folder"
    return None


def _torchvision_class(known: KnownSet):
    import torchvision.datasets

    return getattr(torchvision.datasets, TORCHVISION_CLASSES[known.name])


def _torchvision_download(root: Path, known: KnownSet) -> None:
    cls = _torchvision_class(known)
    stall = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_STALL_S)  # torchvision's urlopen takes no timeout: it uses this default
    try:
        cls(str(root), train=True, download=True)
        cls(str(root), train=False, download=True)
    finally:
        socket.setdefaulttimeout(stall)


def _remove_partial(folders: list[Path]) -> None:
    for folder in folders:  # the folders the download made, with what it left in them
        try:
            for partial in folder.glob("*.gz"):
                partial.unlink()
            folder.rmdir()
        except OSError:
            pass


def download(root: Path, known: KnownSet, looked: str, advice: str) -> None:
    """Download `known` under `root` (torchvision's layout), or raise one DataError line: where the set was looked
    for (`looked`), what the download did and after how long, and `advice`."""
    unwritable = _unwritable(root)
    if unwritable:
        raise DataError(f"{known.title} not found: looked in {looked}; download not tried: {unwritable}. {advice}")
    mirrors = list(_torchvision_class(known).mirrors)
    start = time.perf_counter()
    problems = []
    for mirror in mirrors:  # torchvision tries them in this order; one that answers is enough
        problems.append(_unreachable(mirror))
        if problems[-1] is None:
            break
    why = problems[0] if None not in problems else None
    if why is None:
        created = [p for p in (root / known.folder / "raw", root / known.folder, root) if not p.exists()]
        try:
            _torchvision_download(root, known)
            return
        except Exception as exc:  # network, disk, a mirror's bad file: all reported the same way
            _remove_partial(created)
            why = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    raise DataError(f"{known.title} not found: looked in {looked}; download from {' or '.join(mirrors)} failed after "
                    f"{time.perf_counter() - start:.1f} s: {why}. {advice}")

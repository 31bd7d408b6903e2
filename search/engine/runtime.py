"""Process-wide settings of the engine, each done in this one place: CPU threads, glibc's malloc thresholds,
cuDNN's kernel search, bfloat16 autocast, and the lock and save-and-restore around a CUDA graph capture.

Why each exists, with the measurements behind it, is in docs/engine.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import threading

import torch
from torch import nn

from search.engine.config import PRECISIONS

CAPTURE_LOCK = threading.Lock()  # one CUDA graph capture at a time in this process
_allocator_tuned = False
_cudnn_benchmark_set = False


class CaptureFailed(Exception):
    """torch refused to capture a CUDA graph of the step; the fit goes on uncaptured and records this text."""


def configure(device: torch.device, graphs: bool) -> None:
    """What a fit changes outside its model, each once per process: malloc on a CPU, cuDNN's benchmark mode for the
    first fit with CUDA graphs (later fits find it set; one that turns it off again is left alone)."""
    global _cudnn_benchmark_set
    if device.type == "cpu":
        tune_cpu_allocator()
    if graphs and not _cudnn_benchmark_set:
        _cudnn_benchmark_set = True
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels once


def set_cpu_threads(threads: int | None, jobs: int = 1) -> int:
    """torch's intra-op threads for this process: `threads`, else cores / jobs. Parallel trials x threads must stay
    within the cores, or they thrash."""
    n = threads or max(1, (os.cpu_count() or 1) // jobs)
    torch.set_num_threads(n)
    return n


@functools.cache
def cpu_fields() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo ("model name", "cpu family", "flags", ...), read once per
    process; {} where there is no such file."""
    try:
        with open("/proc/cpuinfo") as info:
            return cpuinfo_fields(info.read(1 << 16))  # the first processor's block is a few kB
    except OSError:
        return {}


def cpuinfo_fields(text: str) -> dict[str, str]:
    """The fields of the first processor's block of a /proc/cpuinfo text (blocks are parted by a blank line)."""
    fields: dict[str, str] = {}
    for line in text.split("\n\n")[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 dot products in hardware (AVX512-BF16 or AMX), from /proc/cpuinfo."""
    return flags_have_native_bf16("flags: " + cpu_fields().get("flags", ""))


def flags_have_native_bf16(flags_line: str) -> bool:
    """Whether a /proc/cpuinfo "flags" line names a bfloat16 dot-product unit (AVX512-BF16 or AMX-BF16)."""
    flags = flags_line.partition(":")[2].split()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_bf16(device: torch.device, precision: str = "auto") -> bool:
    """bfloat16 autocast: on CUDA always for "auto"; on the CPU only where the hardware computes it natively
    (emulated bfloat16 is slower than float32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: must be one of {PRECISIONS}")
    if precision != "auto":
        return precision == "bf16"
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())


def autocast(device: torch.device, bf16: bool | None = None):
    # bfloat16 needs no loss scaling. cache_enabled=False: CUDA-graphed modules require it (the cast weights must
    # not outlive the capture).
    enabled = use_bf16(device) if bf16 is None else bf16
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled, cache_enabled=False)


def tune_cpu_allocator() -> None:
    """Keep freed activation memory in the process instead of handing it back to the kernel (glibc malloc).

    glibc serves blocks over its mmap threshold with fresh pages and trims freed memory back to the kernel, so the
    engine paid a page fault per 4 KiB it touched again. Raising the mmap threshold to its 32 MiB maximum and the
    trim threshold to 1 GiB keeps those blocks for reuse. BUDGETNAS_MALLOC=default leaves malloc as it is. Once per
    process; a no-op away from glibc.
    """
    global _allocator_tuned
    if _allocator_tuned or os.environ.get("BUDGETNAS_MALLOC") == "default":
        return
    _allocator_tuned = True
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    mallopt(m_mmap_threshold, 32 << 20)
    mallopt(m_trim_threshold, 1 << 30)


@contextlib.contextmanager
def capturing():
    """Around the call that captures a CUDA graph: torch's refusal (a RuntimeError) raised as CaptureFailed with its
    text; running out of memory and every other error raised as they are."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as err:
        first_line = (str(err).splitlines() or [""])[0]
        raise CaptureFailed(f"{type(err).__name__}: {first_line}") from err


@contextlib.contextmanager
def capture_guard(model: nn.Module, device: torch.device, also_zero: tuple[torch.Tensor, ...] = ()):
    """Around a CUDA graph capture: one capture at a time, and afterwards (also when it fails) the model's state,
    the tensors in `also_zero` and the CUDA RNG put back as they were, since the warm-up passes update BatchNorm's
    running statistics and draw dropout masks."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.cuda.get_rng_state(device)
    quiet = getattr(torch.autograd.graph, "set_warn_on_accumulate_grad_stream_mismatch", None)
    if quiet is not None:  # captures warm up on a side stream, which torch >= 2.11 warns of at every backward
        quiet(False)
    try:
        with CAPTURE_LOCK:
            yield
    finally:
        model.load_state_dict(state)  # copies in place: a graph keeps pointing at the same tensors
        for t in also_zero:
            t.zero_()
        torch.cuda.set_rng_state(rng, device)


# ---- stopping at a safe point -----------------------------------------------------------------------------------
# A search's Ctrl-C and SIGTERM only set a flag; training raises `StopRequested` between two steps, and the search
# between trials. An exception raised by the signal itself lands wherever the main thread is: in the middle of a
# sharded step while its worker threads still run (a segfault at exit was seen), or while Optuna joins its heartbeat
# thread (which then printed a traceback at exit). A second signal raises at once: the user insists.

class StopRequested(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, raised at a safe point; `signal_name` says which."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name


_stop_signal: str | None = None


def request_stop(signal_name: str | None) -> None:
    global _stop_signal
    _stop_signal = signal_name


def stop_point() -> None:
    """Raise StopRequested if a stop was requested: called between steps, epochs and trials."""
    if _stop_signal is not None:
        raise StopRequested(_stop_signal)


@contextlib.contextmanager
def signals_ignored():
    """Within: Ctrl-C and SIGTERM are ignored, so that a second signal cannot cut the clean-up after a stop half-way."""
    import signal

    before = signal.signal(signal.SIGTERM, signal.SIG_IGN), signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before[0])
        signal.signal(signal.SIGINT, before[1])


@contextlib.contextmanager
def stop_at_safe_points():
    """Within: SIGTERM, and SIGINT where Python's own Ctrl-C handler is in place (not where the shell ignores it),
    request a stop instead of raising wherever the main thread is. On leaving, the handlers before and no request."""
    import signal

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if _stop_signal is not None:  # the second one: now
            raise StopRequested(name)
        request_stop(name)

    before = {signal.SIGTERM: signal.signal(signal.SIGTERM, handler)}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        before[signal.SIGINT] = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        for signum, previous in before.items():
            signal.signal(signum, previous)
        request_stop(None)

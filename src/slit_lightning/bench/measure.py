"""Measuring tools the benchmarks share: device, interleaved timing, FLOPs, peak memory."""

from __future__ import annotations

import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def seconds(work: Callable[[], object]) -> float:
    """Wall seconds of one call (the GPU's queue drained before and after)."""
    sync()
    start = time.perf_counter()
    work()
    sync()
    return time.perf_counter() - start


def interleaved(works: list[Callable[[], object]], repeats: int) -> list[float]:
    """Median seconds of each callable, called in turn (A, B, A, B, ...) after one warm-up
    round, so that drift in the machine's speed hits all of them alike."""
    for work in works:
        work()
    times: list[list[float]] = [[] for _ in works]
    for _ in range(repeats):
        for i, work in enumerate(works):
            times[i].append(seconds(work))
    return [statistics.median(t) for t in times]


def count_flops(work: Callable[[], object]) -> int:
    """Floating-point operations of one call, as torch's FLOP counter sees them (matmuls,
    convolutions and attention; element-wise work is not counted, as usual for MFU)."""
    with FlopCounterMode(display=False) as counter:
        work()
    return int(counter.get_total_flops())


def matmul_peak(size: int = 2048, repeats: int = 5, dtype: torch.dtype | None = None) -> float:
    """FLOP/s of a large square matmul on this device in ``dtype`` (float32 on CPU, bfloat16 on
    GPU by default): the practical peak that model FLOPs utilisation is measured against."""
    cuda = torch.cuda.is_available()
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    device = "cuda" if cuda else "cpu"
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    best = min(interleaved([lambda: a @ b], repeats)[0], seconds(lambda: a @ b))
    return 2 * size**3 / best


def _rss_bytes() -> int:
    """Resident memory of this process (Linux /proc; 0 where that is missing)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    import resource

    return pages * resource.getpagesize()


@contextmanager
def peak_memory() -> Iterator[dict[str, float]]:
    """Peak memory the block adds, in MiB: CUDA's allocator peak on a GPU; on CPU the resident
    set sampled every millisecond by a thread (torch's CPU allocator keeps no peak)."""
    result: dict[str, float] = {}
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        yield result
        torch.cuda.synchronize()
        result["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        result["kind"] = "cuda_max_allocated"  # type: ignore[assignment]
        return
    base, peak, stop = _rss_bytes(), [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], _rss_bytes())
        result["peak_mib"] = max(0, peak[0] - base) / 2**20
        result["kind"] = "cpu_rss_increase"  # type: ignore[assignment]

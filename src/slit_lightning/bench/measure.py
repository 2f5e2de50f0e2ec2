"""Measuring tools the benchmarks share: device, interleaved timing, FLOPs, peak memory."""

from __future__ import annotations

import contextlib
import platform
import statistics
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.weak import WeakIdKeyDictionary


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


PRECISIONS = ("32-true", "bf16-mixed")


def default_precision() -> str:
    """What a run on this device would train in: ``bf16-mixed`` on a GPU, ``32-true`` on CPU
    (the CPU presets' published numbers are float32)."""
    return "bf16-mixed" if torch.cuda.is_available() else "32-true"


def autocast(precision: str) -> contextlib.AbstractContextManager[Any]:
    """Lightning's ``precision`` as a context: ``bf16-mixed`` is bf16 autocast around forward
    and backward with float32 weights and optimiser state, as the Trainer runs it."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "32-true":
        return contextlib.nullcontext()
    return torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16)


def under(precision: str, work: Callable[[], object]) -> Callable[[], object]:
    """``work`` run inside :func:`autocast` (for timing a step at a precision)."""

    def run() -> object:
        with autocast(precision):
            return work()

    return run


def peak_dtype(precision: str) -> torch.dtype:
    """The matmul dtype a precision's model FLOPs run in: MFU is measured against its peak."""
    return torch.bfloat16 if precision == "bf16-mixed" else torch.float32


def count_flops(work: Callable[[], object]) -> int:
    """Floating-point operations of one call, as torch's FLOP counter sees them (matmuls,
    convolutions and attention; element-wise work is not counted, as usual for MFU)."""
    with FlopCounterMode(display=False) as counter:
        work()
    return int(counter.get_total_flops())


def matmul_peak(
    size: int | None = None, repeats: int = 8, dtype: torch.dtype = torch.float32
) -> float:
    """FLOP/s of the fastest of ``repeats`` large square matmuls on this device in ``dtype``:
    the practical peak that model FLOPs utilisation is measured against (the fastest, so a
    noisy neighbour cannot lower it). Pass the dtype the model's products run in
    (:func:`peak_dtype`). ``size`` defaults to 3072 on CPU (a fraction of a second) and 8192 on
    a GPU (smaller products leave a GPU partly idle)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = size or (8192 if device == "cuda" else 3072)
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    seconds(lambda: a @ b)  # warm-up
    best = min(seconds(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best


class _LiveBytes(TorchDispatchMode):
    """Bytes of CPU tensor storage alive while ops run under it, and their maximum."""

    def __init__(self, existing: list[torch.Tensor]) -> None:
        super().__init__()
        self.seen: WeakIdKeyDictionary = WeakIdKeyDictionary()
        for tensor in existing:  # weights, gradients, optimiser state: counted once, up front
            self.seen[tensor.untyped_storage()] = True
        self.live = self.peak = sum(storage.nbytes() for storage in self.seen)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
                storage = tensor.untyped_storage()
                if storage not in self.seen:
                    self.seen[storage] = True
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, storage.nbytes())
        return out

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes


def _state_tensors(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    tensors = [*module.parameters(), *module.buffers()]
    tensors += [p.grad for p in module.parameters() if p.grad is not None]
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return tensors


@contextmanager
def peak_memory(
    module: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> Iterator[dict[str, float | str]]:
    """Peak memory in MiB while the block runs (weights, gradients, optimiser state and
    activations): CUDA's allocator peak on a GPU; on CPU, where torch's allocator keeps no peak,
    the live bytes of every tensor storage, followed op by op (frozen weights included)."""
    result: dict[str, float | str] = {}
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        yield result
        torch.cuda.synchronize()
        result["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["kind"] = "cuda_max_allocated"
        return
    tracker = _LiveBytes(_state_tensors(module, optimizer))
    with tracker:
        yield result
    result["peak_mib"] = tracker.peak / 2**20
    result["kind"] = "cpu_live_tensor_bytes"

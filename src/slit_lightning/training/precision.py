"""bf16 on the CPU: autocast where the processor multiplies bf16 natively, else float32.

CPUs with AVX512-BF16 or AMX (recent Xeon and EPYC) run bf16 matrix products faster than
float32; elsewhere bf16 is emulated and slower. The bootstrap trainers of the built-in models use
:func:`cpu_autocast` (float32 weights, optimizer state and losses; bf16 products). For the
stages, Lightning's ``trainer.precision: bf16-mixed`` does the same, and the demo's configs ask
for :func:`cpu_precision` (``${cpu_precision:}`` in YAML) in every stage: bf16 pays in stage 2,
and in stage 1 too once the Q-Former's bf16 attention runs on PyTorch's math kernel
(:data:`slit_lightning.model.qformer_layers.CPU_MATH_ATTENTION`). docs/benchmarks.md has the
timings.
"""

from __future__ import annotations

import contextlib
import functools
import platform
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = ["cpu_autocast", "cpu_precision", "has_bf16_flags", "native_bf16"]


def has_bf16_flags(cpuinfo: str, machine: str) -> bool:
    """Whether ``/proc/cpuinfo`` text lists bf16 matrix instructions for a ``machine`` CPU."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, arm64
            flags.update(value.split())
    if machine.lower() in ("aarch64", "arm64"):
        return "bf16" in flags  # ARMv8.6 BFloat16 instructions
    return bool(flags & {"avx512_bf16", "amx_bf16"})


@functools.cache
def native_bf16() -> bool:
    """True when this CPU has bf16 matrix instructions (read from ``/proc/cpuinfo``: Linux only)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return has_bf16_flags(text, platform.machine())


@contextlib.contextmanager
def cpu_autocast(enabled: bool | None = None) -> Iterator[None]:
    """bf16 autocast on the CPU (``enabled=None``: when :func:`native_bf16`); float32 otherwise."""
    use = native_bf16() if enabled is None else enabled
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use):
        yield


def cpu_precision() -> str:
    """Lightning's ``trainer.precision`` for a CPU run: ``"bf16-mixed"`` where the CPU multiplies
    bf16 natively (:func:`native_bf16`), ``"32-true"`` elsewhere (emulated bf16 is slower)."""
    return "bf16-mixed" if native_bf16() else "32-true"

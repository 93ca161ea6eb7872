"""Peak memory of one call beyond what is resident before it (shared by the benchmarks).

tracemalloc does not see torch's CPU allocations, so on a CPU this reads the kernel's
RSS high-water mark: it resets it (writes 5 to /proc/self/clear_refs, Linux >= 4.0)
and reports VmHWM - VmRSS across the call: activations and workspaces, weights
excluded. Without clear_refs it falls back to the ru_maxrss delta, only a lower
bound. On CUDA: torch.cuda.max_memory_allocated minus the memory allocated before.
"""
from __future__ import annotations

import ctypes
import gc
import resource
from collections.abc import Callable
from pathlib import Path


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> bool:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back so RSS is a fair baseline
    except OSError:
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_mb(call: Callable[[], object], device: str) -> tuple[float, str]:
    """(MB the call needs beyond the memory resident before it, how that was measured)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call()
        return (torch.cuda.max_memory_allocated() - base) / 2**20, "torch.cuda.max_memory_allocated"
    if reset_peak():
        base = status_kb("VmRSS")
        call()
        return (status_kb("VmHWM") - base) / 1024, "VmHWM - VmRSS after /proc/self/clear_refs"
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    call()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024, "ru_maxrss delta (lower bound)"

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


def tensor_peak_mb(call: Callable[[], object]) -> tuple[float, str]:
    """(Peak MB of tensor storage the call allocates and holds at once, how that was measured).

    The CPU counterpart of torch.cuda.max_memory_allocated: every aten op's output storage is
    counted while a tensor refers to it (views and in-place results count no new bytes), so
    the figure is free of the C allocator's fragmentation and arena noise that RSS carries.
    Kernel-internal scratch (e.g. a convolution's workspace) is not an op output and is not seen.
    """
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    refs: dict[int, int] = {}  # storage address -> live tracked tensors on it
    size: dict[int, int] = {}
    state = {"live": 0, "peak": 0}

    def release(key: int) -> None:
        refs[key] -= 1
        if refs[key] == 0:
            state["live"] -= size.pop(key)
            del refs[key]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            given = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                     if isinstance(t, torch.Tensor) and t.device.type != "meta"}
            for t in tree_flatten(out)[0]:
                if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                    continue
                st = t.untyped_storage()
                key = st.data_ptr()
                if key == 0:
                    continue
                if key not in refs:
                    if key in given:  # a view of or an in-place write into memory allocated elsewhere
                        continue
                    refs[key], size[key] = 0, st.nbytes()
                    state["live"] += size[key]
                    state["peak"] = max(state["peak"], state["live"])
                refs[key] += 1
                weakref.finalize(t, release, key)
            return out

    gc.collect()
    with Count():
        call()
    return state["peak"] / 2**20, "peak live tensor storage (aten outputs, dispatch-counted)"

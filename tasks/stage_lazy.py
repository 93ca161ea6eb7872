"""Model libraries for stage modules, imported on first use rather than with the module.

Planning and `status` import every stage module to compute work items and cache keys,
which need no torch; only the work does. `torch` and `F` (torch.nn.functional) here
stand in for the modules and import them at the first attribute access, so a stage
module writes `from tasks.stage_lazy import F, torch` and uses them as usual.
`@torch.no_grad()` / `@torch.inference_mode()` as decorators at import time (or as
context managers before torch is loaded) are deferred the same way.
"""
from __future__ import annotations

import functools
import importlib
import sys
from typing import Any

_GRAD_MODES = ("no_grad", "inference_mode", "enable_grad")


class LazyModule:
    """Stands in for module `name`; the first attribute access imports it (nothing is put in sys.modules early)."""

    def __init__(self, name: str):
        object.__setattr__(self, "_name", name)

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        if attr in _GRAD_MODES and self._name == "torch" and "torch" not in sys.modules:
            return functools.partial(_DeferredGradMode, attr)
        return getattr(importlib.import_module(self._name), attr)

    def __setattr__(self, attr: str, value: Any) -> None:
        setattr(importlib.import_module(self._name), attr, value)

    def __repr__(self) -> str:
        loaded = "loaded" if self._name in sys.modules else "not loaded yet"
        return f"<lazy module {self._name!r} ({loaded})>"


class _DeferredGradMode:
    """torch.<mode>(*args) before torch is imported: a decorator or a context manager that imports it when used."""

    def __init__(self, mode: str, *args: Any, **kwargs: Any):
        self._mode, self._args, self._kwargs, self._ctx = mode, args, kwargs, None

    def _real(self):
        import torch

        return getattr(torch, self._mode)(*self._args, **self._kwargs)

    def __call__(self, fn):
        real = None

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            nonlocal real
            if real is None:
                real = self._real()(fn)
            return real(*args, **kwargs)

        return wrapper

    def __enter__(self):
        self._ctx = self._real()
        return self._ctx.__enter__()

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


torch = LazyModule("torch")
F = LazyModule("torch.nn.functional")

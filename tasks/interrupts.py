"""Stopping cleanly: a process-wide stop request, checked at safe points.

The first Ctrl-C (SIGINT) or SIGTERM does not raise anywhere: it sets the stop request.
No new item starts (tasks.stage.run_items), no new batch is submitted (flows.planning),
and the item in flight stops at its next safe point, a denoising or fine-tuning step,
by raising `Interrupted` there: its artifact is never committed (the store's commit
protocol), fine-tuning saves a checkpoint first, so a rerun resumes. Finished rows are
flushed to the ledger and claims released on the way out. A second signal exits at
once (after the `on_force_exit` callbacks, e.g. stopping the temporary Prefect server).

`Interrupted` is a BaseException so that the `except Exception` that keeps one bad
item from stopping a batch does not record an interrupted item as failed.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator

EXIT_INTERRUPTED = 130

_stop = threading.Event()
_reason: list[str] = []
_force_exit_hooks: list[Callable[[], None]] = []
_installed = [False]


class Interrupted(BaseException):
    """Raised at a safe point after a stop was requested; the work in flight is not committed."""


def request_stop(reason: str = "stop requested") -> None:
    if not _stop.is_set():
        _reason.append(reason)
    _stop.set()


def stop_requested() -> bool:
    return _stop.is_set()


def stop_reason() -> str | None:
    return _reason[0] if _reason else None


def reset() -> None:
    """Forget a stop request (a new run in the same process, tests)."""
    _stop.clear()
    _reason.clear()


def check() -> None:
    """A safe point: raise Interrupted if a stop was requested."""
    if _stop.is_set():
        raise Interrupted(stop_reason() or "stop requested")


def signals_handled() -> bool:
    """True while `handle_signals` is active (the CLI): signals become stop requests, not exceptions."""
    return _installed[0]


def on_force_exit(fn: Callable[[], None]) -> None:
    """Run fn (quickly, best effort) before a second signal exits the process."""
    _force_exit_hooks.append(fn)


def _force_exit(signum: int) -> None:
    for fn in list(_force_exit_hooks):
        with contextlib.suppress(Exception):
            fn()
    with contextlib.suppress(Exception):
        sys.stderr.write("\nstopped at once; completed artifacts are kept, rerun to continue\n")
        sys.stderr.flush()
    os._exit(EXIT_INTERRUPTED)


def _handler(signum, frame) -> None:
    if _stop.is_set():
        _force_exit(signum)
    name = signal.Signals(signum).name
    request_stop(name)
    with contextlib.suppress(Exception):
        sys.stderr.write(f"\n{name}: stopping after the current step (finished work is kept); "
                         "press Ctrl-C again to stop at once\n")
        sys.stderr.flush()


@contextlib.contextmanager
def handle_signals(signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """While the block runs (main thread only), the first signal requests a stop, a second exits at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    reset()  # a new command starts with no stop request (matters when commands run in one process, as in tests)
    previous = {s: signal.signal(s, _handler) for s in signals}
    _installed[0] = True
    try:
        yield
    finally:
        _installed[0] = False
        for s, h in previous.items():
            signal.signal(s, h)
        _force_exit_hooks.clear()

"""Progress bars for the CLI: one bar per stage, advanced as items finish.

Stage tasks report each finished item through `tasks.stage_task.set_item_listener`
(in-process task runners); `run_stage` also sets each bar from every batch summary,
so bars stay right when batches run elsewhere (Dask). Without `show_progress`
(workers, deployments, tests) nothing is drawn.
"""
from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from tasks import stage_task

_lock = threading.Lock()
_active = None  # (rich Progress, {stage: task id}, {stage: done count})


@contextmanager
def show_progress(enabled: bool = True) -> Iterator[None]:
    """Draw stage bars on stderr while the block runs (only on a terminal unless forced)."""
    global _active
    if not enabled:
        yield
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    bars = Progress(TextColumn("{task.description:>10}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(file=sys.stderr), transient=False)
    with _lock:
        _active = (bars, {}, {})
    stage_task.set_item_listener(item_finished)
    try:
        with bars:
            yield
    finally:
        stage_task.set_item_listener(None)
        with _lock:
            _active = None


def stage_planned(stage: str, todo: int) -> None:
    """A stage has `todo` items to run: add its bar."""
    with _lock:
        if _active is None or todo == 0:
            return
        bars, ids, done = _active
        ids[stage] = bars.add_task(stage, total=todo)
        done[stage] = 0


def item_finished(stage: str, state: str) -> None:
    with _lock:
        if _active is None or stage not in _active[1]:
            return
        bars, ids, done = _active
        done[stage] += 1
        bars.update(ids[stage], completed=done[stage])


def batch_finished(stage: str, finished: int) -> None:
    """Items of the stage known finished from batch summaries (covers runners in other processes)."""
    with _lock:
        if _active is None or stage not in _active[1]:
            return
        bars, ids, done = _active
        done[stage] = max(done[stage], finished)
        bars.update(ids[stage], completed=done[stage])

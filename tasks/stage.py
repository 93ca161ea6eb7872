"""What every stage shares: work items, planning against the ledger, running a batch.

A stage turns catalog items into artifacts. Each work item carries its full
cache key (DESIGN 4), so planning is a lookup: the ledger's latest row for the
item either has the same key (done), a failure under the same key (failed), a
different key (stale, with the reasons), or nothing (missing). Running a batch
writes each artifact through the store's commit protocol, records one ledger
fragment for the whole batch, and never lets one bad item stop the others.
"""
from __future__ import annotations

import json
import logging
import os
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from storage.keys import StageKey

if TYPE_CHECKING:  # annotations only: planning imports neither zarr nor the claims machinery
    from storage import ArtifactStore, Ledger
    from storage.artifacts import ArtifactWriter
    from storage.claims import Claims

log = logging.getLogger("audioscenic")


@dataclass(frozen=True)
class WorkItem:
    stage: str
    item_id: str  # ledger id, e.g. "dog-1" or "bear/dog-1"
    artifact: str  # Zarr group path, e.g. "audio/dog-1"
    key: StageKey
    video_id: str | None = None
    audio_id: str | None = None
    variant: str | None = None
    payload: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)  # small: paths, labels


@dataclass(frozen=True)
class PlanEntry:
    item: WorkItem
    state: str  # "done" | "stale" | "missing" | "failed"
    reasons: tuple[str, ...] = ()


def plan(items: Sequence[WorkItem], ledger: Ledger) -> list[PlanEntry]:
    """Classify items from the ledger alone (one read per stage, no artifact access).

    Only key and status are compared for every item (columnar, fast for large
    grids); full rows are materialised just for the items that are not done.
    """
    latest: dict[str, tuple[dict[str, int], list, list, Any]] = {}
    out = []
    for item in items:
        if item.stage not in latest:
            table = ledger.latest_table(item.stage)
            index = {iid: i for i, iid in enumerate(table["item_id"].to_pylist())}
            latest[item.stage] = (index, table["key"].to_pylist(), table["status"].to_pylist(), table)
        index, keys, statuses, table = latest[item.stage]
        i = index.get(item.item_id)
        if i is None:
            out.append(PlanEntry(item, "missing", ("never run",)))
            continue
        if keys[i] == item.key.key and statuses[i] == "done":
            out.append(PlanEntry(item, "done"))
            continue
        row = table.slice(i, 1).to_pylist()[0]
        if keys[i] == item.key.key:
            out.append(PlanEntry(item, "failed", (f"last run failed: {row['error']}",)))
        else:
            reasons = item.key.diff(
                code_version=row["code_version"] or "",
                params_hash=row["params_hash"] or "",
                inputs_hash=row["inputs_hash"] or "",
                upstream=json.loads(row["upstream_keys"] or "{}"),
            )
            out.append(PlanEntry(item, "stale", tuple(reasons or ["key changed"])))
    return out


def todo(entries: Iterable[PlanEntry]) -> list[WorkItem]:
    return [e.item for e in entries if e.state != "done"]


@dataclass
class BatchResult:
    computed: list[str] = field(default_factory=list)
    adopted: list[str] = field(default_factory=list)  # found complete in the store (e.g. after a crash)
    failed: dict[str, str] = field(default_factory=dict)
    busy: list[str] = field(default_factory=list)  # still claimed by another worker when this batch stopped waiting
    not_started: list[str] = field(default_factory=list)  # a stop was requested before they ran (or finished)
    interrupted: bool = False

    def merge(self, other: "BatchResult") -> "BatchResult":
        self.computed += other.computed
        self.adopted += other.adopted
        self.failed.update(other.failed)
        self.busy += other.busy
        self.not_started += other.not_started
        self.interrupted = self.interrupted or other.interrupted
        return self


Compute = Callable[[WorkItem, "ArtifactWriter"], None]


def _row(item: WorkItem, store: ArtifactStore, status: str, started: float, run_id: str | None, error: str | None = None) -> dict[str, Any]:
    return dict(
        stage=item.stage, item_id=item.item_id, video_id=item.video_id, audio_id=item.audio_id,
        variant=item.variant, key=item.key.key, code_version=item.key.code_version,
        params_hash=item.key.params_hash, inputs_hash=item.key.inputs_hash,
        upstream_keys=item.key.upstream_json(), uri=store.uri(item.artifact), status=status,
        error=error, started_at=started, finished_at=time.time(), run_id=run_id,
    )


def run_items(
    items: Sequence[WorkItem],
    store: ArtifactStore,
    ledger: Ledger,
    compute: Compute,
    run_id: str | None = None,
    progress: Callable[[WorkItem, str], None] | None = None,
    rows_per_fragment: int = 64,
    claims: Claims | None = None,
    max_wait_s: float | None = None,
) -> BatchResult:
    """Compute each item into its artifact; bad items are recorded as failed and skipped.

    Ledger rows are flushed every `rows_per_fragment` items and at the end, so a
    crash loses at most the rows of unfinished work; artifacts committed before
    a crash are adopted (not recomputed) on the next run. With `claims`, an item
    another worker is computing right now is put aside and waited for once the rest
    of the batch is done: adopted when that worker commits it, computed here if it
    gives up (its claim released or its lease expired). `max_wait_s` (None: as long
    as the claim holds) bounds the wait; items still claimed then are `busy`.

    A stop request (tasks.interrupts) starts no further item; the item in flight is
    dropped uncommitted at its next safe point (`Interrupted`); both are `not_started`.
    """
    from tasks import interrupts

    run_id = run_id or uuid.uuid4().hex
    result, pending = BatchResult(), []

    def attempt(item: WorkItem) -> str:
        started = time.time()
        claim = f"{item.artifact}@{item.key.key}"
        if store.is_complete(item.artifact, item.key.key):
            pending.append(_row(item, store, "done", started, run_id))
            result.adopted.append(item.item_id)
            return "adopted"
        if claims is not None and not claims.acquire(claim):
            return "busy"
        try:
            if store.is_complete(item.artifact, item.key.key):
                # Another worker committed it between our check and our claim.
                pending.append(_row(item, store, "done", started, run_id))
                result.adopted.append(item.item_id)
                return "adopted"
            try:
                attrs = {"stage": item.stage, "item_id": item.item_id, "code_version": item.key.code_version}
                with store.writing(item.artifact, item.key.key, **attrs) as writer:
                    compute(item, writer)
                    _simulated_wait(item.stage)
            except Exception as e:  # one bad item must not stop the batch
                msg = f"{type(e).__name__}: {e}"
                log.error("%s %s failed: %s", item.stage, item.item_id, msg)
                log.debug("%s", traceback.format_exc())
                pending.append(_row(item, store, "failed", started, run_id, error=msg))
                result.failed[item.item_id] = msg
                return "failed"
            pending.append(_row(item, store, "done", started, run_id))
            result.computed.append(item.item_id)
            return "computed"
        finally:
            if claims is not None:
                claims.release(claim)

    def finished(item: WorkItem, state: str) -> None:
        nonlocal pending
        if progress:
            progress(item, state)
        if len(pending) >= rows_per_fragment:
            ledger.append(pending)
            pending = []

    queue = list(items)
    waiting: list[WorkItem] = []
    try:
        while queue:
            if interrupts.stop_requested():
                break
            item = queue.pop(0)
            try:
                state = attempt(item)
            except interrupts.Interrupted:
                queue.insert(0, item)
                break
            if state == "busy":
                waiting.append(item)
            else:
                finished(item, state)
        # Items another worker holds: theirs to compute; wait until it commits them (or gives up).
        deadline = None if max_wait_s is None else time.monotonic() + max_wait_s
        pause = 0.2
        while waiting and not queue and not interrupts.stop_requested():
            for item in list(waiting):
                try:
                    state = attempt(item)
                except interrupts.Interrupted:
                    queue.insert(0, item)
                    waiting.remove(item)
                    break
                if state != "busy":
                    waiting.remove(item)
                    finished(item, state)
            if not waiting or queue or (deadline is not None and time.monotonic() >= deadline):
                break
            _sleep_unless_stopped(pause)
            pause = min(pause * 1.5, 5.0, getattr(claims, "lease_s", 15.0) / 3)  # notice a lapsed lease soon
    finally:
        ledger.append(pending)
    result.busy = [it.item_id for it in waiting if not interrupts.stop_requested()]
    result.not_started = [it.item_id for it in queue] + (
        [it.item_id for it in waiting] if interrupts.stop_requested() else [])
    result.interrupted = interrupts.stop_requested()
    return result


SIMULATED_WAIT_ENV = "AUDIOSCENIC_TEST_STAGE_WAIT"


def _simulated_wait(stage: str) -> None:
    """Test hook, off unless the environment sets it (e.g. "edit=10,finetune=2"): each computed item of
    those stages waits that many seconds before its commit, its claim held, as a GPU-bound item would."""
    spec = os.environ.get(SIMULATED_WAIT_ENV)
    if not spec:
        return
    for part in spec.split(","):
        name, _, seconds = part.partition("=")
        if name.strip() == stage:
            _sleep_unless_stopped(float(seconds))


def _sleep_unless_stopped(seconds: float) -> None:
    from tasks import interrupts

    end = time.monotonic() + seconds
    while time.monotonic() < end and not interrupts.stop_requested():
        time.sleep(min(0.1, max(0.0, end - time.monotonic())))

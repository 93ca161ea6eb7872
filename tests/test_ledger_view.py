"""Issue 15: one view of the ledger per run, compaction in bounded steps, reads that do not grow with batches."""
from __future__ import annotations

import multiprocessing as mp
import threading

import pytest

from storage import Ledger
from storage.ledger import LedgerView, _tier


def state(source, stage: str) -> dict[str, tuple[str, str]]:
    t = source.latest_table(stage)
    return dict(zip(t["item_id"].to_pylist(), zip(t["key"].to_pylist(), t["status"].to_pylist())))


def rows(stage: str, prefix: str, n: int, key: str = "k", status: str = "done", t: float | None = None):
    return [dict(stage=stage, item_id=f"{prefix}{i}", key=key, status=status, finished_at=t,
                 error="boom" if status == "failed" else None) for i in range(n)]


def test_view_learns_own_appends_without_reading_them(tmp_path):
    led = Ledger(tmp_path / "ledger")
    led.append(rows("audio", "a", 5, key="old", t=1.0))
    with led.view() as view:
        assert view.full_reads == 1 and view.fragments_read == 1
        assert not view.done_under([("audio", "a0", "new")])
        writer = Ledger(str(tmp_path / "ledger") + "/")  # another object, another spelling: the same ledger
        writer.append(rows("audio", "a", 3, key="new", t=2.0))
        writer.append(rows("audio", "a", 1, key="new", status="failed", t=3.0))
        writer.append(rows("edit", "e", 4))
        assert view.done_under([("audio", "a1", "new"), ("audio", "a2", "new"), ("edit", "e3", "k")])
        assert not view.done_under([("audio", "a0", "new")])  # its latest row failed
        assert not view.done_under([("audio", "a4", "new")])  # still under the old key
        assert view.refresh() == 0 and view.fragments_read == 1  # its own fragments are never read back
        assert state(view, "audio") == state(led, "audio") and state(view, "edit") == state(led, "edit")
        # the cache policy's question goes to the open view
        assert led.done_under([("edit", "e0", "k")])
    # without a view: answered from the fragments, the same way
    assert led.done_under([("audio", "a1", "new"), ("edit", "e3", "k")])
    assert not led.done_under([("audio", "a0", "new")]) and not led.done_under([("audio", "zz", "new")])


def _append_from_process(url: str, n: int, name: str = "p") -> None:
    led = Ledger(url)
    for b in range(n):
        led.append(rows("edit", f"{name}{b}-", 3))


def test_view_reads_only_new_fragments_written_elsewhere(tmp_path):
    url = str(tmp_path / "ledger")
    led = Ledger(url)
    led.append(rows("edit", "x", 2))
    view = LedgerView(led)
    p = mp.get_context("spawn").Process(target=_append_from_process, args=(url, 6))
    p.start()
    p.join(120)
    assert p.exitcode == 0
    assert view.refresh() == 6 and view.fragments_read == 7 and view.full_reads == 1
    assert state(view, "edit") == state(led, "edit") and len(state(view, "edit")) == 20
    assert view.refresh() == 0


def test_compact_step_is_bounded_and_keeps_every_row(tmp_path):
    led = Ledger(tmp_path / "ledger")
    with led.view(fan_in=4) as view:
        for b in range(100):
            led.append(rows("edit", f"b{b}-", 2, t=float(b)))
            view.batch_finished()
            assert len(led.fragment_paths()) < 3 * 4  # fan_in - 1 per tier, 3 tiers at 100 batches
        assert view.refresh() == 0 and view.merges > 0  # merges of fragments it had read: not read back
    tiers = sorted(_tier(p) for p in led.fragment_paths())
    assert max(tiers) >= 1
    t = led.read()
    assert t.num_rows == 200 and len(set(t["row_id"].to_pylist())) == 200
    assert state(view, "edit") == state(led, "edit")


def test_compact_step_merges_tiers(tmp_path):
    led = Ledger(tmp_path / "ledger")
    for b in range(4 ** 3):
        led.append(rows("edit", f"b{b}-", 1))
    merges = led.compact_step(fan_in=4)
    assert len(merges) == 16 + 4 + 1  # tier 0 -> 1 -> 2 -> 3, in one step
    assert [_tier(p) for p in led.fragment_paths()] == [3]
    assert led.read().num_rows == 64
    with pytest.raises(ValueError):
        led.compact_step(fan_in=1)


def test_compaction_never_loses_a_concurrent_append(tmp_path):
    """Writers append while two compactors merge in steps and a reader reads: every row survives."""
    url = str(tmp_path / "ledger")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_append_from_process, args=(url, 60, f"w{w}-")) for w in range(2)]
    for p in procs:
        p.start()
    led, stop, errors = Ledger(url), threading.Event(), []

    def loop(fn):
        while not stop.is_set():
            try:
                fn()
            except Exception as e:  # pragma: no cover - a failure is the test's answer
                errors.append(e)

    threads = [threading.Thread(target=loop, args=(lambda: Ledger(url).compact_step(fan_in=3),)) for _ in range(2)]
    threads.append(threading.Thread(target=loop, args=(lambda: led.read(),)))
    for t in threads:
        t.start()
    for p in procs:
        p.join(180)
        assert p.exitcode == 0
    stop.set()
    for t in threads:
        t.join(60)
    assert not errors
    led.compact_step(fan_in=3)
    assert len(led.fragment_paths()) <= 2 * 6  # fan_in - 1 per tier
    t = led.read()
    # Two compactors may both merge one group (a duplicate until a later merge meets it); never a lost row.
    assert len(set(t["row_id"].to_pylist())) == 2 * 60 * 3
    assert set(t["item_id"].to_pylist()) == {f"w{w}-{b}-{i}" for w in range(2) for b in range(60) for i in range(3)}
    led.compact()
    assert led.read().num_rows == 2 * 60 * 3


# -- a run: the pipeline flow with one trivial stage ----------------------------------------------------------
STAGE = "tiny"
CONFIG_SECTION = "edit"
GRID = {"n": 0}


def work_items(cfg, catalog):
    from storage.keys import StageKey
    from tasks.stage import WorkItem

    return [WorkItem(STAGE, f"v/{i}", f"tiny/{i}", StageKey.build(STAGE, "1", {"i": i}), video_id="v")
            for i in range(GRID["n"])]


def run_batch(cfg, items, store, ledger, progress=None, claims=None):
    import numpy as np

    from tasks.stage import run_items

    return run_items(items, store, ledger, lambda it, w: w.write("x", np.zeros(1, np.uint8)), progress=progress,
                     claims=claims)


def _stage_task_fn(cfg, items):
    from tasks.stage_task import run_logged_batch

    return run_logged_batch(STAGE, run_batch, cfg, items)


def _make_task():
    from tasks.stage_task import StageCachePolicy, task

    return task(name="tiny", cache_policy=StageCachePolicy())(_stage_task_fn)


stage_task = _make_task()


def run_grid(tmp_path, monkeypatch, n: int):
    """The pipeline flow over n items in batches of 2 -> (summary, the run's view, counts of ledger reads)."""
    import sys

    import yaml

    import flows.pipeline as pipeline
    import storage.ledger as ledger_mod

    GRID["n"] = n
    monkeypatch.setattr(pipeline, "stage_modules", lambda: [sys.modules[__name__]])
    monkeypatch.setattr(ledger_mod, "COMPACT_FAN_IN", 4)
    counts = {"full": 0, "read": 0, "fallback": 0, "view_lookups": 0}
    views = []
    real_listed, real_read, real_done, real_view_done = (Ledger._read_listed, Ledger.read, Ledger.done_under,
                                                         LedgerView.done_under)
    real_init = LedgerView.__init__

    def listed(self, exclude=frozenset(), columns=None):
        counts["full"] += not exclude
        return real_listed(self, exclude, columns)

    def read(self, *a, **kw):
        counts["read"] += 1
        return real_read(self, *a, **kw)

    def done_under(self, entries):
        counts["fallback"] += not ledger_mod._views_of(self.id)
        return real_done(self, entries)

    def view_done(self, entries):
        counts["view_lookups"] += 1
        return real_view_done(self, entries)

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        views.append(self)

    monkeypatch.setattr(Ledger, "_read_listed", listed)
    monkeypatch.setattr(Ledger, "read", read)
    monkeypatch.setattr(Ledger, "done_under", done_under)
    monkeypatch.setattr(LedgerView, "done_under", view_done)
    monkeypatch.setattr(LedgerView, "__init__", init)
    root = tmp_path / f"grid{n}"
    root.mkdir()
    config = root / "config.yaml"
    (root / "videos").mkdir()  # an empty catalog: the stage makes up its own items
    config.write_text(yaml.safe_dump({"workdir": str(root / "work"), "stages": {"edit": {"batch_size": 2}},
                                      "catalogs": {"videos": [{"kind": "folder", "root": str(root / "videos")}]}}))
    summary = pipeline.stages_flow(str(config))
    monkeypatch.undo()
    (view,) = views
    return summary, view, counts, Ledger(root / "work" / "ledger")


def test_a_run_reads_the_ledger_once_however_many_batches(prefect_server, tmp_path, monkeypatch):
    small = run_grid(tmp_path, monkeypatch, 4)  # 2 batches
    large = run_grid(tmp_path, monkeypatch, 40)  # 20 batches: compaction steps every 4
    for (summary, view, counts, ledger), n in ((small, 4), (large, 40)):
        s = summary[STAGE]
        assert s["computed"] == n and s["failed"] == {}
        assert all(isinstance(v, (int, bool)) for k, v in s.items() if k not in ("planned", "failed"))  # counts
        assert view.full_reads == 1
        assert counts["view_lookups"] == n // 2 and counts["fallback"] == 0  # the cache policy asked the view
        # the view agrees with a fresh read of the ledger
        for stage in ("catalog", STAGE):
            assert state(view, stage) == state(ledger, stage)
        assert len(state(ledger, STAGE)) == n
    (_, _, c_small, _), (_, view, c_large, ledger) = small, large
    assert c_large["full"] == c_small["full"] and c_large["read"] == c_small["read"]  # not per batch
    assert view.merges >= 4 and view.fragments_read <= small[1].fragments_read + 1
    assert len(ledger.fragment_paths()) < 3 * 3  # fan_in 4: at most 3 per tier
    assert ledger.read(stage=STAGE).num_rows == 40

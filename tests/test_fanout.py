"""The fan-out grid (flows.fanout) without a server: a video's part of a grid, child bookkeeping
(lost children declared Crashed and started again), the test hook that makes a stage wait.

The whole thing on real services (PostgreSQL, S3, two workers) is tests/test_pool.py."""
from __future__ import annotations

import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from flows import fanout
from flows.planning import run_stage
from storage import Ledger
from storage.keys import StageKey
from tasks import stage
from tasks.config import config_from_dict
from tasks.stage import WorkItem

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- a video's part of a grid


def _item(stage_name: str, item_id: str, video: str | None) -> WorkItem:
    return WorkItem(stage_name, item_id, f"{stage_name}/{item_id}", StageKey.build(stage_name, "1", {"id": item_id}),
                    video_id=video)


class _FakeStage:
    STAGE = "edit"

    def __init__(self, items):
        self.items, self.batches = items, []
        self.stage_task = SimpleNamespace(submit=self._submit)

    def work_items(self, cfg, catalog):
        return list(self.items)

    def _submit(self, cfg, batch):
        self.batches.append([it.item_id for it in batch])
        return SimpleNamespace(result=lambda: {"computed": [it.item_id for it in batch]})


def test_run_stage_for_some_videos_keeps_their_items_and_keys(tmp_path):
    items = [_item("edit", "a/1", "a"), _item("edit", "a/2", "a"), _item("edit", "b/1", "b"), _item("edit", "clip", None)]
    mod = _FakeStage(items)
    cfg = config_from_dict({"workdir": str(tmp_path)})
    summary = run_stage(mod, cfg, None, Ledger(tmp_path / "ledger"), videos=["a"])
    # the video's items and the items of no video (a clip's audio), under the whole grid's keys
    assert sorted(i for b in mod.batches for i in b) == ["a/1", "a/2", "clip"]
    assert summary["computed"] == 3 and summary["planned"]["missing"] == 3
    mod.batches.clear()
    run_stage(mod, cfg, None, Ledger(tmp_path / "ledger"))  # the whole grid: every item
    assert sorted(i for b in mod.batches for i in b) == ["a/1", "a/2", "b/1", "clip"]


# ----------------------------------------------------------------------------- child runs


class _FakeClient:
    """The few client calls Children makes, over an in-memory set of flow runs."""

    def __init__(self):
        self.runs: dict = {}
        self.heartbeats: dict = {}  # run id -> last heartbeat time
        self.forced: list = []

    def create(self, name: str):
        run = SimpleNamespace(id=uuid.uuid4(), name=name, state=self.state("SCHEDULED"))
        self.runs[run.id] = run
        return run

    @staticmethod
    def state(kind: str, at: datetime | None = None):
        return SimpleNamespace(type=SimpleNamespace(value=kind), timestamp=at or datetime.now(timezone.utc))

    def set(self, run, kind: str, ago_s: float = 0.0):
        self.runs[run.id].state = self.state(kind, datetime.now(timezone.utc) - timedelta(seconds=ago_s))

    def read_flow_runs(self, flow_run_filter):
        return [self.runs[i] for i in flow_run_filter.id.any_]

    def read_events(self, filter, limit):
        wanted = {r.split(".")[-1] for r in filter.resource.id}
        assert filter.event.name == ["prefect.flow-run.heartbeat"] and filter.resource.distinct
        return SimpleNamespace(events=[
            SimpleNamespace(resource=SimpleNamespace(id=f"prefect.flow-run.{i}"), occurred=t)
            for i, t in self.heartbeats.items() if str(i) in wanted])

    def set_flow_run_state(self, run_id, state, force=False):
        if self.runs[run_id].state.type.value in fanout.FINAL and not force:
            return SimpleNamespace(status=SimpleNamespace(value="ABORT"))  # as the server: final stays final
        self.forced.append((run_id, state.type.value, force))
        self.runs[run_id].state = self.state(state.type.value)
        return SimpleNamespace(status=SimpleNamespace(value="ACCEPT"))


@pytest.fixture
def children(monkeypatch):
    import logging

    import prefect.deployments

    client = _FakeClient()
    submitted = []

    def fake_run_deployment(name, parameters, timeout, as_subflow, flow_run_name, idempotency_key, tags,
                            job_variables):
        assert timeout == 0 and as_subflow and name == fanout.VIDEO_DEPLOYMENT
        submitted.append((parameters["video"], idempotency_key, job_variables))
        return client.create(flow_run_name)

    monkeypatch.setattr(prefect.deployments, "run_deployment", fake_run_deployment)
    kids = fanout.Children(client, fanout.VIDEO_DEPLOYMENT, "parent", {"config_path": "c.yaml"}, attempts=2,
                           lost_after_s=45.0, logger=logging.getLogger("test"), job_variables={"env": {"X": "1"}})
    return kids, client, submitted


def test_children_complete_and_report(children):
    kids, client, submitted = children
    kids.submit("bear")
    kids.submit("car")
    assert [s[0] for s in submitted] == ["bear", "car"] and submitted[0][1] == "parent:bear:1"
    assert submitted[0][2] == {"env": {"X": "1"}}  # the children's job variables
    client.set(kids.runs["bear"][-1], "COMPLETED")
    client.set(kids.runs["car"][-1], "RUNNING")
    client.heartbeats[kids.runs["car"][-1].id] = datetime.now(timezone.utc)
    kids.poll()
    assert kids.pending() == ["car"] and kids.final == {"bear": "COMPLETED"}
    client.set(kids.runs["car"][-1], "FAILED")  # a failed child is reported, not started again
    kids.poll()
    assert not kids.pending()
    assert {v: r["state"] for v, r in kids.report().items()} == {"bear": "COMPLETED", "car": "FAILED"}
    assert kids.report()["car"]["attempts"] == 1 and not client.forced


def test_a_silent_child_is_declared_lost_and_started_again(children):
    kids, client, submitted = children
    kids.submit("bear")
    first = kids.runs["bear"][-1]
    client.set(first, "RUNNING", ago_s=300)
    client.heartbeats[first.id] = datetime.now(timezone.utc) - timedelta(seconds=10)
    kids.poll()  # a recent heartbeat: alive, though it started long ago
    assert kids.pending() == ["bear"] and not client.forced
    client.heartbeats[first.id] = datetime.now(timezone.utc) - timedelta(seconds=60)
    kids.poll()  # silent for longer than lost_after_s: Crashed, and a second run of the video
    assert client.forced == [(first.id, "CRASHED", False)]
    assert [r.name for r in kids.runs["bear"]] == ["bear", "bear-attempt-2"]
    assert submitted[-1][1] == "parent:bear:2"
    second = kids.runs["bear"][-1]
    client.set(second, "CRASHED")  # crashed again: no attempts left
    kids.poll()
    report = kids.report()["bear"]
    assert report["state"] == "CRASHED" and report["attempts"] == 2 and report["notes"] == ["bear crashed"]


def test_a_pending_run_whose_worker_vanished_is_lost_too(children):
    kids, client, _ = children
    kids.submit("bear")
    client.set(kids.runs["bear"][-1], "PENDING", ago_s=60)  # a slow start: not lost yet (2 x lost_after_s)
    kids.poll()
    assert len(kids.runs["bear"]) == 1
    client.set(kids.runs["bear"][-1], "PENDING", ago_s=100)  # taken by a worker that never started it
    kids.poll()
    assert len(kids.runs["bear"]) == 2 and kids.pending() == ["bear"]


def test_without_heartbeats_nothing_is_declared_lost(children):
    kids, client, _ = children
    kids.lost_after_s = None
    kids.submit("bear")
    client.set(kids.runs["bear"][-1], "RUNNING", ago_s=10_000)
    kids.poll()
    assert kids.pending() == ["bear"] and not client.forced


# ----------------------------------------------------------------------------- deployments, test hook


def test_prefect_yaml_describes_the_fanout_deployments():
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deps = {d["name"]: d for d in spec["deployments"]}
    assert deps["fanout-grid"]["entrypoint"] == "flows/fanout.py:fanout_grid_flow"
    assert deps["fanout-grid"]["work_pool"]["name"] == "audioscenic-grid"  # never a GPU worker's slot
    assert deps["video-stages"]["entrypoint"] == "flows/fanout.py:video_flow"
    assert deps["video-stages"]["work_pool"]["name"] == deps["nightly-grid"]["work_pool"]["name"]
    flow_name, dep_name = fanout.VIDEO_DEPLOYMENT.split("/")
    assert fanout.video_flow.name == flow_name and dep_name == "video-stages"
    assert fanout.fanout_grid_flow.name == "audioscenic-grid-fanout"


def test_stage_wait_hook_is_off_unless_set(monkeypatch):
    monkeypatch.delenv(stage.SIMULATED_WAIT_ENV, raising=False)
    t = time.monotonic()
    stage._simulated_wait("edit")
    assert time.monotonic() - t < 0.05
    monkeypatch.setenv(stage.SIMULATED_WAIT_ENV, "frames=0.3, edit=0.01")
    t = time.monotonic()
    stage._simulated_wait("frames")
    stage._simulated_wait("masks")
    assert 0.3 <= time.monotonic() - t < 1.0

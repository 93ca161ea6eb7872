"""Claims are leases: renewed while held, lapsed within one lease when their worker dies."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from storage import ArtifactStore, Ledger, StageKey
from storage.claims import Claims
from tasks.stage import WorkItem, run_items

REPO = Path(__file__).resolve().parents[1]


def test_a_held_claim_is_renewed_past_its_lease_and_freed_on_release(tmp_path):
    a, b = Claims(tmp_path, lease_s=0.6), Claims(tmp_path, lease_s=0.6)
    assert a.acquire("x")
    first = json.loads(Path(a._path("x")).read_text())["expires"]
    time.sleep(2.0)  # over three leases
    assert not b.acquire("x")  # still renewed by a's background thread
    assert json.loads(Path(a._path("x")).read_text())["expires"] > first + 1.0
    a.release("x")
    assert b.acquire("x") and b.holds("x") and not a.holds("x")
    b.release("x")
    assert list(tmp_path.iterdir()) == []


def test_a_claim_not_renewed_lapses_after_one_lease_and_its_old_owner_lets_go(tmp_path, caplog):
    frozen = Claims(tmp_path, lease_s=0.5, renew=False)  # a worker that stopped renewing (frozen, cut off)
    other = Claims(tmp_path, lease_s=0.5)
    assert frozen.acquire("x")
    assert not other.acquire("x")
    time.sleep(0.7)
    assert other.acquire("x")  # the lease lapsed: taken over
    frozen.renew()  # the old owner notices and never overwrites the new owner's claim
    assert other.holds("x") and "taken over" in caplog.text
    frozen.release("x")  # releasing a claim it lost is a no-op
    assert other.holds("x")
    other.release("x")


def test_lease_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="lease"):
        Claims(tmp_path, lease_s=0)


_WORKER = r"""
import sys, time
sys.path.insert(0, {repo!r})
import numpy as np
from storage import ArtifactStore, Ledger, StageKey
from storage.claims import Claims
from tasks.stage import WorkItem, run_items
claims = Claims({claims!r}, lease_s={lease})
claims.owner = {{**claims.owner, "host": "another-machine"}}  # its death cannot be seen from here
item = WorkItem("toy", "i0", "toy/i0", StageKey("toy", "1", "p", "in"))
def compute(it, w):
    w.write("x", np.zeros(2))
    print("computing", flush=True)
    time.sleep(3600)
run_items([item], ArtifactStore({store!r}), Ledger({ledger!r}), compute, claims=claims)
"""


def test_items_of_a_killed_worker_on_another_machine_are_taken_over_after_its_lease(tmp_path):
    lease = 1.5
    paths = dict(repo=str(REPO), claims=str(tmp_path / "claims"), store=str(tmp_path / "store.zarr"),
                 ledger=str(tmp_path / "ledger"), lease=lease)
    proc = subprocess.Popen([sys.executable, "-c", _WORKER.format(**paths)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "computing"
        time.sleep(lease)  # it has renewed its claim at least once by now
        proc.kill()  # SIGKILL mid-item: no release, no commit
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    item = WorkItem("toy", "i0", "toy/i0", StageKey("toy", "1", "p", "in"))
    store, ledger = ArtifactStore(tmp_path / "store.zarr"), Ledger(tmp_path / "ledger")
    assert not store.is_complete("toy/i0", item.key.key)  # nothing half-written looks complete
    t0 = time.monotonic()
    r = run_items([item], store, ledger, lambda it, w: w.write("x", np.ones(2)),
                  claims=Claims(tmp_path / "claims", lease_s=lease))
    waited = time.monotonic() - t0
    assert r.computed == ["i0"] and not r.busy and not r.failed
    assert waited < 4 * lease  # taken over once the dead worker's lease lapsed, not hours later
    assert np.array_equal(store.read("toy/i0", item.key.key)["x"], np.ones(2))
    assert list((tmp_path / "claims").iterdir()) == []


def test_a_release_during_a_renewal_leaves_no_claim_behind(tmp_path):
    """The renewer read the claim (still ours), then the item was released: the renewal must not
    write the claim back (found by scripts/check_pool.py: a claim left after the grid, blocking
    its item for a lease)."""
    import threading

    c = Claims(tmp_path, lease_s=60, renew=False)
    assert c.acquire("x")
    real_read, done = c._read, threading.Event()

    def read_then_release(path):  # the release lands between the renewer's read and its write
        info = real_read(path)
        if not done.is_set():
            done.set()
            t = threading.Thread(target=c.release, args=("x",))
            t.start()
            t.join(0.5)  # (with the renewal and the release serialised, it waits for the renewal)
        return info

    c._read = read_then_release
    c.renew()
    c._read = real_read
    for _ in range(50):
        if not list(tmp_path.glob("*.json")):
            break
        time.sleep(0.1)
    assert list(tmp_path.glob("*.json")) == []

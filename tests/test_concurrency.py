"""Two workers on overlapping grids share one store and ledger."""
import multiprocessing as mp

import numpy as np

from storage import ArtifactStore, Ledger
from storage.claims import Claims


def _worker(workdir, esc_root, wanted, barrier, out_q):
    from tasks import audio
    from tasks.catalog import build_catalog
    from tasks.config import config_from_dict

    cfg = config_from_dict({"workdir": workdir, "catalogs": {"audio": [{"kind": "esc50", "root": esc_root}]},
                            "grid": {"selection": "s", "subsets": {"s": {"audio": wanted}}}})
    catalog = build_catalog([{"kind": "esc50", "root": esc_root, "media": "audio"}])
    items = audio.work_items(cfg, catalog)
    encoder = audio.load_encoder(cfg)
    barrier.wait(60)  # start computing together
    r = audio.run_batch(cfg, items, ArtifactStore(cfg.store_url), Ledger(cfg.ledger_url), encoder=encoder,
                        claims=Claims(cfg.claims_url))
    out_q.put({"computed": r.computed, "adopted": r.adopted, "busy": r.busy, "failed": r.failed})


def test_overlapping_workers_do_each_item_once(tmp_path):
    from tasks.catalog import scan_esc50
    from tasks.sample_data import write_sample_data

    data = write_sample_data(tmp_path / "data", videos=1, clips=10, seed=5, frames=2)
    ids = sorted(e["name"].removesuffix(".wav") for e in scan_esc50(data.esc50_root).entries)
    a, b = ids[:7], ids[3:]  # 4 clips in common
    ctx = mp.get_context("spawn")
    barrier, q = ctx.Barrier(2), ctx.Queue()
    work = str(tmp_path / "work")
    procs = [ctx.Process(target=_worker, args=(work, str(data.esc50_root), w, barrier, q)) for w in (a, b)]
    for p in procs:
        p.start()
    results = [q.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    computed = results[0]["computed"] + results[1]["computed"]
    assert sorted(computed) == ids  # every clip computed, and exactly once
    assert all(not r["failed"] for r in results)
    for r in results:  # an overlapping item is either computed, adopted, or left to the other worker
        assert len(r["computed"]) + len(r["adopted"]) + len(r["busy"]) == 7

    store, ledger = ArtifactStore(tmp_path / "work" / "store.zarr"), Ledger(tmp_path / "work" / "ledger")
    latest = ledger.latest("audio")
    assert sorted(latest) == ids
    for clip, row in latest.items():
        got = store.read(f"audio/{clip}", row["key"])
        assert got is not None and np.isfinite(got["embedding"]).all() and got["envelope"].shape == (500,)
    ledger.compact()
    rows = ledger.read(stage="audio")
    assert sorted(rows["item_id"].to_pylist()) == ids  # no duplicate rows after compaction
    assert list((tmp_path / "work" / "ledger" / "claims").iterdir()) == []  # every claim released


def test_abandoned_claim_is_taken_over(tmp_path):
    import json

    c = Claims(tmp_path)
    path = c._path("x")
    (tmp_path / path.rsplit("/", 1)[-1]).write_text(json.dumps({"host": c.owner["host"], "pid": 2**22 + 12345, "time": 0, "token": "t"}))
    assert c.acquire("x")  # the owner process is gone
    other = Claims(tmp_path, lease_s=3600)
    other.owner = {**other.owner, "pid": -1}
    assert not other.acquire("x")  # a live claim is respected

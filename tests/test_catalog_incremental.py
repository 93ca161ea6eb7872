"""Issue 16: the catalog rescans through the workdir's hash state; status sees touched vs changed files right."""
from __future__ import annotations

import hashlib
import os

from storage import state as state_mod
from storage.state import HashState
from tasks.catalog import build_catalog, read_catalog
from tasks.config import load_config
from tasks.sample_data import write_sample_data
from tests.test_hash_state import age


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_catalog_rescan_reads_only_what_changed(tmp_path):
    data = write_sample_data(tmp_path / "data", videos=2, clips=3, seed=1, frames=4)
    for p in (tmp_path / "data").rglob("*"):
        if p.is_file():
            age(p)
    sources = [{"kind": "davis", "root": data.davis_root, "media": "video"},
               {"kind": "esc50", "root": data.esc50_root, "media": "audio"}]
    plain = build_catalog(sources)
    s = HashState(tmp_path / "s.json")
    first = build_catalog(sources, hashes=s)
    s.save()
    assert first.table().equals(plain.table())
    n_files = s.stats["hashed"]
    assert n_files == 2 * 4 * 2 + 3  # frames and annotation masks of 2 videos, 3 clips
    warm = HashState(tmp_path / "s.json")
    again = build_catalog(sources, hashes=warm, previous=first)
    assert again.table().equals(plain.table())
    assert warm.stats["hashed"] == 0 and warm.stats["hits"] == n_files
    # A touched clip is read again and its hash is unchanged; a changed one gets a new hash.
    clips = sorted((data.esc50_root / "audio").glob("*.wav"))
    os.utime(clips[0])
    clips[1].write_bytes(clips[1].read_bytes()[:-2] + b"\x01\x02")
    third = build_catalog(sources, hashes=warm, previous=again)
    assert warm.stats["hashed"] == 2
    old, new = again.by_id("audio"), third.by_id("audio")
    assert new[clips[0].stem]["content_hash"] == old[clips[0].stem]["content_hash"]
    assert new[clips[1].stem]["content_hash"] != old[clips[1].stem]["content_hash"]
    assert new[clips[1].stem]["content_hash"] == sha(clips[1].read_bytes())


def test_status_touched_is_done_changed_is_stale(tmp_path):
    """Through `status`: a touched-but-unchanged clip leaves every key as it was; a changed clip is stale."""
    from flows.status import status
    from storage import Ledger
    from tasks.catalog import update_catalog
    from tasks.config import QUICK_STAGES

    import yaml

    data = write_sample_data(tmp_path / "data", videos=1, clips=2, seed=2, frames=4)
    for p in (tmp_path / "data").rglob("*"):
        if p.is_file():
            age(p)

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "workdir": str(tmp_path / "work"),
        "catalogs": {"videos": [{"kind": "davis", "root": str(data.davis_root)}],
                     "audio": [{"kind": "esc50", "root": str(data.esc50_root)}]},
        "models": {"preset": "tiny"}, "stages": QUICK_STAGES,
    }))
    cfg = load_config(config)
    update_catalog(cfg)
    from tasks import audio

    catalog = read_catalog(cfg.catalog_path)
    items = audio.work_items(cfg, catalog)
    Ledger(cfg.ledger_url).append([dict(stage="audio", item_id=it.item_id, key=it.key.key, code_version=it.key.code_version,
                                        params_hash=it.key.params_hash, inputs_hash=it.key.inputs_hash,
                                        upstream_keys=it.key.upstream_json()) for it in items])
    assert status(cfg)["stages"]["audio"]["done"] == 2
    clips = sorted((data.esc50_root / "audio").glob("*.wav"))
    st = os.stat(clips[0])
    os.utime(clips[0], ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))
    state = state_mod.open_state(cfg.workdir)
    before = state.stats["hashed"]
    report = status(cfg)["stages"]["audio"]
    assert state.stats["hashed"] == before + 1  # the touched file was read again ...
    assert (report["done"], report["stale"]) == (2, 0)  # ... and found unchanged
    clips[1].write_bytes(clips[1].read_bytes()[:-2] + b"\x03\x04")
    report = status(cfg)["stages"]["audio"]
    assert (report["done"], report["stale"]) == (1, 1)
    assert report["items"] == [{"item": clips[1].stem, "state": "stale", "reasons": ["input content changed"]}]

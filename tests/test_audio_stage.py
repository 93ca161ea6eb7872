"""The audio stage over catalog clips: Zarr artifacts, ledger rows, incremental reruns."""
import numpy as np
import pytest

from storage import ArtifactStore, Ledger
from tasks import audio
from tasks.catalog import build_catalog
from tasks.config import config_from_dict
from tasks.sample_data import write_sample_data
from tasks.stage import plan, todo
from tests.conftest import fixtures_dir


def setup(tmp_path, audio_sources, **stage):
    cfg = config_from_dict({"workdir": str(tmp_path / "work"), "catalogs": {"audio": audio_sources},
                            "stages": {"audio": stage}})
    store, ledger = ArtifactStore(cfg.store_url), Ledger(cfg.ledger_url)
    return cfg, store, ledger


def catalog_of(cfg):
    return build_catalog([{"kind": s.kind, "root": s.root, "media": "audio"} for s in cfg.catalogs.audio])


@pytest.fixture(scope="module")
def encoder():
    from models.imagebind_audio import ImageBindAudioEncoder

    return ImageBindAudioEncoder.tiny(seed=0).eval()


def test_stage_writes_features_and_reruns_incrementally(tmp_path, encoder):
    data = write_sample_data(tmp_path / "data", videos=1, clips=4, seed=1, frames=2)
    cfg, store, ledger = setup(tmp_path, [{"kind": "esc50", "root": str(data.esc50_root)}])
    items = audio.work_items(cfg, catalog_of(cfg))
    assert [e.state for e in plan(items, ledger)] == ["missing"] * 4
    r = audio.run_batch(cfg, items, store, ledger, encoder=encoder)
    assert sorted(r.computed) == sorted(i.item_id for i in items) and not r.failed

    for it in items:
        got = store.read(it.artifact, it.key.key)
        assert got["embedding"].shape == (1024,) and got["embedding"].dtype == np.float32
        # mean of three clip embeddings, each L2-normalised x 20
        assert 0 < np.linalg.norm(got["embedding"]) <= 20 + 1e-4
        # rate-independent features of the 5 s clips: a 100 Hz envelope and 10 ms log-Mel frames
        assert got["envelope"].shape == (500,) and got["envelope"].dtype == np.float32
        assert got["envelope"].min() >= 0 and got["envelope"].max() > 0
        assert got["mel"].shape == (500, 128) and np.isfinite(got["mel"]).all()
        attrs = store.attrs(it.artifact)
        assert attrs["sample_rate"] == 44100 and attrs["duration_s"] == pytest.approx(5.0)
        assert attrs["mel_duration_s"] == pytest.approx(5.0) and attrs["envelope_rate"] == 100
        # any span's M_a / F_a come from them: 8 frames at 24 fps = the clip's first 1/3 s
        feats = audio.read_features(store, it.artifact, it.key.key)
        cond = audio.span_condition(feats, 8, audio.frame_edges(8, 24.0), 0.25)
        assert cond["magnitude"].shape == (8,) and float(cond["magnitude"].mean()) == pytest.approx(1.0, abs=1e-5)
        assert cond["mel"].shape == (8, 128) and np.isfinite(cond["mel"].numpy()).all()

    # Unchanged inputs: nothing to do.
    items2 = audio.work_items(cfg, catalog_of(cfg))
    assert todo(plan(items2, ledger)) == []
    assert ledger.read(stage="audio").num_rows == 4

    # One clip's bytes change: exactly that clip is stale, and only it is recomputed.
    clip = data.esc50_root / "audio" / data.clips[2]
    raw = bytearray(clip.read_bytes())
    raw[-100] ^= 0x40
    clip.write_bytes(bytes(raw))
    items3 = audio.work_items(cfg, catalog_of(cfg))
    entries = plan(items3, ledger)
    stale = [e for e in entries if e.state != "done"]
    assert [e.item.item_id for e in stale] == [clip.stem]
    assert stale[0].reasons == ("input content changed",)
    r = audio.run_batch(cfg, todo(entries), store, ledger, encoder=encoder)
    assert r.computed == [clip.stem]
    rows = ledger.read(stage="audio")
    per_item = {i: rows["item_id"].to_pylist().count(i) for i in set(rows["item_id"].to_pylist())}
    assert per_item == {i.item_id: (2 if i.item_id == clip.stem else 1) for i in items3}


def test_parameter_and_code_version_changes(tmp_path, encoder):
    data = write_sample_data(tmp_path / "data", videos=1, clips=2, seed=2, frames=2)
    src = [{"kind": "esc50", "root": str(data.esc50_root)}]
    cfg, store, ledger = setup(tmp_path, src)
    audio.run_batch(cfg, audio.work_items(cfg, catalog_of(cfg)), store, ledger, encoder=encoder)
    cfg_m, _, _ = setup(tmp_path, src, n_mels=64)
    assert {e.reasons for e in plan(audio.work_items(cfg_m, catalog_of(cfg_m)), ledger)} == {("parameters changed",)}
    # the temperature shapes each edit's M_a, not the stored features: nothing to recompute here
    cfg_t, _, _ = setup(tmp_path, src, temperature=0.5)
    assert todo(plan(audio.work_items(cfg_t, catalog_of(cfg_t)), ledger)) == []
    cfg_v, _, _ = setup(tmp_path, src, code_version="3")
    assert {e.reasons for e in plan(audio.work_items(cfg_v, catalog_of(cfg_v)), ledger)} == {("code_version 2 -> 3",)}


def test_bad_clip_fails_alone(tmp_path, encoder):
    from tests.media_factory import write_wav

    folder = tmp_path / "clips"
    folder.mkdir()
    write_wav(folder / "good.wav", np.random.default_rng(0).normal(0, 0.1, 16000), 16000)
    write_wav(folder / "nan.wav", np.zeros(16000), 16000)
    cfg, store, ledger = setup(tmp_path, [{"kind": "folder", "root": str(folder)}])
    items = audio.work_items(cfg, catalog_of(cfg))
    # Corrupt a clip after cataloguing (e.g. truncated on a network share while the batch waits).
    (folder / "nan.wav").write_bytes((folder / "nan.wav").read_bytes()[:30])
    r = audio.run_batch(cfg, items, store, ledger, encoder=encoder)
    assert r.computed == ["good"]
    assert list(r.failed) == ["nan"] and "nan.wav" in r.failed["nan"]
    failed = ledger.read(stage="audio", status="failed").to_pylist()
    assert failed[0]["item_id"] == "nan" and "nan.wav" in failed[0]["error"]
    assert store.status("audio/nan") == "incomplete"
    # The failure is reported by plan, with its message, and retried next run.
    (entry,) = [e for e in plan(items, ledger) if e.state != "done"]
    assert entry.state == "failed" and "nan.wav" in entry.reasons[0]


def test_crash_after_commit_is_adopted_not_recomputed(tmp_path, encoder):
    data = write_sample_data(tmp_path / "data", videos=1, clips=1, seed=3, frames=2)
    cfg, store, ledger = setup(tmp_path, [{"kind": "esc50", "root": str(data.esc50_root)}])
    items = audio.work_items(cfg, catalog_of(cfg))
    audio.run_batch(cfg, items, store, Ledger(tmp_path / "scratch-ledger"), encoder=encoder)  # rows "lost"
    r = audio.run_batch(cfg, items, store, ledger, encoder=encoder)
    assert r.adopted == [items[0].item_id] and r.computed == []
    assert todo(plan(items, ledger)) == []


@pytest.mark.skipif(fixtures_dir() is None, reason="real media fixtures not present (set AUDIOSCENIC_FIXTURES)")
def test_real_fixture_clips_go_through_the_stage(tmp_path, encoder):
    cfg, store, ledger = setup(tmp_path, [{"kind": "folder", "root": str(fixtures_dir() / "audio")}])
    items = audio.work_items(cfg, catalog_of(cfg))
    assert len(items) == 6
    r = audio.run_batch(cfg, items, store, ledger, encoder=encoder)
    assert r.failed == {} and len(r.computed) == 6
    for it in items:
        got = store.read(it.artifact, it.key.key)
        assert got["mel"].shape[1] == 128 and np.isfinite(got["embedding"]).all()
        assert abs(got["envelope"].shape[0] - got["mel"].shape[0]) <= 1

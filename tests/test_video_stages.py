"""The video stages (frames, masks, depth, latents) on generated data, tiny presets, 64 px."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from storage import Ledger
from tasks import depth, frames, latents, masks
from tasks.catalog import build_catalog
from tasks.config import config_from_dict
from tasks.sample_data import VIDEO_OBJECTS, render_video
from tasks.stage import plan, todo
from tasks.stage_task import StageCachePolicy, open_store_and_ledger
from tasks.video import resize_crop_frame, resize_crop_mask
from tests.conftest import fixtures_dir
from tests.media_factory import write_mp4

STAGES = [frames, masks, depth, latents]
R = 64


def make_cfg(workdir: Path, preset: str = "tiny", paths: dict | None = None, **video):
    if "num_frames" in video:  # a fixed frame count: the "frames" span (the default covers the whole video)
        video = {"span": "frames", **video}
    video = {"resolution": R, "mask_source": "dataset", **video}
    models = {"preset": preset, "paths": paths or {}}
    return config_from_dict({"workdir": str(workdir), "models": models, "stages": {"video": video}})


def run_all(cfg, catalog, stages=STAGES):
    store, ledger = open_store_and_ledger(cfg)
    return {m.STAGE: m.run_batch(cfg, m.work_items(cfg, catalog), store, ledger) for m in stages}


def read(cfg, mod, video_id, catalog):
    store, _ = open_store_and_ledger(cfg)
    item = next(i for i in mod.work_items(cfg, catalog) if i.item_id == video_id)
    return store.read(item.artifact, item.key.key), store.attrs(item.artifact, item.key.key)


@pytest.fixture(scope="module")
def done(sample_data, tmp_path_factory):
    """The four stages run once over the session's sample DAVIS set (2 videos x 8 frames, 96 x 128)."""
    catalog = build_catalog([{"kind": "davis", "root": sample_data.davis_root, "media": "video"}])
    cfg = make_cfg(tmp_path_factory.mktemp("video-work"))
    results = run_all(cfg, catalog)
    return cfg, catalog, results


def test_all_stages_compute_every_video(done):
    _, _, results = done
    for stage, r in results.items():
        assert sorted(r.computed) == ["ball", "car"] and not r.failed, stage


def test_frames_are_resized_centre_cropped_jpeg_frames(done, sample_data):
    cfg, catalog, _ = done
    data, attrs = read(cfg, frames, "ball", catalog)
    f = data["frames"]
    assert f.shape == (8, R, R, 3) and f.dtype == np.uint8
    assert attrs["source_indices"] == list(range(8)) and attrs["source_size"] == [96, 128]
    jpg = sample_data.davis_root / "JPEGImages/480p/ball/00005.jpg"
    assert np.array_equal(f[5], resize_crop_frame(Image.open(jpg), R))
    # centre crop of a 128-wide frame: columns 16..112 of the source fill the square
    src = np.asarray(Image.open(jpg).convert("RGB"), np.float32)
    expect = np.asarray(Image.fromarray(src[:, 16:112].astype(np.uint8)).resize((R, R), Image.Resampling.BICUBIC), np.float32)
    assert np.abs(f[5].astype(np.float32) - expect).mean() < 1.0


def test_dataset_masks_reproduce_the_synthetic_ground_truth(done):
    cfg, catalog, _ = done
    for i, (name, colour) in enumerate(VIDEO_OBJECTS[:2]):
        _, truth = render_video(0 * 1000 + i, 8, 96, 128, colour)  # write_davis's seed for video i
        expect = np.stack([resize_crop_mask(m, R) for m in truth])
        data, attrs = read(cfg, masks, name, catalog)
        got = data["masks"]
        assert got.shape == (8, R, R) and got.dtype == bool and attrs["source"] == "dataset"
        assert np.array_equal(got, expect), name
        assert 0.03 < got.mean() < 0.5  # a real object, not all/none
    # the object is where the mask says: its colour dominates inside, not outside
    f = read(cfg, frames, "ball", catalog)[0]["frames"].astype(float)
    m = read(cfg, masks, "ball", catalog)[0]["masks"]
    red_in = (f[..., 0] - f[..., 1])[m].mean()
    red_out = (f[..., 0] - f[..., 1])[~m].mean()
    assert red_in > 100 and red_out < 60


def test_depth_and_latents_shapes_dtypes_and_values(done):
    from models.vae import FrameVAE

    cfg, catalog, _ = done
    f = read(cfg, frames, "car", catalog)[0]["frames"]
    d, dattrs = read(cfg, depth, "car", catalog)
    d = d["depth"]
    assert d.shape == (8, R, R) and d.dtype == np.float16 and dattrs["dtype"] == "float16"
    assert np.all(d.reshape(8, -1).min(1) == 0) and np.all(d.reshape(8, -1).max(1) == 1)
    z, zattrs = read(cfg, latents, "car", catalog)
    z = z["latents"]
    assert z.shape == (8, 4, R // 8, R // 8) and z.dtype == np.float32
    assert zattrs["scaling_factor"] == pytest.approx(0.18215)
    assert np.allclose(z, FrameVAE.tiny(0).encode(f, chunk=8).numpy(), atol=1e-5)  # chunking does not matter


def test_rerun_does_no_work_and_changes_propagate(done):
    cfg, catalog, _ = done
    store, ledger = open_store_and_ledger(cfg)
    for mod in STAGES:
        entries = plan(mod.work_items(cfg, catalog), ledger)
        assert [e.state for e in entries] == ["done", "done"], mod.STAGE
        r = mod.run_batch(cfg, todo(entries), store, ledger)
        assert r.computed == [] and r.adopted == [] and r.failed == {}
    # a new resolution: frames see new parameters, every downstream stage a new upstream
    bigger = make_cfg(cfg.workdir, resolution=2 * R)
    for mod in STAGES:
        entry = plan(mod.work_items(bigger, catalog), ledger)[0]
        assert entry.state == "stale"
        assert entry.reasons == (("parameters changed",) if mod is frames else ("upstream changed: frames",))


def test_frame_selection_stride_and_start(sample_data, tmp_path):
    catalog = build_catalog([{"kind": "davis", "root": sample_data.davis_root, "media": "video", "include": ["car"]}])
    cfg = make_cfg(tmp_path, num_frames=3, stride=2, start=1)
    run_all(cfg, catalog, [frames, masks])
    data, attrs = read(cfg, frames, "car", catalog)
    assert attrs["source_indices"] == [1, 3, 5] and data["frames"].shape == (3, R, R, 3)
    _, truth = render_video(1, 8, 96, 128, VIDEO_OBJECTS[1][1])
    assert np.array_equal(read(cfg, masks, "car", catalog)[0]["masks"], np.stack([resize_crop_mask(truth[i], R) for i in (1, 3, 5)]))
    # one object id: the synthetic annotations use id 1; id 2 is absent
    only2 = make_cfg(tmp_path / "id2", num_frames=3, stride=2, start=1, mask_object_id=2)
    run_all(only2, catalog, [frames, masks])
    assert not read(only2, masks, "car", catalog)[0]["masks"].any()


def test_grounded_sam_xmem_masks_on_tiny_presets(done, tmp_path, monkeypatch):
    from models.grounded_sam import GroundedSAM

    _, catalog, _ = done
    cfg = make_cfg(tmp_path, mask_source="grounded_sam", box_threshold=0.0, text_threshold=0.0, xmem={"mem_every": 2})
    builds = []
    real = masks.load_grounded_sam
    monkeypatch.setattr(masks, "load_grounded_sam", lambda c: builds.append(1) or real(c))
    r = run_all(cfg, catalog, [frames, masks])
    assert sorted(r["masks"].computed) == ["ball", "car"] and not r["masks"].failed
    assert len(builds) == 1  # one model load per batch, not per video
    f = read(cfg, frames, "ball", catalog)[0]["frames"]
    data, attrs = read(cfg, masks, "ball", catalog)
    m = data["masks"]
    assert m.shape == (8, R, R) and m.dtype == bool
    assert attrs["caption"] == "ball." and len(attrs["detection"]["box"]) == 4
    first, det = GroundedSAM.tiny(0).first_mask(f[0], "ball", 0.0, 0.0)
    assert np.array_equal(m[0], first) and det.as_dict() == attrs["detection"]
    # the XMem settings are part of the key: another mem_every is another artifact
    other = make_cfg(tmp_path, mask_source="grounded_sam", box_threshold=0.0, text_threshold=0.0, xmem={"mem_every": 3})
    assert masks.work_items(other, catalog)[0].key.key != masks.work_items(cfg, catalog)[0].key.key


def test_bad_inputs_fail_alone_with_clear_messages(tmp_path):
    from tasks.sample_data import write_davis

    root = tmp_path / "davis"
    write_davis(root, num_videos=4, num_frames=8, height=48, width=64, seed=2)  # ball, car, dog, kite
    clips = tmp_path / "clips"
    clips.mkdir()
    one, _ = render_video(9, 1, 48, 64, (200, 200, 200))
    write_mp4(clips / "single.mp4", one)
    catalog = build_catalog(
        [{"kind": "davis", "root": root, "media": "video"}, {"kind": "folder", "root": clips, "media": "video"}]
    )
    assert sorted(e["id"] for e in catalog.entries) == ["ball", "car", "dog", "kite", "single"]
    # damage after cataloguing: an unreadable JPEG inside 'car', one annotation less for 'dog'
    (root / "JPEGImages/480p/car/00003.jpg").write_bytes(b"not a jpeg at all")
    (root / "Annotations/480p/dog/00007.png").unlink()
    png = root / "Annotations/480p/kite/00002.png"
    Image.open(png).resize((32, 24), Image.Resampling.NEAREST).save(png)  # a mask of another size than its frame

    cfg = make_cfg(tmp_path / "w", num_frames=8)
    store, ledger = open_store_and_ledger(cfg)
    r = frames.run_batch(cfg, frames.work_items(cfg, catalog), store, ledger)
    assert sorted(r.computed) == ["ball", "dog", "kite"]
    assert "video 'car'" in r.failed["car"] and "car/00003.jpg" in r.failed["car"] and "not a readable image" in r.failed["car"]
    assert r.failed["single"].endswith(
        "video 'single': has 1 frame (%s); 8 frames at stride 1 from frame 0 need 8. "
        "Lower stages.video.num_frames/stride/start or leave the video out." % (clips / "single.mp4")
    )

    r = masks.run_batch(cfg, masks.work_items(cfg, catalog), store, ledger)
    assert r.computed == ["ball"]
    assert "video 'dog': has 7 annotation masks for 8 frames" in r.failed["dog"]
    assert "video 'kite': annotation 00002.png is 32x24, its frame is 64x48" in r.failed["kite"]
    assert "video 'car': its frames artifact video/car/frames is incomplete" in r.failed["car"]
    assert "the frames stage must succeed first" in r.failed["car"]

    failed = ledger.read(stage="frames", status="failed").to_pylist()
    assert sorted(row["item_id"] for row in failed) == ["car", "single"]
    assert all(f"Error: video '{row['item_id']}': " in row["error"] for row in failed)

    # missing weights: every item fails with the folder it looked for, nothing crashes
    paper = make_cfg(tmp_path / "w", preset="paper", paths={"depth": str(tmp_path / "no-dpt"), "base": str(tmp_path / "no-sd")},
                     num_frames=8)
    for mod, what in ((depth, "no-dpt"), (latents, "no-sd/vae")):
        items = [i for i in mod.work_items(paper, catalog) if i.item_id in ("ball", "dog")]
        r = mod.run_batch(paper, items, store, ledger)
        assert sorted(r.failed) == ["ball", "dog"] and r.computed == []
        assert "MissingWeightsError" in r.failed["ball"] and what in r.failed["ball"] and "video 'ball'" in r.failed["ball"]
    assert [e.state for e in plan(depth.work_items(paper, catalog), ledger) if e.item.item_id == "ball"] == ["failed"]


def test_cache_policy_follows_the_ledger(done, tmp_path):
    cfg, catalog, _ = done
    policy = StageCachePolicy()
    items = frames.work_items(cfg, catalog)
    key = policy.compute_key(None, {"cfg": cfg, "items": items}, {})
    assert isinstance(key, str) and len(key) == 64
    # an item not recorded done under its key: no cached answer, the batch must run
    fresh = make_cfg(tmp_path)
    assert policy.compute_key(None, {"cfg": fresh, "items": frames.work_items(fresh, catalog)}, {}) is None


def test_prefect_task_runs_a_batch(prefect_server, sample_data, tmp_path):
    from prefect import flow

    catalog = build_catalog([{"kind": "davis", "root": sample_data.davis_root, "media": "video"}])
    cfg = make_cfg(tmp_path, num_frames=2)

    @flow
    def video_flow():
        return [frames.stage_task(cfg, frames.work_items(cfg, catalog)), latents.stage_task(cfg, latents.work_items(cfg, catalog))]

    f, z = video_flow()
    assert sorted(f["computed"]) == ["ball", "car"] and sorted(z["computed"]) == ["ball", "car"]
    assert not f["failed"] and not z["failed"]
    assert Ledger(cfg.ledger_url).read(stage="latents", status="done").num_rows == 2


def test_real_fixture_videos_go_through_frames_depth_latents(tmp_path):
    fx = fixtures_dir()
    if fx is None or not (fx / "video").is_dir():
        pytest.skip("no real fixture videos")
    catalog = build_catalog([{"kind": "folder", "root": fx / "video", "media": "video"}])
    assert len(catalog.entries) >= 2
    cfg = make_cfg(tmp_path, num_frames=4, stride=5)
    results = run_all(cfg, catalog, [frames, depth, latents])
    ids = sorted(e["id"] for e in catalog.entries)
    for stage, r in results.items():
        assert sorted(r.computed) == ids and not r.failed, stage
    for vid in ids:
        f, fattrs = read(cfg, frames, vid, catalog)
        assert f["frames"].shape == (4, R, R, 3) and fattrs["source_indices"] == [0, 5, 10, 15]
        assert f["frames"].std() > 10  # real pictures, not blank
        d = read(cfg, depth, vid, catalog)[0]["depth"]
        assert d.shape == (4, R, R) and d.dtype == np.float16 and d.min() == 0 and d.max() == 1
        z = read(cfg, latents, vid, catalog)[0]["latents"]
        assert z.shape == (4, 4, R // 8, R // 8) and np.isfinite(z).all()


def test_items_claimed_by_another_worker_are_waited_for_not_computed_twice(sample_data, tmp_path):
    import threading
    import time

    from storage.claims import Claims

    catalog = build_catalog([{"kind": "davis", "root": sample_data.davis_root, "media": "video"}])
    cfg = make_cfg(tmp_path, num_frames=2)
    store, ledger = open_store_and_ledger(cfg)
    items = frames.work_items(cfg, catalog)
    other = Claims(cfg.claims_url)
    held = f"{items[0].artifact}@{items[0].key.key}"
    assert other.acquire(held)

    def other_worker_computes_it():  # the other worker commits its item a moment later
        time.sleep(1.0)
        frames.run_batch(cfg, items[:1], store, ledger)
        other.release(held)

    t = threading.Thread(target=other_worker_computes_it)
    t.start()
    r = frames.run_batch(cfg, items, store, ledger, claims=Claims(cfg.claims_url))
    t.join()
    # Not computed twice: this batch did its own item, then waited for the claimed one and adopted it.
    assert r.computed == [items[1].item_id] and r.adopted == [items[0].item_id] and r.busy == []


def test_paper_preset_reads_local_folders_and_fingerprints_them(done, tmp_path):
    import os

    from models.depth import DepthEstimator
    from models.vae import FrameVAE

    _, catalog, _ = done
    DepthEstimator.tiny(3).save(tmp_path / "dpt")
    FrameVAE.tiny(3).save_as_base(tmp_path / "sd")
    paths = {"depth": str(tmp_path / "dpt"), "base": str(tmp_path / "sd")}
    cfg = make_cfg(tmp_path / "w", preset="paper", paths=paths, num_frames=2)
    r = run_all(cfg, catalog, [frames, depth, latents])
    assert sorted(r["depth"].computed) == ["ball", "car"] and sorted(r["latents"].computed) == ["ball", "car"]
    f = read(cfg, frames, "ball", catalog)[0]["frames"]
    assert np.allclose(read(cfg, latents, "ball", catalog)[0]["latents"], FrameVAE.tiny(3).encode(f).numpy(), atol=1e-5)
    # replacing the weights (new mtime) changes the keys: the depth maps become stale
    before, latents_before = depth.work_items(cfg, catalog)[0].key.key, latents.work_items(cfg, catalog)[0].key.key
    weights = tmp_path / "dpt" / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert depth.work_items(cfg, catalog)[0].key.key != before
    assert latents.work_items(cfg, catalog)[0].key.key == latents_before  # other models' weights do not matter

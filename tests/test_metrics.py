"""Metrics: masked SSIM against scikit-image, CLIP scores on constructed embeddings, the CLIP loader, the stage."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.ndimage import binary_dilation
from skimage.metrics import structural_similarity

from models.checkpoints import MissingWeightsError
from models.clip_scorer import ClipScorer
from storage import StageKey
from tasks import metrics
from tasks.catalog import Catalog
from tasks.config import config_from_dict
from tasks.metrics import SSIM_RADIUS, clip_scores, label_text, masked_ssim
from tasks.stage import WorkItem, plan
from tasks.stage_task import open_store_and_ledger


def _frames(rng, f=3, h=40, w=52):
    """Smooth structure plus noise, so the SSIM map varies over the image."""
    y, x = np.mgrid[0:h, 0:w]
    base = 120 + 60 * np.sin(x / 5.0)[..., None] * np.cos(y / 7.0)[..., None] * np.array([1.0, 0.6, -0.8])
    return np.clip(base[None] + rng.normal(0, 20, (f, h, w, 3)), 0, 255).astype(np.uint8)


def _skimage_reference(a, b, m):
    maps = [
        structural_similarity(a[i], b[i], channel_axis=-1, gaussian_weights=True, sigma=1.5,
                              use_sample_covariance=False, data_range=255, full=True)[1]
        for i in range(len(a))
    ]
    return float(np.stack(maps).mean(axis=-1)[m].mean())


def test_masked_ssim_equals_skimage_map_averaged_over_the_mask():
    rng = np.random.default_rng(0)
    a = _frames(rng)
    b = np.clip(a.astype(int) + rng.integers(-40, 40, a.shape), 0, 255).astype(np.uint8)
    m = np.zeros(a.shape[:3], bool)
    m[:, 8:30, 10:25] = True
    m[1, :, :3] = True  # touches the border: the map's reflected edges count too
    assert abs(masked_ssim(a, b, m) - _skimage_reference(a, b, m)) <= 1e-6
    assert masked_ssim(a, a, m) == pytest.approx(1.0, abs=1e-12)


def test_changes_farther_than_the_window_do_not_move_masked_ssim():
    rng = np.random.default_rng(1)
    a = _frames(rng)
    b = np.clip(a.astype(int) + rng.integers(-30, 30, a.shape), 0, 255).astype(np.uint8)
    m = np.zeros(a.shape[:3], bool)
    m[:, 15:25, 20:30] = True
    reach = binary_dilation(m, structure=np.ones((1, 2 * SSIM_RADIUS + 1, 2 * SSIM_RADIUS + 1), bool))
    far = b.copy()
    far[~reach] = rng.integers(0, 256, (int((~reach).sum()), 3))  # anything at all beyond the window
    assert masked_ssim(a, far, m) == masked_ssim(a, b, m)
    near = b.copy()
    near[:, 15:25, 20 - SSIM_RADIUS] = 255 - near[:, 15:25, 20 - SSIM_RADIUS]  # within the window: it counts
    assert masked_ssim(a, near, m) != masked_ssim(a, b, m)


def test_masked_ssim_edge_cases():
    a = np.zeros((2, 16, 16, 3), np.uint8)
    assert math.isnan(masked_ssim(a, a, np.zeros((2, 16, 16), bool)))
    with pytest.raises(ValueError, match="mask"):
        masked_ssim(a, a, np.ones((2, 16, 15), bool))
    with pytest.raises(ValueError, match="uint8"):
        masked_ssim(a.astype(np.float32), a, np.ones((2, 16, 16), bool))


def test_scene_change_correlation_follows_the_loudness_and_ignores_the_object():
    from scipy.stats import pearsonr

    rng = np.random.default_rng(3)
    src = rng.integers(0, 256, (6, 16, 16, 3)).astype(np.uint8)
    mask = np.zeros((6, 16, 16), bool)
    mask[:, 4:9, 4:9] = True
    mag = np.array([0.2, 1.5, 0.4, 2.0, 0.9, 1.0])
    out = src.astype(np.int64)
    out[~mask] += np.repeat(np.round(20 * mag).astype(np.int64), (~mask).sum((1, 2)))[:, None]  # scene: +20 M_a
    out[mask] = 255 - out[mask]  # the object changes a lot, and not with M_a
    out = np.clip(out, 0, 255).astype(np.uint8)
    change = [np.abs(out[k].astype(float) - src[k])[~mask[k]].mean() for k in range(6)]
    got = metrics.scene_change_correlation(src, out, mask, mag)
    assert got == pytest.approx(pearsonr(change, mag).statistic, abs=1e-12) and got > 0.95
    assert metrics.scene_change_correlation(src, out, mask, -mag) == pytest.approx(-got, abs=1e-12)
    # undefined: a flat M_a, an unchanged scene, fewer than two frames with scene pixels
    assert math.isnan(metrics.scene_change_correlation(src, out, mask, np.ones(6)))
    assert math.isnan(metrics.scene_change_correlation(src, src, mask, mag))
    assert math.isnan(metrics.scene_change_correlation(src[:1], out[:1], mask[:1], mag[:1]))
    with pytest.raises(ValueError, match="do not agree"):
        metrics.scene_change_correlation(src, out, mask, mag[:5])


def test_clip_f_of_identical_frames_is_one_and_temp_s_is_the_product():
    frame = torch.randn(16)
    s = clip_scores(frame.repeat(5, 1) * torch.arange(1, 6)[:, None], torch.randn(16))  # norms differ, directions not
    assert s["clip_f"] == pytest.approx(1.0, abs=1e-12)
    rng = np.random.default_rng(2)
    s = clip_scores(rng.normal(size=(4, 8)), rng.normal(size=8))
    assert s["temp_s"] == pytest.approx(s["clip_f"] * s["clip_t"], rel=1e-12)
    assert s["sem_a"] is None


def test_clip_t_is_100_times_the_cosine_and_clip_f_averages_ordered_pairs():
    frames = np.array([[3.0, 4.0, 0.0], [0.0, 2.0, 0.0], [1.0, 1.0, 1.0]])
    text = np.array([[0.0, 5.0, 0.0]])
    cos = frames @ text[0] / (np.linalg.norm(frames, axis=1) * 5.0)
    s = clip_scores(frames, text)
    assert s["clip_t"] == pytest.approx(100 * cos.mean(), abs=1e-9)
    assert s["clip_t_frames"] == pytest.approx(list(100 * cos), abs=1e-9)
    unit = frames / np.linalg.norm(frames, axis=1, keepdims=True)
    pairs = [unit[i] @ unit[j] for i in range(3) for j in range(3) if i != j]
    assert s["clip_f"] == pytest.approx(np.mean(pairs), abs=1e-12)


def test_sem_a_counts_frames_closer_to_the_target_text():
    target, source = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    frames = np.array([
        [0.9, 0.1, 0.3],  # target
        [0.2, 0.8, 0.0],  # source
        [0.6, 0.5, 0.1],  # target
        [0.5, 0.5, 0.2],  # a tie is not "exceeds"
        [0.7, 0.0, 0.7],  # target
    ])
    s = clip_scores(torch.tensor(frames), torch.tensor(target), torch.tensor(source))
    assert s["sem_a"] == pytest.approx(3 / 5)
    assert clip_scores(frames, source, target)["sem_a"] == pytest.approx(1 / 5)


def test_clip_scores_reject_bad_shapes():
    with pytest.raises(ValueError, match="one text"):
        clip_scores(np.ones((2, 4)), np.ones((2, 4)))
    with pytest.raises(ValueError, match="width"):
        clip_scores(np.ones((2, 4)), np.ones(3))
    assert math.isnan(clip_scores(np.ones((1, 4)), np.ones(4))["clip_f"])


def test_label_text():
    assert label_text("crackling_fire") == "a photo of crackling fire"
    assert label_text("sea waves", "the sound of {label}") == "the sound of sea waves"
    with pytest.raises(ValueError, match="label"):
        label_text(None)


def test_clip_scorer_saves_and_loads_its_folder(tmp_path):
    scorer = ClipScorer.tiny(seed=3)
    frames = np.random.default_rng(0).integers(0, 256, (3, 40, 48, 3), dtype=np.uint8)
    texts = ["a photo of rain", "a photo of crackling fire"]
    scorer.save(tmp_path / "clip")
    loaded = ClipScorer.from_folder(tmp_path / "clip")
    assert torch.allclose(loaded.embed_images(frames, batch_size=2), scorer.embed_images(frames), atol=1e-6)
    assert torch.allclose(loaded.embed_texts(texts), scorer.embed_texts(texts), atol=1e-6)
    assert scorer.embed_images(frames).shape == (3, 16)
    # openai/clip-vit-large-patch14 ships the older feature-extractor form of this file (int sizes).
    (tmp_path / "clip" / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": 32, "do_center_crop": True, "do_normalize": True, "do_resize": True, "resample": 3, "size": 32,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
    }))
    legacy = ClipScorer.from_folder(tmp_path / "clip")
    assert torch.allclose(legacy.embed_images(frames), scorer.embed_images(frames), atol=1e-6)
    with pytest.raises(MissingWeightsError, match="config.json"):
        ClipScorer.from_folder(tmp_path / "nowhere", setting="models.paths.clip")


# ----------------------------------------------------------------------------- the stage, on synthetic artifacts

R, F = 24, 4


def _setup(tmp_path):
    """Frames, masks and magnitudes written under the real stages' keys; two edits of one video."""
    from tasks import audio as audio_stage
    from tasks import frames as frames_stage
    from tasks import masks as masks_stage

    cfg = config_from_dict({"workdir": str(tmp_path), "models": {"preset": "tiny"},
                            "stages": {"video": {"resolution": R, "num_frames": F, "mask_source": "dataset"}}})
    catalog = Catalog(entries=[
        {"id": "car", "media": "video", "kind": "frames", "path": "-", "label": "car", "content_hash": "v1",
         "annotations_hash": "m1"},
        {"id": "rain-1", "media": "audio", "kind": "audio_file", "path": "-", "label": "rain", "content_hash": "a1"},
        {"id": "fire-1", "media": "audio", "kind": "audio_file", "path": "-", "label": "crackling_fire",
         "content_hash": "a2"},
    ])
    store, ledger = open_store_and_ledger(cfg)
    rng = np.random.default_rng(0)
    src = _frames(rng, F, R, R)
    mask = np.zeros((F, R, R), bool)
    mask[:, 6:18, 8:16] = True
    video = catalog.by_id("video")["car"]
    store.write(frames_stage.artifact_path("car"), frames_stage.item_key(cfg, video).key, {"frames": src})
    store.write(masks_stage.artifact_path("car"), masks_stage.item_key(cfg, video).key, {"masks": mask})
    for it in audio_stage.work_items(cfg, catalog):
        store.write(it.artifact, it.key.key, {"magnitude": np.ones(F, np.float32)})
    edits, arrays = [], {}
    for aid in ("rain-1", "fire-1"):
        key = StageKey.build("edit", "1", {"clip": aid})
        item = WorkItem("edit", f"car/{aid}/full", f"edits/car/{aid}/full", key, video_id="car", audio_id=aid,
                        variant="full")
        edited = src.copy()
        edited[~mask] = rng.integers(0, 256, (int((~mask).sum()), 3))
        store.write(item.artifact, key.key, {"frames": edited, "magnitude": rng.uniform(0.2, 3, F).astype(np.float32)})
        edits.append(item)
        arrays[aid] = edited
    return cfg, catalog, store, ledger, edits, src, mask, arrays


def test_metrics_stage_scores_each_edit_and_plans_from_the_ledger(tmp_path):
    cfg, catalog, store, ledger, edits, src, mask, arrays = _setup(tmp_path)
    items = metrics.work_items(cfg, catalog, edits)
    assert [i.item_id for i in items] == ["car/rain-1/full", "car/fire-1/full"]
    assert items[0].key.upstream["edit"] == edits[0].key.key
    assert {"frames", "masks"} <= set(items[0].key.upstream)
    scorer = ClipScorer.tiny(cfg.models.seed)
    result = metrics.run_batch(cfg, items, store, ledger, scorer=scorer)
    assert sorted(result.computed) == sorted(i.item_id for i in items) and not result.failed
    assert all(e.state == "done" for e in plan(items, ledger))

    rows = {r["audio_id"]: r for r in metrics.metrics_rows(store, items)}
    fire = rows["fire-1"]
    assert fire["masked_ssim"] == pytest.approx(masked_ssim(src, arrays["fire-1"], mask), abs=1e-9)
    texts = scorer.embed_texts(["a photo of crackling fire", "a photo of rain"])
    expect = clip_scores(scorer.embed_images(arrays["fire-1"]), texts[0], texts[1])
    for k in ("clip_t", "clip_f", "temp_s", "sem_a"):
        assert fire[k] == pytest.approx(expect[k], abs=1e-4), k
    assert fire["source_label"] == "rain" and fire["target_text"] == "a photo of crackling fire"
    assert rows["rain-1"]["sem_a"] is None  # the clip's class is the source class: Sem-A is undefined
    # M_a corr: Pearson's r (scipy) of the scene's per-frame mean |change| with the edit's stored M_a
    from scipy.stats import pearsonr

    mag = store.read(edits[1].artifact, edits[1].key.key, names=["magnitude"])["magnitude"]
    change = [np.abs(arrays["fire-1"][k].astype(float) - src[k])[~mask[k]].mean() for k in range(len(src))]
    assert fire["ma_corr"] == pytest.approx(pearsonr(change, mag).statistic, abs=1e-9)

    paths = metrics.write_metrics_tables(cfg, list(rows.values()))
    table = metrics.read_table(paths["metrics"])
    assert len(table) == 2 and list(table[0]) == list(metrics.METRICS_COLUMNS)
    (only,) = metrics.read_table(paths["by_variant"])
    assert only["variant_name"] == "Ours" and only["edits"] == 2 and only["sem_a"] == fire["sem_a"]

    # A new edit key makes exactly that item stale, naming the edit as the reason.
    changed = WorkItem("edit", edits[1].item_id, edits[1].artifact, StageKey.build("edit", "2", {"clip": "fire-1"}),
                       video_id="car", audio_id="fire-1", variant="full")
    entries = plan(metrics.work_items(cfg, catalog, [edits[0], changed]), ledger)
    assert [e.state for e in entries] == ["done", "stale"]
    assert "upstream changed: edit" in entries[1].reasons


def test_metrics_stage_fails_an_edit_whose_artifact_is_missing(tmp_path):
    cfg, catalog, store, ledger, edits, *_ = _setup(tmp_path)
    store.delete(edits[0].artifact)
    result = metrics.run_batch(cfg, metrics.work_items(cfg, catalog, edits), store, ledger,
                               scorer=ClipScorer.tiny(0))
    assert list(result.failed) == ["car/rain-1/full"]
    assert "edit stage must succeed first" in result.failed["car/rain-1/full"]
    assert result.computed == ["car/fire-1/full"]

"""Editing: MP4 with the driving clip's sound, one load per video for many clips, foreground blending."""
from __future__ import annotations

import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks import diffusion, edit, finetune, inversion, metrics
from tasks.stage_task import open_store_and_ledger
from tests import diffusion_factory as fx
from tests.diffusion_factory import one_thread  # noqa: F401  (autouse fixture)

EDIT = {"guidance_scale": 5.0}


@pytest.fixture(scope="module")
def edited(tmp_path_factory):
    """Inversion (4 steps), fine-tuning (2 steps) and the edits of all three clips in one batch."""
    root = tmp_path_factory.mktemp("edit")
    cfg, catalog = fx.workspace(root / "batch", edit=EDIT)
    fx.run(cfg, catalog, inversion, finetune)
    # A copy with everything but the edits, for the single-clip runs.
    shutil.copytree(root / "batch", root / "upstream")
    store, ledger = open_store_and_ledger(cfg)
    items = edit.work_items(cfg, catalog)
    session = edit.EditSession(cfg, store)
    result = edit.run_batch(cfg, items, store, ledger, session=session)
    return cfg, catalog, items, result, session, root


def test_one_batch_loads_model_and_z_T_once_for_all_clips(edited):
    cfg, _, items, result, session, _ = edited
    assert len(items) == 3 and {it.video_id for it in items} == {"ball"} and edit.BATCH_BY_VIDEO
    assert sorted(result.computed) == sorted(it.item_id for it in items) and not result.failed
    assert session.counts == {"unet": 1, "z_T": 1, "masks": 1, "depth": 1, "controlnet": 1, "vae": 1, "prompt": 1}
    store, _ = open_store_and_ledger(cfg)
    frames = [store.read(it.artifact, it.key.key)["frames"] for it in items]
    assert all(f.shape == (fx.FRAMES, fx.RES, fx.RES, 3) and f.dtype == np.uint8 for f in frames)
    assert not np.array_equal(frames[0], frames[1])  # different clips, different edits


def test_batch_equals_single_edits(edited):
    cfg, catalog, items, _, _, root = edited
    store, _ = open_store_and_ledger(cfg)
    singles_cfg = fx.make_cfg(root / "upstream", edit=EDIT)
    s_store, s_ledger = open_store_and_ledger(singles_cfg)
    for it in items:
        session = edit.EditSession(singles_cfg, s_store)
        assert edit.run_batch(singles_cfg, [it], s_store, s_ledger, session=session).computed == [it.item_id]
        assert session.counts["unet"] == session.counts["z_T"] == 1
        a, b = store.read(it.artifact, it.key.key), s_store.read(it.artifact, it.key.key)
        assert np.array_equal(a["latents"], b["latents"]) and np.array_equal(a["frames"], b["frames"]), it.item_id
    # Denoising the three clips as one batch of rows (clip_batch) changes only float rounding.
    together = fx.make_cfg(root / "together", edit={**EDIT, "clip_batch": 3})
    shutil.copytree(root / "upstream", root / "together", dirs_exist_ok=True)
    t_store, t_ledger = open_store_and_ledger(together)
    t_items = edit.work_items(together, catalog)
    assert [i.key for i in t_items] == [i.key for i in items]  # a memory knob, not in the key
    shutil.rmtree(root / "together" / "store.zarr" / "edits", ignore_errors=True)
    assert sorted(edit.run_batch(together, t_items, t_store, t_ledger).computed) == sorted(i.item_id for i in items)
    for it in items:
        a, b = store.read(it.artifact, it.key.key), t_store.read(it.artifact, it.key.key)
        assert np.allclose(a["latents"], b["latents"], atol=1e-4)
        assert np.abs(a["frames"].astype(int) - b["frames"].astype(int)).max() <= 1


def test_mp4_has_the_frames_fps_and_the_clips_sound_for_the_videos_duration(edited):
    import av

    from tasks.audio import decode_audio

    cfg, _, items, _, _, _ = edited
    store, _ = open_store_and_ledger(cfg)
    it = items[0]
    path = Path(it.payload["mp4"])
    assert path == Path(cfg.workdir) / "outputs" / "full" / "ball" / f"{it.audio_id}.mp4"
    assert path == metrics.mp4_path(cfg, it.video_id, it.audio_id, it.variant)
    assert not list(path.parent.glob(".*.tmp"))  # temporary files renamed away
    seconds = fx.FRAMES / 24.0
    with av.open(str(path)) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        assert v.codec_context.name == "h264" and a.codec_context.name == "aac"
        assert v.average_rate == Fraction(24) and (v.width, v.height) == (fx.RES, fx.RES)
        # AAC works in 1024-sample frames: the stream's duration is exact to within one of them.
        assert abs(float(a.duration * a.time_base) - seconds) <= 1024 / a.rate, float(a.duration * a.time_base)
        rate = a.rate
    with av.open(str(path)) as c:
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    with av.open(str(path)) as c:
        sound = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    assert decoded.shape == (fx.FRAMES, fx.RES, fx.RES, 3)
    stored = store.read(it.artifact, it.key.key)["frames"].astype(float)
    # H.264 (crf 18) in 4:2:0 keeps luma at full resolution but halves chroma, which the tiny VAE's
    # pixel-level colour noise does not survive: compare luma (neighbouring frames differ by ~25).
    luma = np.array([0.299, 0.587, 0.114])
    assert np.abs(decoded.astype(float) @ luma - stored @ luma).mean() < 5
    assert np.abs(stored[1:] @ luma - stored[:-1] @ luma).mean() > 10
    # The sound is the driving clip's first `seconds`.
    wav, sr = decode_audio(it.payload["clip_path"])
    assert sr == rate
    n = int(seconds * sr)
    ref, got = wav[0, :n].numpy(), sound[:n]
    # AAC is lossy (it drops the top of noise-like sounds such as rain's hiss): compare the
    # 10 ms loudness envelope, which is what identifies the clip, and the overall level.
    def envelope(x, k=sr // 100):
        return np.sqrt((x[: len(x) // k * k].reshape(-1, k) ** 2).mean(axis=1))

    assert np.corrcoef(envelope(ref), envelope(got))[0, 1] > 0.9
    assert got.std() == pytest.approx(ref.std(), rel=0.25)


def test_fit_audio_trims_pads_and_resamples():
    wav = np.ones((1, 1000), np.float32) * 0.5
    out, rate = edit.fit_audio(wav, 16000, 0.1)
    assert rate == 16000 and out.shape == (1, 1600) and out[0, :1000].min() == 0.5 and not out[0, 1000:].any()
    out, rate = edit.fit_audio(np.ones((3, 50000), np.float32), 44100, 0.5)
    assert rate == 44100 and out.shape == (1, 22050)  # > 2 channels mixed to mono, trimmed
    out, rate = edit.fit_audio(np.ones((2, 12345), np.float32) * 0.25, 12345, 1.0)
    assert rate == 48000 and out.shape == (2, 48000) and abs(float(out[:, 1000:40000].mean()) - 0.25) < 0.01


class LocalDecoder(torch.nn.Module):
    """A VAE decoder stand-in whose locality is known: a 3x3 convolution over latents, then each latent
    becomes its own 8x8 pixel block. A pixel depends on its latent and that latent's 8 neighbours only."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(4, 16, 3, padding=1)
        self.out = torch.nn.Conv2d(16, 3 * 64, 1)
        self.config = type("C", (), {"shift_factor": None})()

    def decode(self, z):
        y = torch.nn.functional.pixel_shuffle(self.out(torch.nn.functional.silu(self.conv(z * 25.0))), 8)
        return type("D", (), {"sample": torch.tanh(y)})()


class LocalVAE:
    def __init__(self):
        self.vae, self.scaling_factor = LocalDecoder(), 1.0


def test_foreground_blending_keeps_the_source_foreground(edited, tmp_path):
    cfg, catalog, items, _, _, root = edited
    shutil.copytree(root / "upstream", tmp_path, dirs_exist_ok=True)
    bcfg = fx.make_cfg(tmp_path, edit={**EDIT, "foreground_blend": True})
    assert inversion.work_items(bcfg, catalog)[0].key != inversion.work_items(cfg, catalog)[0].key  # + trajectory
    store, ledger = open_store_and_ledger(bcfg)
    fx.run(bcfg, catalog, inversion)
    it = edit.work_items(bcfg, catalog)[0]
    assert it.audio_id == items[0].audio_id and it.key != items[0].key
    vae = LocalVAE()
    assert edit.run_batch(bcfg, [it], store, ledger, session=edit.EditSession(bcfg, store, vae=vae)).computed == [it.item_id]
    out = store.read(it.artifact, it.key.key)
    lat = store.read("video/ball/latents")["latents"]
    masks = store.read("video/ball/masks")["masks"]
    lm = edit.latent_mask(torch.from_numpy(masks), (fx.RES // 8, fx.RES // 8))[0, 0].numpy().astype(bool)  # (F, h, w)
    # Latent space: the foreground is the source's exactly (the last blend puts z0 there), the scene is new.
    fg = np.broadcast_to(lm[:, None], lat.shape)
    assert np.array_equal(out["latents"][fg], lat[fg]) and np.abs(out["latents"][~fg] - lat[~fg]).mean() > 0.05

    # Pixels. The tiny preset's VAE is random: GroupNorm statistics and mid-block attention over the
    # whole frame tie every pixel to every latent (zeroing only the scene latents moves its decoded
    # foreground by ~36 levels), which a trained SD decoder does not do to that degree. So the pixel
    # claim is checked with a decoder of known locality: a pixel sees its latent and the 8 around it.
    source = edit.decode_latents(vae, torch.from_numpy(lat)).astype(float)  # the source reconstruction D(z0)
    err = np.abs(out["frames"].astype(float) - source).max(axis=-1)
    unblended = edit.decode_latents(vae, torch.from_numpy(
        open_store_and_ledger(cfg)[0].read(items[0].artifact, items[0].key.key)["latents"])).astype(float)
    err_unblended = np.abs(unblended - source).max(axis=-1)
    # Foreground latents whose 3x3 neighbourhood is all foreground decode from source latents only:
    # equal up to uint8 rounding of float differences (<= 1 level).
    inner = -torch.nn.functional.max_pool2d(-torch.from_numpy(lm).float()[:, None], 3, 1, 1)[:, 0].numpy() > 0
    inner_px = np.repeat(np.repeat(inner, 8, axis=1), 8, axis=2) & masks
    assert inner_px.sum() > 50 and err[inner_px].max() <= 1, err[inner_px].max()
    assert err_unblended[inner_px].mean() > 10  # without blending that foreground changes
    # Foreground latents at the edge see scene latents through the 3x3 window and change partly
    # (measured: ~45 levels against ~115 without blending, while interior ones do not change).
    assert err[masks].mean() < 0.6 * err_unblended[masks].mean(), (err[masks].mean(), err_unblended[masks].mean())


def test_keys_ablations_and_metrics_see_the_edits(edited):
    cfg, catalog, items, _, _, _ = edited
    it = items[0]
    assert it.artifact == f"edits/ball/{it.audio_id}/full" and it.item_id == f"ball/{it.audio_id}/full"
    assert set(it.key.upstream) == {"inversion", "finetune", "audio", "masks", "depth"}
    other = fx.make_cfg(cfg.workdir, edit={"guidance_scale": 2.0})
    o = edit.work_items(other, catalog)[0]
    assert o.key != it.key and o.key.upstream == it.key.upstream  # an edit setting changes only the edit
    nocn = fx.make_cfg(cfg.workdir, edit={**EDIT, "controlnet": False})
    assert "depth" not in edit.work_items(nocn, catalog)[0].key.upstream
    # Each ablation run (tasks.ablation) edits with exactly its own variant.
    from tasks.ablation import default_variants

    runs = default_variants(cfg)
    assert set(runs) == set(metrics.VARIANT_NAMES)
    for name, overrides in runs.items():
        v = fx.make_cfg(cfg.workdir, finetune={"variants": overrides["stages.finetune.variants"]})
        assert {e.variant for e in edit.work_items(v, catalog)} == {name}
    # Edit-only switches: the unmasked Frequency Fuser edits with full's fine-tuned model and
    # sets its own switch on it (tasks.diffusion.apply_edit_switches).
    f, u = (edit.work_items(fx.make_cfg(cfg.workdir, finetune={"variants": [n]}), catalog)[0]
            for n in ("full", "unmasked_frequency_fuser"))
    assert u.payload["finetune_key"] == f.payload["finetune_key"] and u.key != f.key
    assert f.payload["edit_switches"] == {"scene_masker": True, "fuser_scene_masked": True}
    assert u.payload["edit_switches"] == {"scene_masker": True, "fuser_scene_masked": False}
    from models.unet3d import preset

    model = diffusion.apply_edit_switches(preset("tiny"), u.payload["edit_switches"])
    assert model.config.fuser_scene_masked is False and model.config.frequency_fuser is True
    m = metrics.work_items(cfg, catalog)
    assert [x.payload["edit_key"] for x in m] == [i.key.key for i in items]
    assert all(x.payload["edit_array"] == "frames" for x in m)


def test_prefect_tasks_run_the_three_stages(prefect_server, tmp_path):
    from prefect import flow

    cfg, catalog = fx.workspace(tmp_path, inversion={"steps": 2}, finetune={"steps": 1}, edit={"guidance_scale": 1.0})
    grid = {"grid": {"selection": "one", "subsets": {"one": {"audio": [fx._template()["catalog"].entries[1]["id"]]}}}}
    cfg = cfg.model_copy(update={"grid": type(cfg.grid).model_validate(grid["grid"])})

    @flow
    def diffusion_flow():
        return [mod.stage_task(cfg, mod.work_items(cfg, catalog)) for mod in (inversion, finetune, edit)]

    inv, ft, ed = diffusion_flow()
    assert inv["computed"] == ["ball/base"] and len(ft["computed"]) == 1 and len(ed["computed"]) == 1
    assert not inv["failed"] and not ft["failed"] and not ed["failed"]
    assert all(set(r) == {"computed", "adopted", "failed", "busy", "not_started", "interrupted"}
               for r in (inv, ft, ed))  # small results

"""DDIM inversion: the step algebra, the round trip against diffusers' own loop, and the stage."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.ddim import DDIM, PREDICTION_TYPES, tiny_scheduler_config
from storage import Ledger
from tasks import diffusion, finetune, inversion
from tasks.config import config_from_dict
from tasks.stage import plan
from tasks.stage_task import open_store_and_ledger
from tests import diffusion_factory as fx
from tests.diffusion_factory import one_thread  # noqa: F401  (autouse fixture)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_sampling_step_matches_diffusers_and_inverse_step_undoes_it(prediction_type):
    from diffusers import DDIMScheduler

    conf = tiny_scheduler_config(prediction_type)
    ddim = DDIM(conf, 10)
    ref = DDIMScheduler.from_config(conf)
    ref.set_timesteps(10)
    assert torch.equal(ddim.timesteps, ref.timesteps)
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(2, 4, 3, 8, 8, generator=g), torch.randn(2, 4, 3, 8, 8, generator=g)
    for i, t in enumerate(ref.timesteps):  # every step, the last (to alphas_cumprod[0]) included
        y = ddim.step(out, i, x)
        assert torch.allclose(y, ref.step(out, t, x).prev_sample, atol=2e-5, rtol=1e-5)
        assert torch.allclose(ddim.inverse_step(out, i, y), x, atol=1e-5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny inflated U-Net, the blank prompt, and a synthetic video's latents at unit scale."""
    from models.unet3d import preset
    from tasks import latents

    cfg, catalog = fx.workspace(tmp_path_factory.mktemp("inv-tiny"))
    store, _ = open_store_and_ledger(cfg)
    (item,) = latents.work_items(cfg, catalog)
    z = torch.from_numpy(store.read(item.artifact, item.key.key)["latents"])
    # The SD scaling factor brings real VAE latents to about unit variance; the random tiny
    # VAE's are ~0.04, so rescale them to the scale the diffusion schedule assumes.
    z0 = diffusion.to_model_layout(z / z.std())
    return preset("tiny", seed=0), diffusion.blank_prompt(cfg), z0


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_round_trip_is_no_worse_than_diffusers_inverse_scheduler_loop(tiny, prediction_type):
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    unet, prompt, z0 = tiny
    steps = 20
    conf = tiny_scheduler_config(prediction_type)

    def zero(x, t):  # the zero audio condition and the blank prompt, no guidance
        return unet(x, t, prompt, audio=None).sample

    ddim = DDIM(conf, steps)
    z_T, _ = inversion.invert_latents(unet, ddim, z0, prompt)
    ours = rel(ddim.sample(zero, z_T), z0)

    inv = DDIMInverseScheduler.from_config({k: v for k, v in conf.items() if k != "thresholding"})
    inv.set_timesteps(steps)
    fwd = DDIMScheduler.from_config(conf)
    fwd.set_timesteps(steps)
    x = z0
    with torch.no_grad():
        for t in inv.timesteps:
            x = inv.step(zero(x, t), t, x).prev_sample
        for t in fwd.timesteps:
            x = fwd.step(zero(x, t), t, x).prev_sample
    theirs = rel(x, z0)

    # Same U-Net, same timesteps: ours may not be worse (float32 rounding aside).
    assert ours <= theirs * (1 + 1e-4) + 1e-6, (ours, theirs)
    if prediction_type == "v_prediction":
        # Solving the sampler's own step for x_t (instead of reading v at the current level,
        # as DDIMInverseScheduler does) leaves only the out(x_s, t) ~ out(x_t, t) error.
        assert ours < 0.03 and ours < 0.25 * theirs, (ours, theirs)
    else:
        # Epsilon: the same formula as diffusers', so the same error up to rounding.
        assert ours == pytest.approx(theirs, rel=1e-3)
    # One fixed-point refinement per step (re-evaluating the model at the estimated x_t)
    # moves the round trip much closer to exact, for both parametrisations.
    z_T1, _ = inversion.invert_latents(unet, ddim, z0, prompt, fixed_point_iters=1)
    refined = rel(ddim.sample(zero, z_T1), z0)
    assert refined < 0.5 * ours, (refined, ours)


def test_stage_stores_z_T_trajectory_and_keys(tmp_path):
    cfg, catalog = fx.workspace(tmp_path, inversion={"save_trajectory": True})
    res = fx.run(cfg, catalog, inversion)["inversion"]
    assert res.computed == ["ball/base"]
    store, ledger = open_store_and_ledger(cfg)
    item = inversion.work_items(cfg, catalog)[0]
    assert item.artifact == "inversion/ball/base" and set(item.key.upstream) == {"latents"}
    data, attrs = store.read(item.artifact, item.key.key), store.attrs(item.artifact, item.key.key)
    lat = store.read(item.payload["latents_artifact"], item.payload["latents_key"])["latents"]
    assert data["z_T"].shape == lat.shape == (fx.FRAMES, 4, fx.RES // 8, fx.RES // 8)
    assert data["trajectory"].shape == (5, *lat.shape) and data["timesteps"].tolist() == [751, 501, 251, 1]
    assert np.array_equal(data["trajectory"][0], lat) and np.array_equal(data["trajectory"][-1], data["z_T"])
    assert attrs["prediction_type"] == "v_prediction" and attrs["model"] == "base"
    # The stored z_T is the base model's inversion of the stored latents.
    unet = diffusion.load_unet(cfg, item.payload["unet3d"])
    z_T, _ = inversion.invert_latents(unet, DDIM(diffusion.load_scheduler_config(cfg), 4),
                                      diffusion.to_model_layout(lat), diffusion.blank_prompt(cfg))
    assert np.allclose(diffusion.to_stored_layout(z_T), data["z_T"], atol=1e-6)
    assert float(np.abs(data["z_T"] - lat).mean()) > 5 * float(np.abs(lat).mean())  # really noised

    # Done in the ledger; what changes the key says why.
    assert [e.state for e in plan(inversion.work_items(cfg, catalog), ledger)] == ["done"]
    more = fx.make_cfg(tmp_path, inversion={"save_trajectory": True, "steps": 5})
    assert plan(inversion.work_items(more, catalog), ledger)[0].reasons == ("parameters changed",)
    fewer = fx.make_cfg(tmp_path, inversion={"save_trajectory": True}, video={"span": "frames", "num_frames": 3})
    assert plan(inversion.work_items(fewer, catalog), ledger)[0].reasons == ("upstream changed: latents",)
    # Inverting with the fine-tuned model is another artifact, keyed on the fine-tuning.
    ft_cfg = fx.make_cfg(tmp_path, inversion={"model": "finetuned"})
    (ft_item,) = inversion.work_items(ft_cfg, catalog)
    (ft,) = finetune.work_items(ft_cfg, catalog)
    assert ft_item.artifact == "inversion/ball/ft-full" and ft_item.key.upstream["finetune"] == ft.key.key
    assert Ledger(cfg.ledger_url).read(stage="inversion", status="done").num_rows == 1


def test_bfloat16_precision_is_keyed_and_close_to_float32(tmp_path):
    cfg, catalog = fx.workspace(tmp_path)
    data = fx.settings(tmp_path)
    data["models"] = {"precision": "bfloat16"}
    bf16 = config_from_dict(data)
    item32, item16 = inversion.work_items(cfg, catalog)[0], inversion.work_items(bf16, catalog)[0]
    assert item32.artifact == item16.artifact and item32.key.key != item16.key.key
    _, ledger = open_store_and_ledger(cfg)
    fx.run(cfg, catalog, inversion)
    assert plan([item16], ledger)[0].reasons == ("parameters changed",)
    z32 = open_store_and_ledger(cfg)[0].read(item32.artifact, item32.key.key)["z_T"]
    fx.run(bf16, catalog, inversion)
    z16 = open_store_and_ledger(bf16)[0].read(item16.artifact, item16.key.key)["z_T"]
    # bfloat16 keeps 8 bits of mantissa (relative rounding 2^-9 per op): over 4 steps of a small
    # U-Net the inversion stays within a few percent of float32, but is not bit-equal.
    assert z16.dtype == np.float32 and np.isfinite(z16).all() and not np.array_equal(z16, z32)
    assert np.abs(z16 - z32).mean() < 0.05 * np.abs(z32).mean()


def test_paper_loaders_read_a_diffusers_base_folder(tmp_path):
    """Scheduler, tokenizer + text encoder and U-Net from a saved base folder equal the tiny preset's."""
    from diffusers import DDIMScheduler

    from models.text import tiny_text_encoder
    from models.unet3d import build_unet2d, preset
    from tasks.config import config_from_dict

    base = tmp_path / "base"
    tok, enc = tiny_text_encoder(0)
    tok.save_pretrained(base / "tokenizer")
    enc.save_pretrained(base / "text_encoder")
    DDIMScheduler.from_config(tiny_scheduler_config()).save_pretrained(base / "scheduler")
    build_unet2d("tiny", 0).save_pretrained(base / "unet")
    paper = config_from_dict({"workdir": str(tmp_path / "w"), "models": {"preset": "paper", "paths": {"base": str(base)}}})
    tiny_cfg = config_from_dict({"workdir": str(tmp_path / "w")})
    conf = diffusion.load_scheduler_config(paper)
    assert {k: conf[k] for k in tiny_scheduler_config()} == tiny_scheduler_config()
    assert torch.equal(diffusion.blank_prompt(paper), diffusion.blank_prompt(tiny_cfg))
    x = torch.randn(1, 4, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    loaded = diffusion.load_unet(paper, diffusion.unet_config(paper, None))
    with torch.no_grad():
        a = loaded(x, 500, diffusion.blank_prompt(paper)).sample
        b = preset("tiny", 0)(x, 500, diffusion.blank_prompt(tiny_cfg)).sample
    assert torch.allclose(a, b, atol=1e-5)
    # Missing pieces are errors that name what is expected.
    (base / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        diffusion.load_scheduler_config(paper)

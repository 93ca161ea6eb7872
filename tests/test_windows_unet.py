"""Windowed denoising with the real inflated U-Net (tiny preset): the anchor, and DDIM round trips."""
import copy
import re

import pytest
import torch

from models.ddim import DDIM, tiny_scheduler_config
from models.unet3d import AudioCondition, build_unet2d, inflate
from models.windows import Window, WindowedModel

NEW_PARTS = re.compile(r"temporal_conv[12]\.|temporal_attention\.attn\.to_out\.0\.|magnitude_modulator\.proj\."
                       r"|frequency_fuser\.encoder\.2\.weight")


@pytest.fixture(scope="module")
def base():
    return build_unet2d("tiny", seed=0)


def trained_like(base, **switches):
    """The inflated tiny U-Net with every zero-initialised new part moved off zero (as after fine-tuning)."""
    model = inflate(copy.deepcopy(base), **switches).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if NEW_PARTS.search(n):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def inputs(frames, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(1, 4, frames, 8, 8, generator=g),
        ehs=torch.randn(1, 3, 32, generator=g),
        audio=AudioCondition(embedding=torch.randn(1, 1024, generator=g),
                             magnitude=torch.rand(1, frames, generator=g) * 2,
                             mel=torch.randn(1, frames, 128, generator=g)),
        mask=(torch.rand(1, frames, 8, 8, generator=g) > 0.7).float(),
    )


def call(model, inp, index, t=500, anchored=False):
    with torch.no_grad():
        return model(inp["x"][:, :, index], t, inp["ehs"], audio=inp["audio"].frames(index),
                     mask=inp["mask"][:, index], anchored=anchored).sample


def test_anchor_is_a_clip_of_its_own(base):
    """Sparse-causal attention off: an anchored window computes exactly what the window alone does, and the
    anchor exactly what it does as a one-frame clip; temporal parts, the fuser and the modulator are active."""
    model = trained_like(base, sparse_causal_attention=False)
    inp = inputs(7)
    window = torch.tensor([3, 4, 5, 6])
    anchored = call(model, inp, torch.tensor([0, 3, 4, 5, 6]), anchored=True)
    assert torch.allclose(anchored[:, :, 1:], call(model, inp, window), atol=1e-5)
    assert torch.allclose(anchored[:, :, :1], call(model, inp, torch.tensor([0])), atol=1e-5)
    # Without the anchor flag the same five frames mix through the temporal parts.
    mixed = call(model, inp, torch.tensor([0, 3, 4, 5, 6]))
    assert (mixed[:, :, 1:] - anchored[:, :, 1:]).abs().max() > 1e-3


def test_anchor_is_the_reference_of_sparse_causal_attention(base):
    model = trained_like(base)
    inp = inputs(7)
    idx = torch.tensor([0, 3, 4, 5, 6])
    ref = call(model, inp, idx, anchored=True)
    other = copy.deepcopy(inp)
    other["x"][:, :, 0] = torch.randn(other["x"][:, :, 0].shape, generator=torch.Generator().manual_seed(9))
    changed = call(model, other, idx, anchored=True)
    assert (changed[:, :, 1:] - ref[:, :, 1:]).abs().max() > 1e-3  # the window reads the anchor
    with pytest.raises(ValueError, match="anchor"):
        call(model, inp, torch.tensor([0]), anchored=True)


def window_fn(model, inp):
    def fn(x, t, w: Window):
        idx = w.index()
        with torch.no_grad():
            return model(x, t, inp["ehs"], audio=inp["audio"].frames(idx), mask=inp["mask"][:, idx],
                         anchored=w.anchored).sample
    return fn


def test_a_window_as_long_as_the_span_is_the_unwindowed_model(base):
    model = trained_like(base)
    inp = inputs(6)
    full = call(model, inp, torch.arange(6))
    out = WindowedModel(window_fn(model, inp), 6, 8, 2)(inp["x"], torch.tensor(500))
    assert (out - full).abs().max() <= 1e-5


@pytest.mark.parametrize("trained", [False, True], ids=["at-init", "trained-like"])
def test_windowed_ddim_round_trip_is_as_good_as_unwindowed(base, trained):
    """Invert then sample with one condition, windowed (window 6, overlap 2 over 14 frames) and not."""
    model = trained_like(base) if trained else inflate(copy.deepcopy(base)).eval()
    frames = 14
    inp = inputs(frames, seed=1)
    # A smooth clip (frames drift slowly), as real latents are, at unit scale.
    g = torch.Generator().manual_seed(2)
    z0 = torch.randn(1, 4, 1, 8, 8, generator=g) + 0.1 * torch.randn(1, 4, frames, 8, 8, generator=g).cumsum(2)
    z0 = z0 / z0.std()
    ddim = DDIM(tiny_scheduler_config("v_prediction"), 10)
    fn = window_fn(model, inp)
    errors = {}
    for name, window in (("unwindowed", None), ("windowed", 6)):
        m = WindowedModel(fn, frames, window, 2)
        z_T, _ = ddim.invert(m, z0)
        back = ddim.sample(m, z_T)
        errors[name] = float((back - z0).norm() / z0.norm())
    assert errors["windowed"] <= 1.1 * errors["unwindowed"], errors


def test_fine_tuning_draws_windows_and_resumes_to_the_same_weights(base, tmp_path):
    """Windows of 4 of 9 frames: each step's window comes from the seeded stream (checkpointed), so a run
    stopped after step 3 and resumed equals an uninterrupted one; the anchored steps train too."""
    from tasks import finetune

    inp = inputs(9, seed=4)
    z0 = inp["x"]
    alphas = DDIM(tiny_scheduler_config("v_prediction"), 1).alphas_cumprod
    s = finetune.TrainSettings(steps=6, learning_rate=1e-3, checkpoint_every=3, condition_dropout=0.0)
    starts = []
    gen = torch.Generator().manual_seed(s.seed)
    for _ in range(s.steps):
        _, win, noise, _ = finetune._draw(gen, tuple(z0.shape), 1000, 0.0, window=4)
        starts.append(win.start)
        assert noise.shape[2] == 4 + win.anchored and win.frames == 4 and win.anchored == (win.start > 0)
    assert len(set(starts)) > 1 and max(starts) <= 5

    def fresh():
        return inflate(copy.deepcopy(base)).eval()

    ref = fresh()
    r = finetune.train(ref, z0, inp["audio"], inp["ehs"], alphas, s, window=4)
    assert len(r.losses) == 6 and all(torch.isfinite(torch.tensor(r.losses)))

    class Stop(RuntimeError):
        pass

    def stop(step, loss):
        if step == 4:
            raise Stop()

    ckpt = tmp_path / "ckpt.pt"
    model = fresh()
    with pytest.raises(Stop):
        finetune.train(model, z0, inp["audio"], inp["ehs"], alphas, s, checkpoint=ckpt, run_key="k", callback=stop,
                       window=4)
    model = fresh()
    res = finetune.train(model, z0, inp["audio"], inp["ehs"], alphas, s, checkpoint=ckpt, run_key="k", window=4)
    assert res.resumed_from == 3 and res.losses == pytest.approx(r.losses, abs=1e-6)
    a, b = model.trainable_state_dict(), ref.trainable_state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    init = fresh().trainable_state_dict()
    assert sum(not torch.equal(a[k], init[k]) for k in a) > 0.9 * len(a)

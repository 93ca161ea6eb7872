"""Issue 14: the inflated U-Net conditions the base as diffusers' unCLIP does, and SceneMasker
covers every audio path (tiny preset, side by side with diffusers itself)."""
import copy
import re
import types

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableUnCLIPImg2ImgPipeline
from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import (
    StableUnCLIPImageNormalizer,
)

from models.unet3d import (
    AudioCondition,
    InflatedResnetBlock2D,
    InflatedTransformerBlock,
    UNet3DConfig,
    build_unet2d,
    inflate,
)
from models.unet3d_blocks import State

B, FR, H, W = 2, 3, 16, 10
EMB, N_MELS = 1024, 128
TOL = 1e-5
PARTS = r"\.(temporal_conv[12]|temporal_attention\.attn\.to_out\.0|magnitude_modulator\.proj|frequency_fuser\.encoder\.2)\."


@pytest.fixture(scope="module")
def base():
    return build_unet2d("tiny", seed=0)


def audio_condition(seed, **kw):
    g = torch.Generator().manual_seed(seed)
    return AudioCondition(
        embedding=torch.randn(B, EMB, generator=g),
        magnitude=torch.rand(B, FR, generator=g) * 2,
        mel=torch.randn(B, FR, N_MELS, generator=g) * 3 - 4,
        **kw,
    )


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    return dict(
        x=torch.randn(B, 4, FR, H, W, generator=g),
        t=torch.tensor([10, 700]),
        ehs=torch.randn(B, 5, 32, generator=g),
    )


def make(base, **switches):
    return inflate(copy.deepcopy(base), **switches).eval()


def perturb(model, std=0.3, seed=0):
    """Every zero/identity-initialised weight of the new parts made non-trivial (fuser encoders too)."""
    g = torch.Generator().manual_seed(seed)
    hit = 0
    with torch.no_grad():
        for n, p in model.named_parameters():
            if re.search(PARTS, n):
                p.add_(torch.randn(p.shape, generator=g) * std)
                hit += 1
    assert hit > 0
    return model


def run(model, inputs, audio, **kw):
    with torch.no_grad():
        return model(inputs["x"], inputs["t"], inputs["ehs"], audio=audio, **kw).sample


def per_frame_2d(unet2d, inputs, labels):
    outs = []
    for i in range(FR):
        with torch.no_grad():
            outs.append(unet2d(inputs["x"][:, :, i], inputs["t"], inputs["ehs"], class_labels=labels).sample)
    return torch.stack(outs, dim=2)


def maxdiff(a, b):
    return (a - b).abs().max().item()


def unclip_components(seed=7):
    """unCLIP's image_normalizer (non-trivial statistics) and image_noising_scheduler."""
    g = torch.Generator().manual_seed(seed)
    normalizer = StableUnCLIPImageNormalizer(embedding_dim=EMB)
    with torch.no_grad():
        normalizer.mean.copy_(torch.randn(1, EMB, generator=g) * 0.5)
        normalizer.std.copy_(torch.rand(1, EMB, generator=g) + 0.5)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    return normalizer, sched


# ----------------------------------------------------------------- side by side with diffusers


def test_no_audio_equals_the_2d_unet_given_unclips_null_label(base, inputs):
    """audio=None (also with a mask, and inactive rows) = diffusers' U-Net per frame with class_labels = 0."""
    model = make(base, sparse_causal_attention=False)  # every part with weights on, at init
    normalizer, sched = unclip_components()
    model.tasi.set_normalizer(normalizer.mean.detach(), normalizer.std.detach())
    model.tasi.set_noise_schedule(sched)
    null = torch.zeros(B, 2 * EMB)
    ref = per_frame_2d(base, inputs, null)
    assert ref.abs().mean().item() > 0.1
    assert maxdiff(run(model, inputs, None), ref) <= TOL
    half = torch.zeros(B, FR, H * 8, W * 8)
    half[..., : W * 4] = 1
    assert maxdiff(run(model, inputs, None, mask=half), ref) <= TOL
    inactive = audio_condition(3, active=torch.zeros(B, dtype=torch.bool))
    assert maxdiff(run(model, inputs, inactive), ref) <= TOL
    # The earlier "no audio" label, a noise-augmented zero embedding, is another condition.
    earlier = model.tasi.augment(torch.zeros(B, EMB), 0)
    assert maxdiff(per_frame_2d(base, inputs, earlier), ref) > 1e-3


@pytest.mark.parametrize("noise_level", [0, 250])
def test_audio_equals_the_2d_unet_given_diffusers_noise_image_embeddings(base, inputs, noise_level):
    model = make(base, sparse_causal_attention=False)
    normalizer, sched = unclip_components()
    model.tasi.set_normalizer(normalizer.mean.detach(), normalizer.std.detach())
    model.tasi.set_noise_schedule(sched)
    audio = audio_condition(5, noise_level=noise_level)
    noise = torch.randn(B, EMB, generator=torch.Generator().manual_seed(11))
    audio.noise = noise
    # diffusers' own method, with a stand-in for the pipeline: it reads only these two components.
    pipe = types.SimpleNamespace(image_normalizer=normalizer, image_noising_scheduler=sched)
    with torch.no_grad():
        labels = StableUnCLIPImg2ImgPipeline.noise_image_embeddings(pipe, audio.embedding, noise_level, noise)
    assert labels.shape == (B, 2 * EMB)
    ref = per_frame_2d(base, inputs, labels)
    out = run(model, inputs, audio)
    assert maxdiff(out, ref) <= TOL
    assert maxdiff(ref, per_frame_2d(base, inputs, torch.zeros_like(labels))) > 1e-2  # the audio matters

    # Batched classifier-free guidance: the pipeline's [zeros_like(image_embeds); image_embeds].
    both = audio.with_unconditional()
    x2 = dict(x=torch.cat([inputs["x"]] * 2), t=torch.cat([inputs["t"]] * 2), ehs=torch.cat([inputs["ehs"]] * 2))
    ref2 = torch.cat([per_frame_2d(base, inputs, torch.zeros_like(labels)), ref])
    assert maxdiff(run(model, x2, both), ref2) <= TOL


def test_without_class_embedding_the_null_condition_adds_nothing(inputs):
    plain = build_unet2d("tiny", seed=0, class_embedding=False)
    model = make(plain, sparse_causal_attention=False)
    with torch.no_grad():  # a trained class projection: weight and bias non-zero
        model.tasi.class_proj.weight.normal_(0, 0.05)
        model.tasi.class_proj.bias.normal_(0, 0.5)
    ref = per_frame_2d(plain, inputs, None)
    assert maxdiff(run(model, inputs, None), ref) <= TOL
    off = AudioCondition(embedding=torch.randn(B, EMB), active=torch.tensor([False, True]))
    out = run(model, inputs, off)
    assert maxdiff(out[:1], ref[:1]) <= TOL  # the inactive row: nothing added
    assert maxdiff(out[1:], ref[1:]) > 1e-3


# ----------------------------------------------------------------- SceneMasker over every audio path


def _block_outputs(model, inputs, audio, mask, capture_fuser=False):
    """Output of every inflated block (resnets and transformer blocks) as (B*F, h, w, C);
    with capture_fuser, (input, output) of each transformer block's Frequency Fuser step."""
    sizes = model._level_sizes(H, W)
    by_tokens = {h * w: (h, w) for h, w in sizes}
    outs, fused, hooks = {}, {}, []

    def to_map(y):
        if y.dim() == 4:  # resnet (B*F, C, h, w)
            return y.permute(0, 2, 3, 1)
        h, w = by_tokens[y.shape[1]]
        return y.reshape(y.shape[0], h, w, y.shape[2])

    for name, mod in model.named_modules():
        if isinstance(mod, (InflatedResnetBlock2D, InflatedTransformerBlock)):
            hooks.append(mod.register_forward_hook(lambda m, a, o, name=name: outs.__setitem__(name, to_map(o))))
        if capture_fuser and isinstance(mod, InflatedTransformerBlock):
            orig = mod._fuse_frequency

            def wrapped(hs, st, name=name, orig=orig):
                y = orig(hs, st)
                fused[name] = (to_map(hs), to_map(y))
                return y

            mod._fuse_frequency = wrapped
    try:
        run(model, inputs, audio, mask=mask)
    finally:
        for h in hooks:
            h.remove()
        for mod in model.modules():
            mod.__dict__.pop("_fuse_frequency", None)
    return outs, fused


def _fg(mask, hw):
    """The pixel mask max-pooled to a block's (h, w), as (B*F, h, w) bool."""
    m = mask.reshape(B * FR, 1, *mask.shape[-2:])
    return F.adaptive_max_pool2d(m, hw)[:, 0] > 0.5


def _mask():
    m = torch.zeros(B, FR, H * 8, W * 8)
    m[..., : W * 4] = 1  # left half of every frame is foreground
    m[..., 60:66, 70:72] = 1  # and a thin 2-pixel pole in the scene
    return m


def test_scene_masker_confines_every_audio_path_to_the_scene(base, inputs):
    """Changing only the audio (E_a, M_a, F_a) changes every block's output under the
    foreground less with SceneMasker than without it."""
    masked = perturb(make(base))
    unmasked = make(base, scene_masker=False)
    unmasked.load_state_dict(masked.state_dict())
    a, b, mask = audio_condition(3), audio_condition(4), _mask()
    deltas = {}
    for tag, model in (("on", masked), ("off", unmasked)):
        oa, _ = _block_outputs(model, inputs, a, mask)
        ob, _ = _block_outputs(model, inputs, b, mask)
        assert len(oa) == 11 + 7  # every resnet and transformer block of the tiny preset
        for name in oa:
            fg = _fg(mask, oa[name].shape[1:3])
            assert fg.any() and (~fg).any()
            diff = (oa[name] - ob[name]).abs().amax(-1)
            deltas[tag, name] = (diff[fg].max().item(), diff[~fg].max().item())
    names = sorted({n for _, n in deltas})
    for name in names:
        (on_fg, on_bg), (off_fg, _) = deltas["on", name], deltas["off", name]
        assert off_fg > 1e-3, name  # without SceneMasker the audio reaches the foreground
        assert on_fg < off_fg, name
        assert on_bg > 1e-3, name  # with it, the audio still edits the scene
    # (Not zero under a partial mask: GroupNorm statistics, convolutions and attention carry
    # the edited scene into the foreground's features.)
    # All foreground: the audio has no effect at all, through any path.
    ones = torch.ones(B, FR, H * 8, W * 8)
    assert maxdiff(run(masked, inputs, a, mask=ones), run(masked, inputs, None)) <= TOL


@pytest.mark.parametrize("fuser_scene_masked", [True, False])
def test_masked_fuser_changes_nothing_under_the_mask(base, inputs, fuser_scene_masked):
    model = perturb(make(base, fuser_scene_masked=fuser_scene_masked))
    mask = _mask()
    _, fused = _block_outputs(model, inputs, audio_condition(3), mask, capture_fuser=True)
    assert len(fused) == 7
    for name, (x, y) in fused.items():
        fg = _fg(mask, x.shape[1:3])
        change = (y - x).abs().amax(-1)
        assert change[~fg].max().item() > 1e-4, name  # the fuser acts (non-identity encoders)
        if fuser_scene_masked:
            assert change[fg].max().item() == 0.0, name  # exactly the block's features
        else:
            assert change[fg].max().item() > 1e-4, name


def test_unmasked_fuser_ablation_differs_only_through_the_fuser(base, inputs):
    on = perturb(make(base))
    off = make(base, fuser_scene_masked=False)
    off.load_state_dict(on.state_dict())
    a, mask = audio_condition(3), _mask()
    assert maxdiff(run(on, inputs, a, mask=mask), run(off, inputs, a, mask=mask)) > 1e-3
    no_mel = AudioCondition(embedding=a.embedding, magnitude=a.magnitude)
    assert torch.equal(run(on, inputs, no_mel, mask=mask), run(off, inputs, no_mel, mask=mask))
    assert UNet3DConfig().fuser_scene_masked is True


# ----------------------------------------------------------------- coarse-level masks


def test_coarse_masks_max_pool_so_thin_foreground_stays_foreground():
    mask = torch.zeros(1, 1, 128, 80)
    mask[..., 37, 51] = 1  # one foreground pixel
    mask[..., 100:, :2] = 1  # a 2-pixel-wide strip on the edge
    st = State(config=UNet3DConfig(), frames=1, temb_f=None, temb_uf=None, mask=mask, mm_scale=None,
                mel=None, active=None, level_sizes=[(16, 10), (8, 5), (4, 3)])
    for hw in [(16, 10), (8, 5), (4, 3), (2, 2)]:
        m = st.mask_at(hw, torch.float32)
        assert m.shape == (1, 1, *hw)
        assert set(m.unique().tolist()) == {0.0, 1.0}  # stays binary
        torch.testing.assert_close(m, F.adaptive_max_pool2d(mask, hw))
        # The pixel's block is foreground at every level.
        y, x = 37 * hw[0] // 128, 51 * hw[1] // 80
        assert m[0, 0, y, x] == 1
        assert m[0, 0, -1, 0] == 1
        # Area averaging (the earlier resizing) would have given it a fraction only.
        assert F.interpolate(mask, size=hw, mode="area")[0, 0, y, x] < 1

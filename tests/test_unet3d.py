"""The inflated AudioScenic U-Net (tiny preset): identity at init, each part's effect, trainable set, save/load."""
import copy
import re

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import (
    StableUnCLIPImageNormalizer,
)

from models.checkpoints import CheckpointMismatchError, MissingWeightsError
from models.unet3d import (
    AudioCondition,
    InflatedTransformerBlock,
    build_controlnet,
    build_unet2d,
    controlnet_residuals,
    from_pretrained,
    inflate,
    is_trainable_name,
    load_trainable,
    save_pretrained,
    save_trainable,
)

B, FR, H, W = 2, 3, 16, 10  # non-square; 10 -> 5 -> 3 exercises odd sizes and forced upsample sizes
N_MELS, EMB = 128, 1024
TOL = 1e-5

# TASI and SceneMasker only: no new weights, frames independent.
BARE = dict(
    tasi=True,
    scene_masker=True,
    magnitude_modulator=False,
    frequency_fuser=False,
    temporal_conv=False,
    temporal_attention=False,
    sparse_causal_attention=False,
)
FRAMEWISE = dict(temporal_conv=False, temporal_attention=False, sparse_causal_attention=False)

# The weights that start at zero (or at the identity) in each part.
ZERO_INIT = {
    "temporal_conv": r"\.temporal_conv[12]\.",
    "temporal_attention": r"\.temporal_attention\.attn\.to_out\.0\.",
    "magnitude_modulator": r"\.magnitude_modulator\.proj\.",
    "frequency_fuser": r"\.frequency_fuser\.encoder\.2\.weight",
    "class_proj": r"^tasi\.class_proj\.",
}


@pytest.fixture(scope="module")
def base():
    return build_unet2d("tiny", seed=0)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    return dict(
        x=torch.randn(B, 4, FR, H, W, generator=g),
        t=torch.tensor([10, 700]),
        ehs=torch.randn(B, 5, 32, generator=g),
        audio=AudioCondition(
            embedding=torch.randn(B, EMB, generator=g),
            magnitude=torch.rand(B, FR, generator=g) * 2,
            mel=torch.randn(B, FR, N_MELS, generator=g),
        ),
    )


def make(base, **switches):
    return inflate(copy.deepcopy(base), **switches).eval()


def perturb(model, *parts, std=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    pats = [re.compile(ZERO_INIT[p]) for p in parts]
    hit = 0
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(pt.search(n) for pt in pats):
                p.add_(torch.randn(p.shape, generator=g) * std)
                hit += 1
    assert hit > 0, parts
    return model


def run(model, inputs, **kw):
    args = dict(audio=inputs["audio"])
    args.update(kw)
    with torch.no_grad():
        return model(inputs["x"], inputs["t"], inputs["ehs"], **args).sample


def per_frame_2d(unet2d, inputs, labels, residuals=None):
    """The 2D U-Net applied to each frame separately (the reference)."""
    outs = []
    for i in range(FR):
        kw = {}
        if residuals is not None:
            down, mid = residuals
            sel = lambda r: r.view(B, FR, *r.shape[1:])[:, i]  # noqa: E731
            kw = dict(
                down_block_additional_residuals=[sel(r) for r in down], mid_block_additional_residual=sel(mid)
            )
        with torch.no_grad():
            outs.append(unet2d(inputs["x"][:, :, i], inputs["t"], inputs["ehs"], class_labels=labels, **kw).sample)
    return torch.stack(outs, dim=2)


def maxdiff(a, b):
    return (a - b).abs().max().item()


def grad_names(model, inputs, **kw):
    """Names of the parameters that receive a non-zero gradient from one backward pass."""
    model.zero_grad(set_to_none=True)
    out = model(inputs["x"], inputs["t"], inputs["ehs"], audio=inputs["audio"], **kw).sample
    out.square().mean().backward()
    names = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    model.zero_grad(set_to_none=True)
    return names


# ----------------------------------------------------------------- identity at initialisation


@pytest.fixture(scope="module")
def controlnet_residual_set(base, inputs):
    cn = build_controlnet("tiny", seed=3)
    with torch.no_grad():  # ControlNet's zero convs would give zero residuals: make them real
        g = torch.Generator().manual_seed(4)
        for n, p in cn.named_parameters():
            if "controlnet_" in n or "conv_out" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
        cond = torch.rand(B, 3, FR, H * 8, W * 8, generator=g)
        return controlnet_residuals(cn, inputs["x"], inputs["t"], inputs["ehs"], cond)


@pytest.mark.parametrize("with_controlnet", [False, True])
def test_init_equals_2d_per_frame_all_parts_with_weights(base, inputs, controlnet_residual_set, with_controlnet):
    model = make(base, sparse_causal_attention=False)  # every other switch on
    labels = model.tasi.augment(inputs["audio"].embedding, 0)
    res = controlnet_residual_set if with_controlnet else None
    kw = {}
    if res is not None:
        assert max(r.abs().max().item() for r in res[0]) > 0.1
        kw = dict(down_block_additional_residuals=res[0], mid_block_additional_residual=res[1])
    mask0 = torch.zeros(B, FR, 64, 40)  # SceneMasker on, all scene
    out = run(model, inputs, mask=mask0, **kw)
    ref = per_frame_2d(base, inputs, labels, res)
    assert out.shape == (B, 4, FR, H, W)
    assert maxdiff(out, ref) <= TOL
    assert ref.abs().mean().item() > 0.1  # a real comparison, not of zeros
    if with_controlnet:
        assert maxdiff(ref, per_frame_2d(base, inputs, labels)) > 1e-2  # residuals matter


def test_init_with_every_switch_on(base, inputs, controlnet_residual_set):
    """Sparse-causal attention has no weights: frame 0 still equals 2D, and so does a static clip."""
    model = make(base)
    labels = model.tasi.augment(inputs["audio"].embedding, 0)
    res = controlnet_residual_set
    kw = dict(down_block_additional_residuals=res[0], mid_block_additional_residual=res[1])
    out = run(model, inputs, mask=torch.zeros(B, FR, H, W), **kw)
    ref = per_frame_2d(base, inputs, labels, res)
    assert maxdiff(out[:, :, 0], ref[:, :, 0]) <= TOL
    assert maxdiff(out[:, :, 1:], ref[:, :, 1:]) > 1e-3  # frames 1.. attend to frames 0 and i-1

    static = dict(inputs, x=inputs["x"][:, :, :1].expand(-1, -1, FR, -1, -1).contiguous())
    out_s = run(model, static)
    ref_s = per_frame_2d(base, static, labels)
    assert maxdiff(out_s, ref_s) <= TOL


def test_inflation_reuses_modules_and_keeps_weights(base):
    unet = copy.deepcopy(base)
    block = unet.down_blocks[0].resnets[0]
    model = inflate(unet)
    assert model.unet is unet and model.unet.down_blocks[0].resnets[0] is block
    own = model.unet.state_dict()
    for k, v in base.state_dict().items():
        assert torch.equal(own[k], v), k
    with pytest.raises(ValueError, match="already inflated"):
        inflate(unet)


def test_unet_outside_a_3d_forward_is_still_the_2d_unet(base, inputs):
    model = make(base)
    perturb(model, "temporal_conv", "temporal_attention", "magnitude_modulator", "frequency_fuser")
    run(model, inputs)  # leaves no state behind (no grad)
    labels = model.tasi.augment(inputs["audio"].embedding, 0)
    x0 = inputs["x"][:, :, 0]
    with torch.no_grad():
        a = model.unet(x0, inputs["t"], inputs["ehs"], class_labels=labels).sample
        b = base(x0, inputs["t"], inputs["ehs"], class_labels=labels).sample
    assert torch.equal(a, b)


# ----------------------------------------------------------------- each part


def test_sparse_causal_frame0_is_plain_self_attention_and_attention_is_causal(base, inputs):
    model = make(base, **{**BARE, "sparse_causal_attention": True})
    block = model.unet.down_blocks[0].attentions[0].transformer_blocks[0]
    assert isinstance(block, InflatedTransformerBlock)
    captured = {}
    hook = block.attn1.register_forward_hook(
        lambda m, a, k, o: captured.update(inp=a[0], kv=k["encoder_hidden_states"], out=o), with_kwargs=True
    )
    run(model, inputs)
    hook.remove()
    inp, kv, out = captured["inp"], captured["kv"], captured["out"]
    n = inp.shape[1]
    v = inp.view(B, FR, n, -1)
    kvv = kv.view(B, FR, 2 * n, -1)
    # Keys/values: [frame 0, frame max(i-1, 0)].
    for i in range(FR):
        assert torch.equal(kvv[:, i, :n], v[:, 0]) and torch.equal(kvv[:, i, n:], v[:, max(i - 1, 0)])
    with torch.no_grad():
        plain = block.attn1(inp.view(B, FR, n, -1)[:, 0])  # self-attention on frame 0 alone
    assert maxdiff(out.view(B, FR, n, -1)[:, 0], plain) <= 1e-6
    assert maxdiff(out.view(B, FR, n, -1)[:, 1], block.attn1(v[:, 1]).detach()) > 1e-4

    # Causality of the whole model: changing frame 2 leaves frames 0 and 1 untouched.
    moved = dict(inputs, x=inputs["x"].clone())
    moved["x"][:, :, 2] += 1.0
    a, b = run(model, inputs), run(model, moved)
    assert maxdiff(a[:, :, :2], b[:, :, :2]) <= 1e-6
    assert maxdiff(a[:, :, 2], b[:, :, 2]) > 1e-2


def test_temporal_parts_mix_frames_once_perturbed(base, inputs):
    for part in ("temporal_conv", "temporal_attention"):
        model = make(base, **{**BARE, part: True})
        before = run(model, inputs)
        perturb(model, part)
        after = run(model, inputs)
        assert maxdiff(before, after) > 1e-3, part
        # Frames now see each other: changing the last frame changes frame 0.
        moved = dict(inputs, x=inputs["x"].clone())
        moved["x"][:, :, 2] += 1.0
        assert maxdiff(run(model, moved)[:, :, 0], after[:, :, 0]) > 1e-4, part


def test_scene_masker(base, inputs):
    # Every weighted part perturbed, the Frequency Fuser included (SceneMasker masks it too).
    model = make(base)
    perturb(model, "temporal_conv", "temporal_attention", "magnitude_modulator", "frequency_fuser")
    ones, zeros = torch.ones(B, FR, H * 8, W * 8), torch.zeros(B, FR, H * 8, W * 8)
    no_audio = run(model, inputs, audio=None)
    with_audio = run(model, inputs)
    assert maxdiff(no_audio, with_audio) > 1e-2
    assert maxdiff(run(model, inputs, mask=ones), no_audio) <= TOL  # all foreground = no audio
    assert maxdiff(run(model, inputs, mask=zeros), with_audio) <= TOL  # all scene = no mask

    # Only where it should: with frames independent, a foreground frame 0 behaves as
    # without audio, scene frames 1..2 as with audio.
    fw = make(base, frequency_fuser=False, **FRAMEWISE)
    perturb(fw, "magnitude_modulator")
    m = zeros.clone()
    m[:, 0] = 1
    out = run(fw, inputs, mask=m)
    assert maxdiff(out[:, :, 0], run(fw, inputs, audio=None)[:, :, 0]) <= TOL
    assert maxdiff(out[:, :, 1:], run(fw, inputs)[:, :, 1:]) <= TOL


def test_without_scene_masker_the_mask_is_ignored(base, inputs):
    model = make(base, **{**BARE, "scene_masker": False, "magnitude_modulator": True})
    perturb(model, "magnitude_modulator")
    assert torch.equal(run(model, inputs, mask=torch.ones(B, FR, H, W)), run(model, inputs))


def test_scene_masker_resizes_per_block(base, inputs):
    """A half mask changes the output between the all-scene and all-foreground cases, at any mask size."""
    model = make(base, **BARE)
    half = torch.zeros(B, FR, 32, 20)
    half[..., :10] = 1  # left half foreground
    out_half = run(model, inputs, mask=half)
    out_half_big = run(model, inputs, mask=half.repeat_interleave(4, -2).repeat_interleave(4, -1))
    assert maxdiff(out_half, out_half_big) <= TOL  # max-pool resizing: same masks at every block
    fg, bg = run(model, inputs, audio=None), run(model, inputs)
    # Far from the boundary the output follows the region's condition more closely.
    left, right = (Ellipsis, slice(0, 2)), (Ellipsis, slice(8, 10))
    assert maxdiff(out_half[left], fg[left]) < maxdiff(out_half[left], bg[left])
    assert maxdiff(out_half[right], bg[right]) < maxdiff(out_half[right], fg[right])


def test_magnitude_modulator(base, inputs):
    model = make(base, **{**BARE, "magnitude_modulator": True})
    a = inputs["audio"]
    assert torch.equal(run(model, inputs), run(model, inputs, audio=AudioCondition(embedding=a.embedding)))  # zero-init
    perturb(model, "magnitude_modulator")
    no_mm = run(model, inputs, audio=AudioCondition(embedding=a.embedding))
    zero = AudioCondition(embedding=a.embedding, magnitude=torch.zeros(B, FR))
    assert torch.equal(run(model, inputs, audio=zero), no_mm)  # zero magnitude: exact no-op
    out = run(model, inputs)
    assert maxdiff(out, no_mm) > 1e-3
    # Stronger audio -> larger change.
    loud = AudioCondition(embedding=a.embedding, magnitude=a.magnitude * 3)
    assert maxdiff(run(model, inputs, audio=loud), no_mm) > maxdiff(out, no_mm)
    # Per frame and only in the scene: frame 1 silent -> frame 1 untouched (frames independent here).
    mag = a.magnitude.clone()
    mag[:, 1] = 0
    out1 = run(model, inputs, audio=AudioCondition(embedding=a.embedding, magnitude=mag))
    assert maxdiff(out1[:, :, 1], no_mm[:, :, 1]) <= TOL and maxdiff(out1[:, :, 0], no_mm[:, :, 0]) > 1e-3
    ones = torch.ones(B, FR, H, W)
    emb_only = AudioCondition(embedding=a.embedding)
    assert maxdiff(run(model, inputs, mask=ones), run(model, inputs, audio=emb_only, mask=ones)) <= TOL


def test_frequency_fuser(base, inputs):
    """Default alignment 'spectrum': the weights follow F_a's temporal spectrum (see models.frequency)."""
    model = make(base, **{**BARE, "frequency_fuser": True})
    off = make(base, **BARE)
    assert maxdiff(run(model, inputs), run(off, inputs)) <= TOL  # identity weights change nothing
    perturb(model, "frequency_fuser")
    out = run(model, inputs)
    assert maxdiff(out, run(off, inputs)) > 1e-3
    a = inputs["audio"]
    no_mel = AudioCondition(embedding=a.embedding, magnitude=a.magnitude)
    assert torch.equal(run(model, inputs, audio=no_mel), run(off, inputs, audio=no_mel))  # no F_a: skipped
    other = AudioCondition(embedding=a.embedding, magnitude=a.magnitude, mel=a.mel.flip(2))
    assert maxdiff(run(model, inputs, audio=other), out) > 1e-4  # the weights follow F_a
    # Only |FFT over frames| counts: F_a shifted in time (circularly) gives the same weights,
    # and so does the same clip louder (a constant offset of the log-Mel).
    rolled = AudioCondition(embedding=a.embedding, magnitude=a.magnitude, mel=a.mel.roll(1, dims=1))
    assert maxdiff(run(model, inputs, audio=rolled), out) <= TOL
    louder = AudioCondition(embedding=a.embedding, magnitude=a.magnitude, mel=a.mel + 4.0)
    assert maxdiff(run(model, inputs, audio=louder), out) <= TOL
    # The index-matched form (kept for comparison): frame j weights temporal bin j, so the roll counts.
    index = make(base, **{**BARE, "frequency_fuser": True, "fuser_alignment": "index"})
    index.load_state_dict(model.state_dict())
    out_index = run(index, inputs)
    assert maxdiff(out_index, out) > 1e-4
    assert maxdiff(run(index, inputs, audio=rolled), out_index) > 1e-4


def test_tasi_matches_unclip_noise_augmentation(base):
    model = make(base)
    g = torch.Generator().manual_seed(7)
    normalizer = StableUnCLIPImageNormalizer(embedding_dim=EMB)
    with torch.no_grad():
        normalizer.mean.copy_(torch.randn(1, EMB, generator=g))
        normalizer.std.copy_(torch.rand(1, EMB, generator=g) + 0.5)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    model.tasi.set_normalizer(normalizer.mean.detach(), normalizer.std.detach())
    model.tasi.set_noise_schedule(sched)
    emb, noise = torch.randn(2, EMB, generator=g), torch.randn(2, EMB, generator=g)
    level = torch.tensor([100, 100])
    expected = normalizer.unscale(sched.add_noise(normalizer.scale(emb), noise, level))
    level_emb = get_timestep_embedding(level, EMB, flip_sin_to_cos=True, downscale_freq_shift=0)
    expected = torch.cat([expected, level_emb], 1)
    got = model.tasi.augment(emb, 100, noise)
    torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-5)


def test_tasi_audio_reaches_temb_and_no_audio_is_unclips_null_label(base, inputs):
    model = make(base, **BARE)
    a = inputs["audio"]
    out = run(model, inputs)
    none = run(model, inputs, audio=None)
    assert maxdiff(out, none) > 1e-2
    # No audio = unCLIP's null: zeros over the whole class label (tests/test_method_fidelity.py
    # checks it against diffusers); no embedding, or inactive rows, are the same condition.
    assert torch.equal(run(model, inputs, class_labels=torch.zeros(B, 2 * EMB), audio=None), none)
    assert torch.equal(run(model, inputs, audio=AudioCondition(magnitude=a.magnitude)), none)
    inactive = AudioCondition(embedding=a.embedding, active=torch.zeros(B, dtype=torch.bool))
    assert torch.equal(run(model, inputs, audio=inactive), none)
    # A zero *embedding* is an audio label like any other (noise-augmented, with the
    # noise-level half), not the null: the model never saw it as "no audio".
    zero = AudioCondition(embedding=torch.zeros(B, EMB))
    assert maxdiff(run(model, inputs, audio=zero), none) > 1e-3
    # Precomputed labels given as class_labels are the same path.
    labels = model.tasi.augment(a.embedding, 0)
    emb_only = AudioCondition(embedding=a.embedding)
    assert torch.equal(run(model, inputs, class_labels=labels, audio=None), run(model, inputs, audio=emb_only))


def test_tasi_on_a_base_without_class_embedding(inputs):
    plain = build_unet2d("tiny", seed=0, class_embedding=False)
    model = inflate(copy.deepcopy(plain), **BARE).eval()
    assert model.tasi.class_proj is not None and "tasi.class_proj.weight" in model.trainable_parameter_names()
    ref = per_frame_2d(plain, inputs, None)
    assert maxdiff(run(model, inputs), ref) <= TOL  # zero-init projection
    perturb(model, "class_proj")
    assert maxdiff(run(model, inputs), ref) > 1e-3
    trainable = set(model.trainable_parameter_names())
    assert {"tasi.class_proj.weight", "tasi.class_proj.bias"} <= grad_names(model, inputs) <= trainable
    # The null condition adds nothing to temb, not even the (now non-zero) bias of class_proj.
    assert model.tasi.class_proj.bias.abs().max() > 0.1
    assert maxdiff(run(model, inputs, audio=None), ref) <= TOL


def test_without_tasi_audio_goes_through_cross_attention(base, inputs):
    model = make(base, **{**BARE, "tasi": False})
    assert model.audio_token_proj is not None
    assert "audio_token_proj.weight" in model.trainable_parameter_names()
    seen = {}
    attn2 = model.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    attn2.register_forward_hook(lambda m, a, k, o: seen.update(ehs=k["encoder_hidden_states"]), with_kwargs=True)
    out = run(model, inputs)
    assert seen["ehs"].shape == (B * FR, 6, 32)  # 5 text tokens + 1 audio token
    assert {"audio_token_proj.weight", "audio_token_proj.bias"} <= grad_names(model, inputs)
    assert grad_names(model, inputs) <= set(model.trainable_parameter_names())
    assert maxdiff(out, run(model, inputs, audio=None)) > 1e-3
    # temb carries no audio: the unCLIP slot gets the zero condition, so SceneMasker is moot.
    assert maxdiff(run(model, inputs, mask=torch.ones(B, FR, H, W)), out) <= TOL


def test_batched_guidance_rows_equal_separate_calls(base, inputs):
    model = make(base, sparse_causal_attention=False)
    perturb(model, "temporal_conv", "temporal_attention", "magnitude_modulator", "frequency_fuser")
    cond = run(model, inputs)
    uncond = run(model, inputs, audio=None)
    both = dict(
        x=torch.cat([inputs["x"]] * 2), t=torch.cat([inputs["t"]] * 2), ehs=torch.cat([inputs["ehs"]] * 2),
        audio=inputs["audio"].with_unconditional(),
    )
    with torch.no_grad():
        out = model(both["x"], both["t"], both["ehs"], audio=both["audio"]).sample
    assert maxdiff(out[:B], uncond) <= TOL and maxdiff(out[B:], cond) <= TOL


# ----------------------------------------------------------------- trainable set and gradients


def expected_trainable(model):
    names = set()
    for mod_name, mod in model.named_modules():
        kind = type(mod).__name__
        if kind == "InflatedTransformerBlock":
            names |= {f"{mod_name}.attn1.to_q.weight", f"{mod_name}.attn2.to_q.weight"}
            names |= {f"{mod_name}.temporal_attention.{n}" for n, _ in mod.temporal_attention.named_parameters()}
            enc = mod.frequency_fuser.encoder
            names |= {f"{mod_name}.frequency_fuser.encoder.{n}" for n, _ in enc.named_parameters()}
        elif kind == "InflatedResnetBlock2D":
            for part in ("temporal_conv1", "temporal_conv2", "magnitude_modulator"):
                names |= {f"{mod_name}.{part}.{n}" for n, _ in getattr(mod, part).named_parameters()}
    return names


def test_gradients_reach_exactly_the_trainable_set(base, inputs):
    model = make(base)
    perturb(model, "temporal_conv", "temporal_attention", "magnitude_modulator", "frequency_fuser")
    expected = expected_trainable(model)
    assert set(model.trainable_parameter_names()) == expected
    assert len(expected) == 168  # 7 transformer blocks x 13 + 11 resnets x 7
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    half = torch.zeros(B, FR, H, W)
    half[..., : W // 2] = 1
    model.train()
    out = model(inputs["x"], inputs["t"], inputs["ehs"], audio=inputs["audio"], mask=half).sample
    out.square().mean().backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == expected
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in expected)
    # The same gradients with gradient checkpointing (blocks re-run in backward).
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.enable_gradient_checkpointing()
    out2 = model(inputs["x"], inputs["t"], inputs["ehs"], audio=inputs["audio"], mask=half).sample
    out2.square().mean().backward()
    for n, gr in grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, gr, rtol=1e-4, atol=1e-6)


def test_trainable_names_pattern():
    yes = [
        "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight",
        "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q.weight",
        "unet.up_blocks.1.resnets.0.temporal_conv2.bias",
        "unet.down_blocks.0.resnets.0.magnitude_modulator.mlp.1.weight",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.frequency_fuser.encoder.0.weight",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.temporal_attention.attn.to_k.weight",
        "tasi.class_proj.weight",
        "audio_token_proj.bias",
    ]
    no = [
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.weight",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v.weight",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight",
        "unet.class_embedding.linear_1.weight",
        "unet.down_blocks.0.resnets.0.time_emb_proj.weight",
        "unet.conv_in.weight",
        "tasi.mean",
    ]
    assert all(is_trainable_name(n) for n in yes)
    assert not any(is_trainable_name(n) for n in no)


# ----------------------------------------------------------------- save / load


TRAINED = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"


def test_trainable_round_trip(base, inputs, tmp_path):
    model = make(base)
    perturb(model, "temporal_conv", "temporal_attention", "magnitude_modulator", "frequency_fuser", seed=5)
    with torch.no_grad():
        model.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.mul_(1.5)
    path = save_trainable(model, tmp_path / "ft" / "trainable.safetensors")
    from safetensors.torch import load_file

    assert set(load_file(str(path))) == set(model.trainable_parameter_names())
    fresh = make(base)
    assert maxdiff(run(fresh, inputs), run(model, inputs)) > 1e-3
    load_trainable(fresh, path)
    assert torch.equal(run(fresh, inputs), run(model, inputs))
    with pytest.raises(CheckpointMismatchError, match="different model structure"):
        load_trainable(make(base, frequency_fuser=False), path)
    # SceneMasker owns no parameters: the full model's weights serve the "w/o SceneMasker" variant.
    unmasked = make(base, scene_masker=False)
    load_trainable(unmasked, path)
    assert torch.equal(dict(unmasked.named_parameters())[TRAINED], dict(model.named_parameters())[TRAINED])


def test_whole_model_from_diffusers_folders(base, inputs, tmp_path):
    base.save_pretrained(str(tmp_path / "unet_only"))
    loaded = from_pretrained(tmp_path / "unet_only")
    assert maxdiff(run(loaded, inputs), run(make(base), inputs)) == 0.0

    # A pipeline root: unet/ plus unCLIP's image_normalizer and image_noising_scheduler.
    root = tmp_path / "pipe"
    base.save_pretrained(str(root / "unet"))
    normalizer = StableUnCLIPImageNormalizer(embedding_dim=EMB)
    with torch.no_grad():
        normalizer.mean.fill_(0.5)
        normalizer.std.fill_(2.0)
    normalizer.save_pretrained(str(root / "image_normalizer"))
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    sched.save_pretrained(str(root / "image_noising_scheduler"))
    piped = from_pretrained(root, sparse_causal_attention=False)
    assert piped.config.sparse_causal_attention is False
    assert torch.all(piped.tasi.mean == 0.5) and torch.all(piped.tasi.std == 2.0)
    assert piped.tasi.noise_schedule_config["beta_schedule"] == "linear"

    # save_pretrained -> from_pretrained keeps base, new parts, config and TASI statistics.
    model = make(base, filter_kind="butterworth")
    perturb(model, "temporal_conv", "temporal_attention", "magnitude_modulator", "frequency_fuser", seed=9)
    model.tasi.set_normalizer(torch.full((EMB,), 0.1), torch.full((EMB,), 3.0))
    out_dir = save_pretrained(model, tmp_path / "saved")
    back = from_pretrained(out_dir)
    assert back.config == model.config
    assert torch.equal(run(back, inputs), run(model, inputs))
    # Its unet/ is a plain diffusers U-Net folder: the 2D weights and nothing else.
    from diffusers import UNet2DConditionModel

    plain = UNet2DConditionModel.from_pretrained(str(out_dir / "unet"), local_files_only=True)
    assert set(plain.state_dict()) == set(base.state_dict())


def test_missing_folders_are_clear_errors(tmp_path):
    with pytest.raises(MissingWeightsError, match="not found"):
        from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingWeightsError, match="lacks"):
        from_pretrained(tmp_path / "empty")
    cfg_only = tmp_path / "cfg_only"
    cfg_only.mkdir()
    (cfg_only / "config.json").write_text("{}")
    with pytest.raises(MissingWeightsError, match="no weights"):
        from_pretrained(cfg_only)


def test_bad_inputs_are_rejected(base, inputs):
    model = make(base, **BARE)
    with pytest.raises(ValueError, match="magnitude"):
        run(model, inputs, audio=AudioCondition(magnitude=torch.ones(B, FR + 1)))
    with pytest.raises(ValueError, match="mel"):
        run(model, inputs, audio=AudioCondition(mel=torch.ones(B, FR, 7)))
    with pytest.raises(ValueError, match="mask"):
        run(model, inputs, mask=torch.ones(B, FR + 1, H, W))
    with pytest.raises(ValueError, match="both"):
        run(model, inputs, mid_block_additional_residual=torch.zeros(1))


def test_temporal_conv_is_a_conv_over_frames_per_pixel():
    from models.unet3d_blocks import _temporal_conv

    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv3d(8, 8, (3, 1, 1), padding=(1, 0, 0))
    h = torch.randn(2 * 5, 8, 6, 7, generator=g)
    ref = conv(h.view(2, 5, 8, 6, 7).transpose(1, 2)).transpose(1, 2).reshape(10, 8, 6, 7)
    torch.testing.assert_close(_temporal_conv(conv, h, 5), ref, rtol=0, atol=1e-6)


def test_sd21_unclip_h_preset_has_the_real_sizes():
    """Built on the meta device: shapes only, no 3.5 GB of weights."""
    from diffusers import UNet2DConditionModel

    from models.unet3d import PRESETS

    with torch.device("meta"):
        unet = UNet2DConditionModel(**PRESETS["sd21-unclip-h"])
        model = inflate(unet)
    # SD 2.1's 865,910,724 plus unCLIP's class projection 2048 -> 1280 -> 1280 (4,262,400).
    new_part = re.compile(r"\.(temporal_conv[12]|temporal_attention|magnitude_modulator|frequency_fuser)\.")
    assert sum(p.numel() for n, p in unet.named_parameters() if not new_part.search(n)) == 870_173_124
    assert unet.config.block_out_channels == (320, 640, 1280, 1280)
    assert unet.config.cross_attention_dim == 1024 and unet.config.sample_size == 96
    assert unet.class_embedding.linear_1.in_features == 2048
    blk = unet.down_blocks[0].attentions[0].transformer_blocks[0]
    assert blk.attn1.heads == 5 and blk.attn1.to_q.out_features // blk.attn1.heads == 64  # 64-channel heads
    assert len(model.trainable_parameter_names()) == 362


def test_other_attention_processors_keep_sparse_causal_attention(base, inputs):
    from diffusers.models.attention_processor import AttnProcessor

    model = make(base, sparse_causal_attention=True)
    perturb(model, "temporal_attention")
    ref = run(model, inputs)
    model.unet.set_attention_slice(1)
    assert maxdiff(run(model, inputs), ref) <= TOL
    model.unet.set_attn_processor(AttnProcessor())
    assert maxdiff(run(model, inputs), ref) <= TOL


def test_part_init_beside_a_base_is_loaded_for_every_variant(base, inputs, tmp_path):
    """A base folder may ship initial weights of the inflated parts (the toy preset's trained Magnitude
    Modulator): from_pretrained loads them; variants without that part skip them; a fine-tuned
    trainable file still wins; tensors of the 2D U-Net, or of another architecture, are refused."""
    from safetensors.torch import save_file

    from models.unet3d_io import PART_INIT_FILE, load_part_init, save_part_init

    root = tmp_path / "base"
    base.save_pretrained(str(root / "unet"))
    trained = make(base)
    perturb(trained, "magnitude_modulator", seed=7)
    mm = {k: v for k, v in trained.named_parameters() if ".magnitude_modulator." in k}
    save_part_init(mm, root / PART_INIT_FILE)

    loaded = from_pretrained(root)
    assert all(torch.equal(dict(loaded.named_parameters())[k], v) for k, v in mm.items())
    assert torch.equal(run(loaded, inputs), run(trained, inputs))
    assert maxdiff(run(loaded, inputs), run(make(base), inputs)) > 1e-3  # the MM acts on the audio rows
    without = from_pretrained(root, magnitude_modulator=False)  # the part is off: its init is skipped
    assert torch.equal(run(without, inputs), run(make(base, magnitude_modulator=False), inputs))

    tuned = make(base)
    perturb(tuned, "magnitude_modulator", "temporal_conv", seed=9)
    ft = save_trainable(tuned, tmp_path / "ft.safetensors")
    assert torch.equal(run(from_pretrained(root, trainable=ft), inputs), run(tuned, inputs))

    with pytest.raises(ValueError, match="only the inflated parts"):
        save_part_init({"unet.conv_in.weight": base.conv_in.weight}, tmp_path / "x.safetensors")
    k = next(iter(mm))
    save_file({k: torch.zeros(3, 3)}, str(tmp_path / "shape.safetensors"))
    with pytest.raises(CheckpointMismatchError, match="shape mismatch"):
        load_part_init(make(base), tmp_path / "shape.safetensors")
    save_file({"unet.nowhere.magnitude_modulator.proj.weight": torch.zeros(2, 2)}, str(tmp_path / "alien.safetensors"))
    with pytest.raises(CheckpointMismatchError, match="blocks the model lacks"):
        load_part_init(make(base), tmp_path / "alien.safetensors")


def test_tiny_controlnet_conditioning_matches_the_vae_downsampling(base):
    """The depth map comes at frame resolution; the ControlNet's conditioning embedding must bring it to the
    latent grid, whatever the VAE's downsampling (the toy VAE's latents are 1/4 of the frame)."""
    model = make(base)
    for down in (8, 4):
        cn = build_controlnet("tiny", seed=0, latent_downsample=down)
        x = torch.randn(1, 4, 2, 8, 8)
        depth = torch.rand(1, 3, 2, 8 * down, 8 * down)
        d, m = controlnet_residuals(cn, x, 5, torch.randn(1, 5, 32), depth)
        out = model(x, 5, torch.randn(1, 5, 32), down_block_additional_residuals=d, mid_block_additional_residual=m)
        assert out.sample.shape == x.shape
    with pytest.raises(ValueError, match="latent_downsample"):
        build_controlnet("tiny", latent_downsample=3)

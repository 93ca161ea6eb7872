"""ImageBind audio branch: official checkpoint layout, loading, forward maths, preprocessing."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchaudio.compliance import kaldi

from models.checkpoints import CheckpointMismatchError
from models.imagebind_audio import (
    FBANK_MEAN,
    FBANK_STD,
    ImageBindAudioEncoder,
    clip_sample_ranges,
    preprocess,
)

PAD_VALUE = (0.0 - FBANK_MEAN) / FBANK_STD  # a padded (all-zero) fbank cell after normalisation
SR = 16000


def _expected_official_shapes(width=768, blocks=12, out=1024, tokens=229) -> dict[str, tuple]:
    """The audio keys of imagebind_huge.pth, written out from the reference model definition."""
    pre, trunk = "modality_preprocessors.audio", "modality_trunks.audio"
    shapes = {
        f"{pre}.cls_token": (1, 1, width),
        f"{pre}.rgbt_stem.proj.weight": (width, 1, 16, 16),
        f"{pre}.rgbt_stem.norm_layer.weight": (width,),
        f"{pre}.rgbt_stem.norm_layer.bias": (width,),
        f"{pre}.pos_embedding_helper.pos_embed": (1, tokens, width),
        "modality_heads.audio.0.weight": (width,),
        "modality_heads.audio.0.bias": (width,),
        "modality_heads.audio.2.weight": (out, width),
        "modality_postprocessors.audio.1.log_logit_scale": (),
    }
    for i in range(blocks):
        b = f"{trunk}.blocks.{i}"
        shapes.update(
            {
                f"{b}.attn.in_proj_weight": (3 * width, width),
                f"{b}.attn.in_proj_bias": (3 * width,),
                f"{b}.attn.bias_k": (1, 1, width),
                f"{b}.attn.bias_v": (1, 1, width),
                f"{b}.attn.out_proj.weight": (width, width),
                f"{b}.attn.out_proj.bias": (width,),
                f"{b}.norm_1.weight": (width,),
                f"{b}.norm_1.bias": (width,),
                f"{b}.mlp.fc1.weight": (4 * width, width),
                f"{b}.mlp.fc1.bias": (4 * width,),
                f"{b}.mlp.fc2.weight": (width, 4 * width),
                f"{b}.mlp.fc2.bias": (width,),
                f"{b}.norm_2.weight": (width,),
                f"{b}.norm_2.bias": (width,),
            }
        )
    return shapes


def _unrelated_modalities() -> dict[str, torch.Tensor]:
    """A few vision/text entries as they appear in imagebind_huge.pth (small shapes: they must be ignored)."""
    return {
        "modality_preprocessors.vision.cls_token": torch.randn(1, 1, 8),
        "modality_preprocessors.vision.rgbt_stem.proj.1.weight": torch.randn(8, 3, 2, 2, 2),
        "modality_trunks.vision.pre_transformer_layer.0.weight": torch.ones(8),
        "modality_trunks.vision.blocks.0.attn.in_proj_weight": torch.randn(24, 8),
        "modality_preprocessors.text.token_embedding.weight": torch.randn(10, 8),
        "modality_heads.text.proj.1.weight": torch.randn(4, 8),
        "modality_postprocessors.text.1.log_logit_scale": torch.tensor(math.log(1 / 0.07)),
    }


# ------------------------------------------------------------------ full size


@pytest.fixture(scope="module")
def huge():
    return ImageBindAudioEncoder.huge(seed=0)


@pytest.fixture(scope="module")
def huge_checkpoint(huge, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "imagebind_huge.pth"
    state = {**_unrelated_modalities(), **huge.official_state_dict()}
    torch.save(state, path)
    return path


def test_full_size_layout_is_the_official_one(huge):
    got = {k: tuple(v.shape) for k, v in huge.official_state_dict().items()}
    assert got == _expected_official_shapes()
    assert len(got) == 177
    scale = huge.official_state_dict()["modality_postprocessors.audio.1.log_logit_scale"]
    assert scale.item() == pytest.approx(math.log(20.0))
    # the scale is a buffer, not a trainable parameter
    assert "postprocessor.1.log_logit_scale" not in dict(huge.named_parameters())
    # ours -> official mapping is 1:1 and total
    own = huge.state_dict()
    assert {ImageBindAudioEncoder.official_key(k) for k in own} == set(got)
    trunk_params = sum(p.numel() for p in huge.trunk.parameters())
    assert 85_000_000 < trunk_params < 85_100_000


def test_loads_official_layout_and_ignores_other_modalities(huge, huge_checkpoint):
    loaded = ImageBindAudioEncoder.from_checkpoint(huge_checkpoint)
    for k, v in huge.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # one clip per audio keeps the full-size forward cheap; the 3-clip mean is tested on tiny
    x = torch.randn(1, 1, 1, 128, 204, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        a, b = huge(x), loaded(x)
    assert a.shape == (1, 1024)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert float(a.norm()) == pytest.approx(20.0, rel=1e-5)
    assert float(a.std()) > 0.1  # a real embedding, not a constant


def test_rejects_checkpoint_missing_an_audio_key(huge, tmp_path):
    state = {**_unrelated_modalities(), **huge.official_state_dict()}
    del state["modality_trunks.audio.blocks.7.attn.bias_v"]
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointMismatchError, match=r"missing keys: modality_trunks\.audio\.blocks\.7\.attn\.bias_v"):
        ImageBindAudioEncoder.from_checkpoint(path)


def test_rejects_unexpected_or_misshaped_audio_keys_and_non_imagebind_files(tmp_path):
    tiny = ImageBindAudioEncoder.tiny()
    cfg = tiny.config
    extra = {**tiny.official_state_dict(), "modality_trunks.audio.blocks.9.norm_1.weight": torch.ones(32)}
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys: modality_trunks\.audio\.blocks\.9\.norm_1\.weight"):
        ImageBindAudioEncoder.from_checkpoint(tmp_path / "extra.pth", cfg)

    bad = tiny.official_state_dict()
    bad["modality_heads.audio.2.weight"] = torch.zeros(512, 32)
    torch.save(bad, tmp_path / "shape.pth")
    with pytest.raises(CheckpointMismatchError, match=r"shape mismatch: modality_heads\.audio\.2\.weight"):
        ImageBindAudioEncoder.from_checkpoint(tmp_path / "shape.pth", cfg)

    torch.save(_unrelated_modalities(), tmp_path / "vision_only.pth")
    with pytest.raises(CheckpointMismatchError, match="holds no audio keys"):
        ImageBindAudioEncoder.from_checkpoint(tmp_path / "vision_only.pth")

    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        ImageBindAudioEncoder.from_checkpoint(tmp_path / "nowhere.pth")


# ------------------------------------------------------------------ tiny preset and forward maths


def _reference_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, heads: int) -> torch.Tensor:
    """The audio path written from the reference's description, on the official key names,
    with the reference's sequence-first attention layout."""
    pre, trunk = "modality_preprocessors.audio.", "modality_trunks.audio."
    b, s = x.shape[:2]
    x = x.reshape(b * s, 1, 128, 204)
    t = F.conv2d(x, sd[pre + "rgbt_stem.proj.weight"], stride=10).flatten(2).transpose(1, 2)
    d = t.shape[-1]
    t = F.layer_norm(t, (d,), sd[pre + "rgbt_stem.norm_layer.weight"], sd[pre + "rgbt_stem.norm_layer.bias"], eps=1e-5)
    t = torch.cat([sd[pre + "cls_token"].expand(t.shape[0], -1, -1), t], 1) + sd[pre + "pos_embedding_helper.pos_embed"]
    t = t.transpose(0, 1)  # (L, N, D)
    i = 0
    while f"{trunk}blocks.{i}.norm_1.weight" in sd:
        p = f"{trunk}blocks.{i}."
        h = F.layer_norm(t, (d,), sd[p + "norm_1.weight"], sd[p + "norm_1.bias"], eps=1e-6)
        a, _ = F.multi_head_attention_forward(
            h, h, h, d, heads,
            sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"],
            sd[p + "attn.bias_k"], sd[p + "attn.bias_v"], False, 0.0,
            sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"],
            training=False, need_weights=False,
        )  # fmt: skip
        t = t + a
        h = F.layer_norm(t, (d,), sd[p + "norm_2.weight"], sd[p + "norm_2.bias"], eps=1e-6)
        h = F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])), sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        t = t + h
        i += 1
    t = t.transpose(0, 1)
    t = F.layer_norm(t, (d,), sd["modality_heads.audio.0.weight"], sd["modality_heads.audio.0.bias"], eps=1e-6)
    e = F.linear(t[:, 0], sd["modality_heads.audio.2.weight"])
    e = F.normalize(e, dim=-1) * sd["modality_postprocessors.audio.1.log_logit_scale"].exp().clamp(max=100)
    return e.reshape(b, s, -1).mean(1)


def test_tiny_matches_reference_maths_and_is_seeded():
    enc = ImageBindAudioEncoder.tiny(seed=0)
    assert enc.config.embed_dim == 32 and enc.config.num_blocks == 2 and enc.config.out_dim == 1024
    x = torch.randn(2, 3, 1, 128, 204, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        y = enc(x)
        ref = _reference_forward(enc.official_state_dict(), x, heads=2)
    assert y.shape == (2, 1024)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    # each clip's embedding has norm 20; their mean is shorter unless the clips agree
    with torch.inference_mode():
        per_clip = enc.embed_clips(x[0])
        same = enc(x[:1, :1].expand(1, 3, 1, 128, 204).contiguous())
    torch.testing.assert_close(per_clip.norm(dim=-1), torch.full((3,), 20.0))
    torch.testing.assert_close(y[0], per_clip.mean(0))
    assert float(y[0].norm()) < 20.0
    assert float(same.norm()) == pytest.approx(20.0, rel=1e-5)
    # seeded: same seed same weights, other seed other weights, caller's RNG untouched
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    again = ImageBindAudioEncoder.tiny(seed=0)
    assert torch.equal(torch.rand(1), before)
    assert all(torch.equal(a, b) for a, b in zip(enc.state_dict().values(), again.state_dict().values()))
    other = ImageBindAudioEncoder.tiny(seed=1)
    assert not torch.equal(other.trunk.blocks[0].attn.bias_k, enc.trunk.blocks[0].attn.bias_k)


def test_tiny_roundtrip_through_official_format(tmp_path):
    enc = ImageBindAudioEncoder.tiny(seed=3)
    torch.save({**_unrelated_modalities(), **enc.official_state_dict()}, tmp_path / "tiny.pth")
    loaded = ImageBindAudioEncoder.from_checkpoint(tmp_path / "tiny.pth", enc.config)
    x = torch.randn(1, 3, 1, 128, 204)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), enc(x), rtol=0, atol=0)


def test_forward_rejects_wrong_shapes():
    enc = ImageBindAudioEncoder.tiny()
    with pytest.raises(ValueError, match="add the batch dimension"):
        enc(torch.zeros(3, 1, 128, 204))
    with pytest.raises(ValueError, match=r"\(B, clips, 1, 128, 204\)"):
        enc(torch.zeros(1, 3, 1, 128, 200))


# ------------------------------------------------------------------ preprocessing


def _fbank(clip: np.ndarray) -> torch.Tensor:
    """Kaldi fbank as ImageBind configures it, (128, frames), unnormalised."""
    w = torch.from_numpy(clip[None].astype(np.float32))
    w = w - w.mean()
    return kaldi.fbank(
        w, htk_compat=True, sample_frequency=SR, use_energy=False, window_type="hanning",
        num_mel_bins=128, dither=0.0, frame_length=25, frame_shift=10,
    ).T  # fmt: skip


def _clicks_signal(seconds: float, clicks_at: list[float], seed: int = 0) -> np.ndarray:
    """Quiet noise with loud 5 ms noise bursts at known times: the burst positions identify the clip start."""
    rng = np.random.default_rng(seed)
    x = 1e-3 * rng.standard_normal(int(seconds * SR))
    for t in clicks_at:
        i = int(t * SR)
        x[i : i + SR // 200] += 0.5 * rng.standard_normal(SR // 200)
    return x.astype(np.float32)


def _zero_clip_means(x: np.ndarray) -> np.ndarray:
    """Shift the parts of a 5 s signal so each of the three clips has mean 0 (the in-place
    mean subtraction then changes nothing, and a plain per-slice fbank is the exact reference)."""
    x = x.astype(np.float64).copy()
    x[0:32000] -= x[0:32000].mean()
    x[32000:56000] -= x[24000:56000].sum() / 24000
    x[56000:80000] -= x[48000:80000].sum() / 24000
    return x.astype(np.float32)


def test_clip_ranges_follow_the_constant_clips_sampler():
    assert clip_sample_ranges(5 * SR) == [(0, 32000), (24000, 56000), (48000, 80000)]
    assert clip_sample_ranges(SR) == [(0, 32000)] * 3
    assert clip_sample_ranges(2 * SR) == [(0, 32000)] * 3
    # 3.3 s: the sampler computes 3.3 - 2 in float (1.2999999999999998), makes it an exact
    # Fraction and truncates start * 16000, so the starts land one sample early, as in ImageBind
    assert clip_sample_ranges(52800) == [(0, 32000), (10399, 42399), (20799, 52799)]
    # clips past the end are cut short by slicing (then padded after the fbank)
    assert clip_sample_ranges(40000) == [(0, 32000), (4000, 36000), (8000, 40000)]


def test_five_second_clip_starts_padding_and_values():
    clicks = [0.3, 2.4, 4.2]  # one per clip: [0, 2), [1.5, 3.5), [3, 5)
    x = _zero_clip_means(_clicks_signal(5.0, clicks))
    out = preprocess(torch.from_numpy(x)[None], SR)
    assert out.shape == (3, 1, 128, 204) and out.dtype == torch.float32

    # 2 s at 10 ms shift: 1 + (32000 - 400) // 160 = 198 frames, 6 padded columns
    pad = torch.tensor(0.0, dtype=torch.float32).sub(FBANK_MEAN).div(FBANK_STD)
    assert torch.equal(out[:, 0, :, 198:], pad.expand(3, 128, 6))
    assert float(pad) == pytest.approx(PAD_VALUE)
    assert not torch.isclose(out[:, 0, :, :198], pad).all(dim=1).any()  # no real frame looks padded

    # the loudest frame of each clip sits where its click is, relative to starts 0, 1.5, 3.0 s
    starts = [0.0, 1.5, 3.0]
    energy = out[:, 0, :, :198].sum(dim=1)  # monotone in the frame's log-Mel energy
    for k, (start, t_click) in enumerate(zip(starts, clicks)):
        expected_frame = (t_click + 0.0025 - start - 0.0125) / 0.010  # click centre vs window centre
        assert abs(int(energy[k].argmax()) - expected_frame) <= 1.01, (k, int(energy[k].argmax()), expected_frame)

    # and the values equal the normalised fbank of exactly those sample ranges
    for k, s in enumerate(starts):
        a = int(s * SR)
        ref = (_fbank(x[a : a + 2 * SR]) - FBANK_MEAN) / FBANK_STD
        torch.testing.assert_close(out[k, 0, :, :198], ref, rtol=0, atol=2e-4)


def test_mean_subtraction_is_in_place_as_in_imagebind():
    # ImageBind subtracts each clip's mean in place on the shared waveform, so the overlap
    # [1.5 s, 2 s) that clip 1 sees was already shifted by clip 0's mean: a step at 2 s.
    x = _clicks_signal(5.0, []) + np.float32(0.05)
    out = preprocess(torch.from_numpy(x)[None], SR)
    shared = x.astype(np.float32).copy()
    shared[0:32000] -= shared[0:32000].mean()
    ref1 = (_fbank(shared[24000:56000]) - FBANK_MEAN) / FBANK_STD
    naive1 = (_fbank(x[24000:56000]) - FBANK_MEAN) / FBANK_STD
    torch.testing.assert_close(out[1, 0, :, :198], ref1, rtol=0, atol=2e-4)
    # the step only touches the frames straddling relative sample 8000 (frames 48 and 49)
    gap = (out[1, 0, :, :198] - naive1).abs().amax(dim=0)
    assert float(gap[[48, 49]].min()) > 0.5
    assert float(gap[:48].max()) < 2e-4 and float(gap[50:].max()) < 2e-4


def test_one_second_clip_gives_three_identical_clips():
    x = _clicks_signal(1.0, [0.5], seed=1)
    out = preprocess(torch.from_numpy(x)[None], SR)
    assert out.shape == (3, 1, 128, 204)
    torch.testing.assert_close(out[1], out[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[2], out[0], rtol=0, atol=1e-5)
    # 1 s = 98 frames, the other 106 are padding
    assert torch.allclose(out[:, 0, :, 98:], torch.tensor(PAD_VALUE, dtype=torch.float32), atol=1e-6)
    assert not torch.isclose(out[0, 0, :, 97], torch.tensor(PAD_VALUE, dtype=torch.float32)).all()


def test_first_channel_only_any_rate_and_long_clips():
    rng = np.random.default_rng(2)
    t = np.arange(int(5 * 22050)) / 22050
    left = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)
    right = (0.3 * rng.standard_normal(t.size)).astype(np.float32)
    stereo = torch.from_numpy(np.stack([left, right]))
    mono = preprocess(stereo[:1], 22050)
    both = preprocess(stereo, 22050)
    # only channel 0 is heard; the other channel enters only through the clip means
    # (see the in-place test), i.e. in frames 48-49 of clips 1 and 2
    keep = torch.ones(204, dtype=torch.bool)
    keep[[48, 49]] = False
    torch.testing.assert_close(both[0], mono[0], rtol=0, atol=2e-4)
    torch.testing.assert_close(both[1:, :, :, keep], mono[1:, :, :, keep], rtol=0, atol=2e-4)
    # resampling is torchaudio's: same result as resampling first and passing 16 kHz
    import torchaudio.functional as AF

    torch.testing.assert_close(mono, preprocess(AF.resample(stereo[:1], 22050, SR), SR), rtol=0, atol=0)
    # caller's tensor is not modified by the in-place mean subtraction
    x16 = AF.resample(stereo[:1], 22050, SR)
    keep = x16.clone()
    preprocess(x16, SR)
    assert torch.equal(x16, keep)
    # 30 s: clips at 0, 14, 28 s, each a full 2 s: 198 real frames, 6 padded
    long = preprocess(torch.from_numpy(_clicks_signal(30.0, [14.5]))[None], SR)
    assert long.shape == (3, 1, 128, 204)
    assert int(long[1, 0, :, :198].sum(0).argmax()) in (48, 49, 50)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_cached_resampler_equals_torchaudio_functional(rate):
    import torchaudio.functional as AF

    from models.imagebind_audio import resample

    x = torch.randn(2, rate // 2, generator=torch.Generator().manual_seed(rate))
    assert torch.equal(resample(x, rate), AF.resample(x, orig_freq=rate, new_freq=SR))
    assert torch.equal(resample(x, rate), AF.resample(x, orig_freq=rate, new_freq=SR))  # cached kernel


def test_preprocess_edge_cases():
    tiny_clip = preprocess(torch.full((1, 200), 0.1), SR)  # shorter than one 25 ms window
    assert torch.allclose(tiny_clip, torch.tensor(PAD_VALUE, dtype=torch.float32))
    with pytest.raises(ValueError, match="NaN"):
        preprocess(torch.tensor([[0.0, float("nan")] * 1000]), SR)
    with pytest.raises(ValueError, match="no samples"):
        preprocess(torch.zeros(1, 0), SR)

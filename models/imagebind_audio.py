"""ImageBind-huge's audio branch (E_a, DESIGN 1) as an in-project torch module.

The `imagebind` package cannot be installed next to our torch, so this module
re-implements only the audio path and reads only its weights from the official
`imagebind_huge.pth`. Everything here follows the public reference
(facebookresearch/ImageBind: imagebind_model.py, multimodal_preprocessors.py,
transformer.py, helpers.py, data.py); the code is our own.

Architecture (defaults = ImageBind-huge audio):

    log-Mel image (1, 128, 204)
      -> Conv2d(1->768, kernel 16, stride 10, no bias)       # 12 x 19 = 228 patches
      -> flatten to tokens, LayerNorm (torch default eps 1e-5, as the reference's stem)
      -> prepend CLS token, add learned position embedding (229 tokens)
      -> 12 pre-norm blocks: x += MHA(LN(x)) with learned key/value bias tokens;
                             x += MLP(LN(x)), MLP = Linear 4x, GELU, Linear; LN eps 1e-6
      -> LayerNorm (eps 1e-6), take the CLS token, Linear 768->1024 (no bias)
      -> L2-normalise, multiply by min(exp(log_logit_scale), 100) = 20 (a fixed buffer)

Input (B, 3, 1, 128, 204): three 2 s clips per audio; each clip is embedded and
post-processed, then the three are averaged (the reference model's forward does
the same for any input with >= 5 dims).

State-dict layout. Our sub-modules mirror the official ones below one
shortened prefix each, so that keys map 1:1 (see `OFFICIAL_PREFIXES`):

    ours                 official (imagebind_huge.pth)
    preprocessor.<k>     modality_preprocessors.audio.<k>
    trunk.<k>            modality_trunks.audio.<k>
    head.<k>             modality_heads.audio.<k>
    postprocessor.<k>    modality_postprocessors.audio.<k>

The 177 official audio keys (huge):
    modality_preprocessors.audio.cls_token                      (1, 1, 768)
    modality_preprocessors.audio.rgbt_stem.proj.weight          (768, 1, 16, 16)
    modality_preprocessors.audio.rgbt_stem.norm_layer.{weight,bias}   (768,)
    modality_preprocessors.audio.pos_embedding_helper.pos_embed (1, 229, 768)
    modality_trunks.audio.blocks.{0..11}.attn.in_proj_weight    (2304, 768)
    modality_trunks.audio.blocks.{0..11}.attn.in_proj_bias      (2304,)
    modality_trunks.audio.blocks.{0..11}.attn.bias_k / bias_v   (1, 1, 768)
    modality_trunks.audio.blocks.{0..11}.attn.out_proj.{weight,bias}  (768, 768), (768,)
    modality_trunks.audio.blocks.{0..11}.norm_1 / norm_2.{weight,bias} (768,)
    modality_trunks.audio.blocks.{0..11}.mlp.fc1.{weight,bias}  (3072, 768), (3072,)
    modality_trunks.audio.blocks.{0..11}.mlp.fc2.{weight,bias}  (768, 3072), (768,)
    modality_heads.audio.0.{weight,bias}                        (768,)   LayerNorm
    modality_heads.audio.2.weight                               (1024, 768)
    modality_postprocessors.audio.1.log_logit_scale             ()  buffer, log(20)
The audio stem has a single conv, so the reference stores it as `proj` directly
(not `proj.1` as for vision), and the audio trunk has no pre-transformer
LayerNorm (its `pre_transformer_layer` holds only a no-parameter reshape), so no
`pre_transformer_layer.*` / `post_transformer_layer.*` keys exist for audio.
The reference loads this file with a strict `load_state_dict`, so these are
exactly the file's audio keys.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.checkpoints import CheckpointMismatchError, check_state_dict, load_state_dict

# ImageBind's audio preprocessing constants (imagebind/data.py defaults).
SAMPLE_RATE = 16000
CLIP_DURATION_S = 2
CLIPS_PER_AUDIO = 3
NUM_MEL_BINS = 128
TARGET_FRAMES = 204
FBANK_MEAN = -4.268
FBANK_STD = 9.138

# our sub-module name -> official key prefix in imagebind_huge.pth
OFFICIAL_PREFIXES = {
    "preprocessor": "modality_preprocessors.audio",
    "trunk": "modality_trunks.audio",
    "head": "modality_heads.audio",
    "postprocessor": "modality_postprocessors.audio",
}

_WHAT = "ImageBind audio branch"


@dataclass(frozen=True)
class AudioEncoderConfig:
    embed_dim: int = 768
    num_blocks: int = 12
    num_heads: int = 12
    mlp_ratio: int = 4
    out_dim: int = 1024
    kernel_size: int = 16
    stride: int = 10
    num_mel_bins: int = NUM_MEL_BINS
    target_frames: int = TARGET_FRAMES
    logit_scale: float = 20.0

    @property
    def patch_grid(self) -> tuple[int, int]:
        def n(size: int) -> int:
            return (size - self.kernel_size) // self.stride + 1

        return n(self.num_mel_bins), n(self.target_frames)

    @property
    def num_tokens(self) -> int:
        h, w = self.patch_grid
        return 1 + h * w


HUGE = AudioEncoderConfig()
TINY = AudioEncoderConfig(embed_dim=32, num_blocks=2, num_heads=2)


# ---------------------------------------------------------------- modules
# Container classes exist only to reproduce the official attribute names.


class _PatchStem(nn.Module):
    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        self.proj = nn.Conv2d(1, cfg.embed_dim, kernel_size=cfg.kernel_size, stride=cfg.stride, bias=False)
        self.norm_layer = nn.LayerNorm(cfg.embed_dim)  # default eps 1e-5, as the reference's audio stem

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_layer(self.proj(x).flatten(2).transpose(1, 2))


class _PosEmbed(nn.Module):
    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.embed_dim))


class _Preprocessor(nn.Module):
    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        self.rgbt_stem = _PatchStem(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embedding_helper = _PosEmbed(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.rgbt_stem(x)
        pos = self.pos_embedding_helper.pos_embed
        if tokens.shape[1] + 1 != pos.shape[1]:
            # The reference would interpolate here; our inputs always have the
            # trained size, so a mismatch means the preprocessing is wrong.
            raise ValueError(
                f"{_WHAT}: input gives {tokens.shape[1]} patches, the position embedding expects {pos.shape[1] - 1}; "
                f"inputs must be (1, 128, 204) log-Mel images from preprocess()"
            )
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1) + pos


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, nn.GELU's default


class _Block(nn.Module):
    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        d = cfg.embed_dim
        # batch_first only changes the call layout, not the parameters or maths.
        self.attn = nn.MultiheadAttention(d, cfg.num_heads, bias=True, add_bias_kv=True, batch_first=True)
        self.norm_1 = nn.LayerNorm(d, eps=1e-6)
        self.mlp = _Mlp(d, cfg.mlp_ratio * d)
        self.norm_2 = nn.LayerNorm(d, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm_2(x))


class _Trunk(nn.Module):
    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        self.blocks = nn.Sequential(*[_Block(cfg) for _ in range(cfg.num_blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class _SelectCLS(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]


class _L2Normalize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, p=2, dim=-1)


class _FixedLogitScale(nn.Module):
    """Multiply by exp(log_logit_scale), capped at 100 as in the reference; not trainable."""

    def __init__(self, scale: float):
        super().__init__()
        self.register_buffer("log_logit_scale", torch.tensor(math.log(scale), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(self.log_logit_scale.exp(), max=100.0) * x


class ImageBindAudioEncoder(nn.Module):
    """(B, 3, 1, 128, 204) log-Mel clips -> (B, out_dim) mean of the clips' scaled unit embeddings."""

    def __init__(self, config: AudioEncoderConfig = HUGE):
        super().__init__()
        if config.embed_dim % config.num_heads:
            raise ValueError(f"embed_dim {config.embed_dim} is not divisible by num_heads {config.num_heads}")
        self.config = config
        self.preprocessor = _Preprocessor(config)
        self.trunk = _Trunk(config)
        # indices 0 and 2 carry weights, as in the official Sequential heads
        self.head = nn.Sequential(
            nn.LayerNorm(config.embed_dim, eps=1e-6), _SelectCLS(), nn.Linear(config.embed_dim, config.out_dim, bias=False)
        )
        self.postprocessor = nn.Sequential(_L2Normalize(), _FixedLogitScale(config.logit_scale))

    # ------------------------------------------------------------ constructors
    @classmethod
    def huge(cls, seed: int | None = None) -> "ImageBindAudioEncoder":
        """Full-size architecture; random weights (seeded if `seed` is given). For real weights use from_checkpoint."""
        return cls._random(HUGE, seed)

    @classmethod
    def tiny(cls, seed: int = 0, **overrides) -> "ImageBindAudioEncoder":
        """Same class at toy sizes (width 32, 2 blocks, 2 heads, out 1024) with seeded random weights."""
        return cls._random(replace(TINY, **overrides), seed)

    @classmethod
    def _random(cls, config: AudioEncoderConfig, seed: int | None) -> "ImageBindAudioEncoder":
        gen_state = torch.random.get_rng_state()
        if seed is not None:
            torch.manual_seed(seed)
        try:
            model = cls(config)
            model._init_random()
        finally:
            if seed is not None:
                torch.random.set_rng_state(gen_state)  # leave the caller's RNG untouched
        return model.eval()

    @torch.no_grad()
    def _init_random(self) -> None:
        # Scales similar to the reference's initialisation so activations stay O(1);
        # a random model is only for tests and benchmarks.
        scale = self.config.embed_dim**-0.5
        pre = self.preprocessor
        nn.init.normal_(pre.cls_token, std=scale)
        nn.init.normal_(pre.pos_embedding_helper.pos_embed, std=scale)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.MultiheadAttention):
                nn.init.xavier_uniform_(m.in_proj_weight)
                nn.init.zeros_(m.in_proj_bias)
                nn.init.normal_(m.bias_k, std=0.02)
                nn.init.normal_(m.bias_v, std=0.02)
        # non-trivial LayerNorm affine parameters, so a loader that skips them is caught
        for m in self.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.normal_(1.0, 0.05)
                m.bias.normal_(0.0, 0.02)

    @classmethod
    def from_checkpoint(cls, path: str | Path, config: AudioEncoderConfig = HUGE) -> "ImageBindAudioEncoder":
        """Load the audio branch from an imagebind_huge.pth; other modalities are ignored.

        Strict on the audio keys: a missing, unexpected or wrongly shaped audio key
        raises CheckpointMismatchError naming the official key.
        """
        state = load_state_dict(path, _WHAT)  # mmap: other modalities' tensors are never read
        audio = {k: v for k, v in state.items() if any(k.startswith(p + ".") for p in OFFICIAL_PREFIXES.values())}
        if not audio:
            raise CheckpointMismatchError(
                f"{_WHAT}: checkpoint '{path}' holds no audio keys (expected keys under "
                f"{', '.join(p + '.' for p in OFFICIAL_PREFIXES.values())}); is it imagebind_huge.pth?"
            )
        model = cls(config)
        view = model.official_view()
        check_state_dict(view, audio, path, _WHAT)
        view.load_state_dict(audio, strict=True)
        return model.eval()

    # ------------------------------------------------------------ official layout
    def official_view(self) -> nn.Module:
        """A parameter-sharing wrapper whose state_dict keys are the official ones."""
        view = nn.Module()
        for ours, official in OFFICIAL_PREFIXES.items():
            outer, modality = official.split(".")
            view.add_module(outer, nn.ModuleDict({modality: getattr(self, ours)}))
        return view

    def official_state_dict(self) -> dict[str, torch.Tensor]:
        """This module's weights under imagebind_huge.pth's key names."""
        return dict(self.official_view().state_dict())

    @staticmethod
    def official_key(key: str) -> str:
        """Our state_dict key -> the official key (e.g. 'trunk.blocks.0.norm_1.weight')."""
        ours, _, rest = key.partition(".")
        return f"{OFFICIAL_PREFIXES[ours]}.{rest}"

    # ------------------------------------------------------------ forward
    def embed_clips(self, clips: torch.Tensor) -> torch.Tensor:
        """(N, 1, 128, 204) -> (N, out_dim) post-processed (unit norm x 20) embedding per clip."""
        tokens = self.trunk(self.preprocessor(clips))
        return self.postprocessor(self.head(tokens))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        expected = (1, cfg.num_mel_bins, cfg.target_frames)
        if x.ndim != 5 or tuple(x.shape[2:]) != expected:
            raise ValueError(
                f"{_WHAT}: expected input (B, clips, {', '.join(map(str, expected))}), got {tuple(x.shape)}; "
                f"preprocess() gives one audio's (clips, 1, 128, 204): add the batch dimension"
            )
        b, s = x.shape[:2]
        emb = self.embed_clips(x.reshape(b * s, *expected).to(self.head[2].weight.dtype))
        return emb.reshape(b, s, -1).mean(dim=1)


# ---------------------------------------------------------------- preprocessing


def clip_sample_ranges(num_samples: int, sample_rate: int = SAMPLE_RATE) -> list[tuple[int, int]]:
    """[start, end) sample indices of ImageBind's three 2 s clips.

    Mirrors pytorchvideo's ConstantClipsPerVideoSampler as ImageBind calls it:
    duration is a float, the maximal start max(duration - 2, 0) is turned into an
    exact Fraction, clip k starts at k * max_start / 2, ends 2 s later, and the
    indices are int(time * rate) (truncation). The end may pass the audio's end;
    slicing then gives a shorter clip, which is padded after the fbank.
    """
    duration = num_samples / sample_rate
    max_start = Fraction(max(duration - CLIP_DURATION_S, 0))
    step = max_start / max(CLIPS_PER_AUDIO - 1, 1)
    out = []
    for k in range(CLIPS_PER_AUDIO):
        start = step * k
        end = start + CLIP_DURATION_S
        out.append((int(start * sample_rate), int(end * sample_rate)))
    return out


_resamplers: dict[tuple[int, int, torch.dtype], torch.nn.Module] = {}


def resample(waveform: torch.Tensor, orig_freq: int, new_freq: int = SAMPLE_RATE) -> torch.Tensor:
    """torchaudio.functional.resample with its default settings, the windowed-sinc
    kernel cached per rate pair (building it costs more than applying it to a 5 s clip).
    Same kernel and same application, so the output is identical."""
    if orig_freq == new_freq:
        return waveform
    key = (int(orig_freq), int(new_freq), waveform.dtype)
    if key not in _resamplers:
        import torchaudio

        # Defaults = functional.resample's. The kernel must be computed in the
        # waveform's dtype, as the functional does (the transform's default is
        # float64 then cast, which differs in the last bits).
        _resamplers[key] = torchaudio.transforms.Resample(key[0], key[1], dtype=waveform.dtype)
    return _resamplers[key].to(waveform.device)(waveform)


def _fbank_image(clip: torch.Tensor) -> torch.Tensor:
    """(channels, n) 16 kHz clip -> (1, 128, 204) normalised Kaldi fbank of channel 0."""
    from torchaudio.compliance import kaldi

    frame_len = SAMPLE_RATE * 25 // 1000
    if clip.shape[1] >= frame_len:
        fbank = kaldi.fbank(
            clip[:1],
            htk_compat=True,
            sample_frequency=SAMPLE_RATE,
            use_energy=False,
            window_type="hanning",
            num_mel_bins=NUM_MEL_BINS,
            dither=0.0,
            frame_length=25,
            frame_shift=10,
        ).transpose(0, 1)
    else:
        # Shorter than one 25 ms window: no fbank frame at all (the reference
        # divides by zero here); the image is then all padding.
        fbank = clip.new_zeros(NUM_MEL_BINS, 0)
    pad = TARGET_FRAMES - fbank.shape[1]
    # Pad the raw fbank with zeros *before* normalising, as the reference does:
    # padded cells come out as (0 - mean) / std.
    fbank = F.pad(fbank, (0, pad)) if pad > 0 else fbank[:, :TARGET_FRAMES]
    return ((fbank - FBANK_MEAN) / FBANK_STD).unsqueeze(0)


def preprocess(waveform, sample_rate: int) -> torch.Tensor:
    """ImageBind's audio preprocessing: waveform (channels, samples) at any rate -> (3, 1, 128, 204).

    Steps (imagebind/data.py): float32; resample to 16 kHz as
    torchaudio.functional.resample (default settings, see `resample`); three 2 s clips
    (`clip_sample_ranges`); per clip subtract its mean, Kaldi fbank of the first
    channel (128 bins, 25 ms Hanning, 10 ms shift, dither 0, htk_compat, no
    energy), zero-pad / crop to 204 frames, normalise (x + 4.268) / 9.138.

    Two details copied on purpose so embeddings match the reference bit for bit:
    the clip mean is taken over all channels (the reference keeps every channel
    until the fbank picks channel 0), and it is subtracted in place from the
    shared resampled waveform, so a later overlapping clip sees the earlier
    clip's shift. Kaldi's per-frame DC removal makes both nearly invisible.
    A 1-D waveform is taken as mono.
    """
    wav = torch.as_tensor(np.asarray(waveform) if not isinstance(waveform, torch.Tensor) else waveform)
    if wav.ndim == 1:
        wav = wav.unsqueeze(0)
    if wav.ndim != 2 or wav.shape[0] < 1:
        raise ValueError(f"preprocess: expected a waveform (channels, samples), got shape {tuple(wav.shape)}")
    if wav.shape[1] == 0:
        raise ValueError("preprocess: the waveform has no samples")
    wav = wav.to(torch.float32)
    if not torch.isfinite(wav).all():
        raise ValueError("preprocess: the waveform holds NaN or infinite samples")
    sample_rate = int(sample_rate)
    if sample_rate <= 0:
        raise ValueError(f"preprocess: invalid sample rate {sample_rate}")
    if sample_rate != SAMPLE_RATE:
        wav = resample(wav, sample_rate)
    else:
        wav = wav.clone()  # the in-place mean subtraction below must not touch the caller's tensor
    images = []
    for start, end in clip_sample_ranges(wav.shape[1]):
        clip = wav[:, start:end]  # a view, on purpose (see docstring)
        clip -= clip.mean()
        images.append(_fbank_image(clip))
    return torch.stack(images)

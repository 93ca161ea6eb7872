"""Audio features stage (DESIGN 1, "Audio preprocessing"): the plain functions.

- `decode_audio`: any file soundfile or PyAV can read -> float32 (channels, samples).
- `magnitude` (M_a): per-frame loudness weights, mean 1.
- `mel_features` (F_a): log-Mel spectrogram pooled per video frame.
- `embed_clips` (E_a): ImageBind audio embeddings for many clips, one model for all.

Every problem with a clip is an `InvalidAudioError` (a ValueError) whose message
names the file (or the `source` label the caller gives).
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tasks.stage_lazy import torch  # imported on first use: planning needs no torch

from storage import StageKey
from storage.hashing import file_fingerprint
from tasks.stage import WorkItem, run_items
from tasks.stage_task import StageCachePolicy, run_logged_batch, task

# ---------------------------------------------------------------- errors


class InvalidAudioError(ValueError):
    """A clip cannot be used; the message names it and says what is wrong."""

    def __init__(self, source: str | os.PathLike | None, problem: str):
        self.source = os.fspath(source) if source is not None else "<waveform>"
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")


class AudioDecodeError(InvalidAudioError):
    """A file is empty, unreadable, or decodes to no (or non-finite) samples."""


def _check_waveform(waveform, source, what: str) -> torch.Tensor:
    """As a float tensor (channels, samples); 1-D counts as mono. Rejects empty and NaN/inf."""
    w = waveform if isinstance(waveform, torch.Tensor) else torch.as_tensor(np.asarray(waveform))
    if w.ndim == 1:
        w = w.unsqueeze(0)
    if w.ndim != 2:
        raise InvalidAudioError(source, f"{what}: expected a waveform (channels, samples), got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        w = w.to(torch.float32)
    if w.shape[0] == 0 or w.shape[1] == 0:
        raise InvalidAudioError(source, f"{what}: the waveform has no samples")
    bad = ~torch.isfinite(w)
    if bad.any():
        first = int(bad.any(dim=0).nonzero()[0, 0])
        raise InvalidAudioError(
            source, f"{what}: {int(bad.sum())} NaN/infinite samples (first at sample {first}); the file is corrupt"
        )
    return w


def _check_rate(sample_rate, source) -> int:
    sr = int(sample_rate)
    if sr <= 0:
        raise InvalidAudioError(source, f"invalid sample rate {sample_rate}")
    return sr


# ---------------------------------------------------------------- decoding


def decode_audio(path: str | os.PathLike) -> tuple[torch.Tensor, int]:
    """Decode a file to (float32 tensor (channels, samples), sample_rate).

    soundfile (libsndfile: WAV, FLAC, Ogg, MP3, AIFF, ...) is tried first, then
    PyAV (FFmpeg: AAC/M4A, video containers, anything else). Both decide the
    format from the content, so a misnamed file (an MP3 stream named .wav)
    still decodes. Integer PCM is scaled to [-1, 1) by both.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as e:
        raise AudioDecodeError(p, f"cannot be read ({e.strerror or e})") from e
    if not p.is_file():
        raise AudioDecodeError(p, "is not a file")
    if size == 0:
        raise AudioDecodeError(p, "is empty (0 bytes)")
    try:
        data, rate = _decode_soundfile(p)
    except Exception as sf_error:
        try:
            data, rate = _decode_av(p)
        except AudioDecodeError:
            raise
        except Exception as av_error:
            raise AudioDecodeError(
                p,
                f"cannot be decoded as audio (soundfile: {type(sf_error).__name__}: {sf_error}; "
                f"PyAV: {type(av_error).__name__}: {av_error})",
            ) from av_error
    if rate <= 0:
        raise AudioDecodeError(p, f"reports an invalid sample rate ({rate})")
    if data.shape[0] == 0 or data.shape[1] == 0:
        raise AudioDecodeError(p, "holds no audio samples")
    wav = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
    bad = ~torch.isfinite(wav)
    if bad.any():
        raise AudioDecodeError(p, f"holds {int(bad.sum())} NaN/infinite samples; the file is corrupt")
    return wav, int(rate)


def _decode_soundfile(p: Path) -> tuple[np.ndarray, int]:
    import soundfile as sf

    data, rate = sf.read(os.fspath(p), dtype="float32", always_2d=True)
    return data.T, int(rate)


def _decode_av(p: Path) -> tuple[np.ndarray, int]:
    import av

    with av.open(os.fspath(p)) as container:
        if not container.streams.audio:
            raise AudioDecodeError(p, "has no audio stream")
        stream = container.streams.audio[0]
        # Convert every frame to planar float at the stream's own rate and layout:
        # (channels, samples) arrays whatever the codec's native sample format.
        resampler = av.AudioResampler(format="fltp", layout=stream.layout, rate=stream.rate)
        chunks = []
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray())
        for out in resampler.resample(None):  # flush
            chunks.append(out.to_ndarray())
        rate = int(stream.rate or 0)
        channels = stream.layout.nb_channels if stream.layout else 0
    if not chunks:
        return np.zeros((max(channels, 1), 0), np.float32), rate
    return np.concatenate(chunks, axis=1), rate


# ---------------------------------------------------------------- M_a: magnitude


def _chunk_bounds(num_samples: int, num_chunks: int) -> np.ndarray:
    """Chunk k covers samples [b[k], b[k+1]), b[k] = floor(k * n / N): N near-equal chunks."""
    return (np.arange(num_chunks + 1, dtype=np.int64) * num_samples) // num_chunks


def magnitude(
    waveform, sample_rate: int, num_frames: int, temperature: float = 0.25, *, source: str | os.PathLike | None = None
) -> torch.Tensor:
    """M_a (DESIGN 1): (num_frames,) float32 weights with mean 1; louder chunk -> larger value.

    Mono mix (mean over channels); N = num_frames near-equal chunks of samples;
    m = mean |amplitude| per chunk, divided by the largest chunk mean (silence
    stays all zero); result N * softmax(m / temperature). Silence and constant
    signals give all ones, a very large temperature gives (nearly) all ones.

    With fewer samples than frames, the chunks are empty for some frames: each
    frame then takes the sample at its start position (nearest-neighbour
    repetition), so the output still has one value per frame. The sample rate
    does not enter the computation (chunks split the clip's own duration); it
    is validated only.
    """
    w = _check_waveform(waveform, source, "magnitude")
    _check_rate(sample_rate, source)
    n_frames = int(num_frames)
    if n_frames < 1:
        raise InvalidAudioError(source, f"magnitude: num_frames must be >= 1, got {num_frames}")
    if not temperature > 0:
        raise InvalidAudioError(source, f"magnitude: temperature must be > 0, got {temperature}")
    amp = w.to(torch.float64).mean(dim=0).abs()  # float64 so long clips sum without drift
    n = amp.shape[0]
    if n >= n_frames:
        bounds = torch.from_numpy(_chunk_bounds(n, n_frames))
        csum = torch.cat([amp.new_zeros(1), amp.cumsum(0)])
        m = (csum[bounds[1:]] - csum[bounds[:-1]]) / (bounds[1:] - bounds[:-1])
    else:
        m = amp[torch.from_numpy(_chunk_bounds(n, n_frames)[:-1])]
    peak = m.max()
    m = m / peak if peak > 0 else torch.zeros_like(m)
    return (n_frames * torch.softmax(m / float(temperature), dim=0)).to(torch.float32)


# ---------------------------------------------------------------- F_a: log-Mel

# Mel settings. Computed at 16 kHz whatever the file's rate: the mel bands then
# mean the same frequencies for every clip (F_a feeds a learned encoder) and
# match what ImageBind hears; content above 8 kHz is dropped.
MEL_SAMPLE_RATE = 16000
MEL_N_FFT = 1024  # 64 ms window: ~16 Hz bins, so all 128 HTK bands below 8 kHz get FFT bins
MEL_HOP = 160  # 10 ms: several STFT frames per video frame to average
MEL_POWER = 2.0  # power spectrogram
# log floor: 1e-6 power keeps digital silence finite (log = -13.8) and sits far
# below audible content of [-1, 1] audio with this window (a -60 dBFS tone gives
# ~5e-2 in its band); it is about the level of 16-bit quantisation noise
# (1e-8 to 1e-6 per band), so silence and dither-level noise both sit near it.
MEL_LOG_EPS = 1e-6

_mel_cache: dict[int, torch.nn.Module] = {}


def _mel_transform(n_mels: int) -> torch.nn.Module:
    """torchaudio MelSpectrogram: periodic Hann window of n_fft, centred (reflect-padded) frames, HTK mel, no norm."""
    if n_mels not in _mel_cache:
        import torchaudio

        _mel_cache[n_mels] = torchaudio.transforms.MelSpectrogram(
            sample_rate=MEL_SAMPLE_RATE,
            n_fft=MEL_N_FFT,
            win_length=MEL_N_FFT,
            hop_length=MEL_HOP,
            f_min=0.0,
            f_max=MEL_SAMPLE_RATE / 2,
            n_mels=n_mels,
            window_fn=torch.hann_window,
            power=MEL_POWER,
            center=True,
            pad_mode="reflect",
            norm=None,
            mel_scale="htk",
        )
    return _mel_cache[n_mels]


def frame_chunk_index(num_stft_frames: int, num_samples: int, num_frames: int, hop: int = MEL_HOP) -> np.ndarray:
    """Video frame of each STFT frame: the chunk holding its centre (j * hop), or -1 past the end."""
    centres = np.arange(num_stft_frames, dtype=np.int64) * hop
    idx = (centres * num_frames) // num_samples
    idx[centres >= num_samples] = -1
    return idx


def mel_features(
    waveform, sample_rate: int, num_frames: int, n_mels: int = 128, *, source: str | os.PathLike | None = None
) -> torch.Tensor:
    """F_a (DESIGN 1): (num_frames, n_mels) float32 log-Mel spectrogram pooled per video frame.

    Mono mix (mean over channels), resample to 16 kHz, power Mel spectrogram
    (n_fft = window = 1024, hop 160, periodic Hann, centred frames, HTK scale,
    0-8 kHz), log(mel + 1e-6). The clip's duration is split into num_frames
    equal chunks (as `magnitude`); each chunk is the mean log-Mel of the STFT
    frames whose centre falls in it. A chunk shorter than the hop may hold no
    centre: it takes the STFT frame nearest to its middle.
    """
    from models.imagebind_audio import resample

    w = _check_waveform(waveform, source, "mel_features")
    sr = _check_rate(sample_rate, source)
    n_frames = int(num_frames)
    if n_frames < 1:
        raise InvalidAudioError(source, f"mel_features: num_frames must be >= 1, got {num_frames}")
    mono = w.to(torch.float32).mean(dim=0)
    if sr != MEL_SAMPLE_RATE:
        mono = resample(mono, sr, MEL_SAMPLE_RATE)
    n = mono.shape[0]
    if n <= MEL_N_FFT // 2:
        # reflect padding needs more samples than half a window; zeros after the
        # end only add frames past the clip, which are ignored below
        mono = torch.nn.functional.pad(mono, (0, MEL_N_FFT // 2 + 1 - n))
    logmel = torch.log(_mel_transform(int(n_mels))(mono) + MEL_LOG_EPS).T  # (stft_frames, n_mels)

    owner = torch.from_numpy(frame_chunk_index(logmel.shape[0], n, n_frames))
    valid = owner >= 0
    sums = logmel.new_zeros(n_frames, logmel.shape[1]).index_add_(0, owner[valid], logmel[valid])
    counts = torch.bincount(owner[valid], minlength=n_frames)
    out = sums / counts.clamp(min=1).unsqueeze(1).to(sums.dtype)
    empty = (counts == 0).nonzero().flatten()
    if len(empty):
        middle = (empty.to(torch.float64) + 0.5) * n / n_frames
        nearest = torch.round(middle / MEL_HOP).long().clamp(0, int(valid.sum()) - 1)
        out[empty] = logmel[nearest]
    return out


# ---------------------------------------------------------------- E_a: embeddings


@torch.inference_mode()
def embed_clips(
    encoder: torch.nn.Module,
    waveforms: Iterable[tuple[torch.Tensor, int]],
    *,
    batch_size: int = 8,
    sources: Sequence[str] | None = None,
) -> torch.Tensor:
    """ImageBind embeddings (n, 1024) for many (waveform, sample_rate) pairs with one encoder.

    Preprocessing runs on CPU per clip; the encoder runs on its own device and
    dtype, `batch_size` clips at a time. Row i belongs to the i-th input.
    """
    from models.imagebind_audio import preprocess

    param = next(encoder.parameters())
    images = []
    for i, (wav, sr) in enumerate(waveforms):
        src = sources[i] if sources is not None else f"clip {i}"
        w = _check_waveform(wav, src, "embedding")
        images.append(preprocess(w, _check_rate(sr, src)))
    if not images:
        return torch.zeros(0, getattr(getattr(encoder, "config", None), "out_dim", 1024))
    was_training = encoder.training
    encoder.eval()
    out = []
    try:
        step = max(int(batch_size), 1)
        for start in range(0, len(images), step):
            batch = torch.stack(images[start : start + step]).to(device=param.device, dtype=param.dtype)
            out.append(encoder(batch).float().cpu())
    finally:
        encoder.train(was_training)
    return torch.cat(out)


# ---------------------------------------------------------------- the stage

STAGE = "audio"


def model_identity(cfg) -> dict:
    """What identifies the audio encoder in cache keys: the preset, or the weights file."""
    if cfg.models.preset == "tiny":
        return {"preset": "tiny", "seed": cfg.models.seed}
    return {"preset": cfg.models.preset, "imagebind": file_fingerprint(cfg.models.paths.imagebind)}


def work_items(cfg, catalog) -> list:
    """One item per catalogued clip; its key covers the clip's bytes, the parameters and the model."""
    sc = cfg.stages.audio
    params = {"num_frames": cfg.num_frames, "temperature": sc.temperature, "n_mels": sc.n_mels,
              "model": model_identity(cfg)}
    from tasks.grid import selected_clips

    wanted = selected_clips(cfg, catalog)
    items = []
    for e in catalog.entries:
        if e["media"] != "audio" or e["id"] not in wanted:
            continue
        key = StageKey.build(STAGE, sc.code_version, params, inputs={"audio": e["content_hash"]})
        items.append(WorkItem(stage=STAGE, item_id=e["id"], artifact=f"audio/{e['id']}", key=key,
                              audio_id=e["id"], payload={"path": e["path"], "label": e["label"]}))
    return items


def load_encoder(cfg) -> torch.nn.Module:
    from models.imagebind_audio import ImageBindAudioEncoder

    if cfg.models.preset == "tiny":
        enc = ImageBindAudioEncoder.tiny(seed=cfg.models.seed)
    else:
        enc = ImageBindAudioEncoder.from_checkpoint(cfg.models.paths.imagebind)
    return enc.to(cfg.models.device).eval()


def run_batch(cfg, items, store, ledger, progress=None, encoder: torch.nn.Module | None = None, claims=None):
    """Compute E_a, M_a and F_a for each item into Zarr audio/{id}; the encoder is loaded once."""
    sc = cfg.stages.audio
    encoder = encoder if encoder is not None else load_encoder(cfg)

    def compute(item, writer) -> None:
        path = item.payload["path"]
        wav, sr = decode_audio(path)
        emb = embed_clips(encoder, [(wav, sr)], sources=[path])[0]
        writer.write("embedding", emb.numpy().astype(np.float32))
        writer.write("magnitude", magnitude(wav, sr, cfg.num_frames, sc.temperature, source=path).numpy().astype(np.float32))
        writer.write("mel", mel_features(wav, sr, cfg.num_frames, sc.n_mels, source=path).numpy().astype(np.float32))
        writer.set_attrs(sample_rate=int(sr), num_samples=int(wav.shape[-1]), channels=int(wav.shape[0]),
                         label=item.payload.get("label"), source=str(path))

    return run_items(items, store, ledger, compute, progress=progress, claims=claims)


@task(name="audio-features", cache_policy=StageCachePolicy())
def stage_task(cfg, items) -> dict:
    """Prefect task over one batch; returns ids only (the data is in Zarr)."""
    return run_logged_batch(STAGE, run_batch, cfg, items)

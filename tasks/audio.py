"""Audio features stage (DESIGN 1, "Audio preprocessing"): the plain functions.

- `decode_audio`: any file soundfile or PyAV can read -> float32 (channels, samples).
- `magnitude` (M_a): per-frame loudness weights, mean 1, the whole waveform in N chunks.
- `mel_features` (F_a): log-Mel spectrogram pooled per video frame, likewise.
- `envelope`, `mel_frames`: what the stage stores per clip (100 Hz envelope, 10 ms log-Mel
  frames), independent of any frame rate; `magnitude_from_envelope` and `mel_for_frames`
  derive an edit's M_a and F_a from them for its own chunks (chunk k = the sound under frame k).
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


def _log_mel(waveform, sample_rate, n_mels: int, source, what: str) -> tuple[torch.Tensor, int]:
    """(stft_frames, n_mels) log-Mel of the mono mix at 16 kHz, and the clip's sample count at 16 kHz."""
    from models.imagebind_audio import resample

    w = _check_waveform(waveform, source, what)
    sr = _check_rate(sample_rate, source)
    mono = w.to(torch.float32).mean(dim=0)
    if sr != MEL_SAMPLE_RATE:
        mono = resample(mono, sr, MEL_SAMPLE_RATE)
    n = mono.shape[0]
    if n <= MEL_N_FFT // 2:
        # reflect padding needs more samples than half a window; zeros after the
        # end only add frames past the clip, which are ignored by the callers
        mono = torch.nn.functional.pad(mono, (0, MEL_N_FFT // 2 + 1 - n))
    return torch.log(_mel_transform(int(n_mels))(mono) + MEL_LOG_EPS).T, int(n)


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
    n_frames = int(num_frames)
    if n_frames < 1:
        _check_waveform(waveform, source, "mel_features")
        raise InvalidAudioError(source, f"mel_features: num_frames must be >= 1, got {num_frames}")
    logmel, n = _log_mel(waveform, sample_rate, n_mels, source, "mel_features")

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


# ---------------------------------------------------------------- stored features -> per-frame M_a, F_a
#
# The audio stage stores, per clip, features that do not depend on any video's frame
# rate: a 100 Hz envelope (mean |amplitude| of the mono mix per 10 ms bin, at the
# clip's own rate) and log-Mel frames at the 10 ms hop above. An edit (or a
# fine-tuning run) splits the time axis into its own N chunks, chunk k = the sound
# played under frame k, and derives M_a and F_a from those stored features.

ENVELOPE_RATE = 100  # bins per second: a 10 ms envelope
AUDIO_FITS = ("pad", "loop")  # past the clip's end: silence, or the clip again from its start


def envelope(waveform, sample_rate: int, *, source: str | os.PathLike | None = None) -> np.ndarray:
    """(ceil(n * 100 / sr),) float32: mean |amplitude| of the mono mix per 10 ms bin.

    Bin j covers samples [floor(j * sr / 100), floor((j + 1) * sr / 100)) of the clip at
    its own rate (the last bin may be shorter); time t seconds lies in bin floor(100 t).
    """
    w = _check_waveform(waveform, source, "envelope")
    sr = _check_rate(sample_rate, source)
    amp = w.to(torch.float64).mean(dim=0).abs()
    n = amp.shape[0]
    bins = -(-n * ENVELOPE_RATE // sr)  # ceil
    bounds = torch.from_numpy(np.minimum((np.arange(bins + 1, dtype=np.int64) * sr) // ENVELOPE_RATE, n))
    csum = torch.cat([amp.new_zeros(1), amp.cumsum(0)])
    lengths = (bounds[1:] - bounds[:-1]).clamp(min=1)
    return ((csum[bounds[1:]] - csum[bounds[:-1]]) / lengths).numpy().astype(np.float32)


def mel_frames(waveform, sample_rate: int, n_mels: int = 128, *, source: str | os.PathLike | None = None
               ) -> tuple[np.ndarray, float]:
    """log-Mel frames (T, n_mels) float32 at the 10 ms hop, and the clip's duration at 16 kHz (seconds).

    Exactly `mel_features`' spectrogram before pooling (mono, 16 kHz, n_fft 1024, hop 160,
    centred frames); frame j is centred at j * 10 ms. Only frames centred inside the clip
    are kept: T = ceil(n16 / 160) for n16 samples at 16 kHz.
    """
    logmel, n16 = _log_mel(waveform, sample_rate, n_mels, source, "mel_frames")
    keep = -(-n16 // MEL_HOP)
    return logmel[:keep].numpy().astype(np.float32), n16 / MEL_SAMPLE_RATE


def frame_edges(num_frames: int, fps: float) -> np.ndarray:
    """(N + 1,) chunk edges in seconds of a span played at `fps`: chunk k = [k / fps, (k + 1) / fps)."""
    if int(num_frames) < 1 or not fps > 0:
        raise ValueError(f"frame_edges: need num_frames >= 1 and fps > 0, got {num_frames}, {fps}")
    return np.arange(int(num_frames) + 1, dtype=np.float64) / float(fps)


def _fit_time(t: np.ndarray, duration: float, fit: str) -> tuple[np.ndarray, np.ndarray]:
    """Times past the clip's end: (time in the clip, whether the sound is there) for pad / loop."""
    if fit not in AUDIO_FITS:
        raise ValueError(f"audio_fit must be one of {AUDIO_FITS}, got {fit!r}")
    t = np.asarray(t, np.float64)
    if fit == "loop" and duration > 0:
        return np.mod(t, duration), np.ones(t.shape, bool)
    return t, t < duration


def _envelope_integral(env: np.ndarray, duration: float, t: np.ndarray, fit: str) -> np.ndarray:
    """Integral of the piecewise-constant envelope (bin j on [j/100, (j+1)/100) within the clip) over [0, t)."""
    env = np.asarray(env, np.float64)
    rate = float(ENVELOPE_RATE)
    # bin j lasts from j / rate to min((j + 1) / rate, duration)
    starts = np.arange(len(env)) / rate
    ends = np.minimum(starts + 1 / rate, duration)
    cum = np.concatenate([[0.0], np.cumsum(env * np.maximum(ends - starts, 0.0))])
    total = cum[-1]

    def within(x):  # integral over [0, x) for 0 <= x <= duration
        x = np.clip(x, 0.0, duration)
        j = np.minimum((x * rate).astype(np.int64), len(env) - 1)
        return cum[j] + env[j] * np.maximum(x - starts[j], 0.0)

    t = np.asarray(t, np.float64)
    if fit == "loop" and duration > 0:
        periods = np.floor(t / duration)
        return periods * total + within(t - periods * duration)
    return within(np.minimum(t, duration))


def chunk_means(env: np.ndarray, duration: float, edges: np.ndarray, fit: str = "pad") -> np.ndarray:
    """Mean |amplitude| of each chunk [edges[k], edges[k+1]) from a stored envelope; silence past the
    clip's end (pad) or the clip again (loop)."""
    edges = np.asarray(edges, np.float64)
    if fit not in AUDIO_FITS:
        raise ValueError(f"audio_fit must be one of {AUDIO_FITS}, got {fit!r}")
    if len(env) == 0 or duration <= 0:
        return np.zeros(len(edges) - 1)
    integral = _envelope_integral(env, duration, edges, fit)
    widths = np.diff(edges)
    means = np.diff(integral) / np.where(widths > 0, widths, 1.0)
    # A chunk shorter than nothing (equal edges): the envelope value at that time.
    zero = widths <= 0
    if zero.any():
        t, inside = _fit_time(edges[:-1][zero], duration, fit)
        j = np.minimum((t * ENVELOPE_RATE).astype(np.int64), len(env) - 1)
        means[zero] = np.where(inside, np.asarray(env, np.float64)[j], 0.0)
    return means


def weights_from_means(m, temperature: float) -> torch.Tensor:
    """Eq. 4: m / max(m) (silence stays all zero), then N * softmax(m / tau); float32, mean 1, never NaN."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    m = torch.as_tensor(np.asarray(m, np.float64))
    n = m.shape[0]
    peak = m.max() if n else torch.tensor(0.0, dtype=torch.float64)
    m = m / peak if peak > 0 else torch.zeros_like(m)
    return (n * torch.softmax(m / float(temperature), dim=0)).to(torch.float32)


def magnitude_from_envelope(env, duration: float, edges, temperature: float = 0.25, fit: str = "pad"
                            ) -> torch.Tensor:
    """M_a (N,) for the chunks [edges[k], edges[k+1]) seconds of a clip, from its stored envelope.

    Agrees with `magnitude(waveform, sr, N)` when the chunks are the waveform's N equal
    chunks and their edges fall on 10 ms bins (and closely otherwise: the envelope is taken
    as constant within a bin). Past the clip's end: silence (pad) or the clip looped.
    """
    return weights_from_means(chunk_means(env, duration, edges, fit), temperature)


def mel_for_frames(mel: np.ndarray, duration: float, edges, fit: str = "pad") -> torch.Tensor:
    """F_a (N, n_mels) float32: per chunk [edges[k], edges[k+1]), the mean of the stored log-Mel
    frames whose centre (j * 10 ms) falls in it; a chunk holding no centre takes the frame nearest
    to its middle. `duration`: the clip's duration at 16 kHz (mel_frames' second value).

    Past the clip's end: digital silence (log of the floor, pad) or the clip again (loop).
    Equal to `mel_features(waveform, sr, N)` when edges = linspace(0, duration, N + 1).
    """
    mel = np.asarray(mel, np.float32)
    edges = np.asarray(edges, np.float64)
    n_chunks = len(edges) - 1
    n_mels = mel.shape[1]
    silence = np.float32(np.log(MEL_LOG_EPS))
    if fit not in AUDIO_FITS:
        raise ValueError(f"audio_fit must be one of {AUDIO_FITS}, got {fit!r}")
    if n_chunks < 1:
        return torch.zeros(0, n_mels)
    hop_s = MEL_HOP / MEL_SAMPLE_RATE
    n_valid = len(mel)
    if n_valid == 0:
        return torch.full((n_chunks, n_mels), float(silence))
    # Virtual frames at j * hop over the whole span; each maps to a stored frame, or to silence.
    # Centre times are compared in samples at 16 kHz (integers), as mel_features does.
    total = int(np.ceil(edges[-1] / hop_s + 1e-9)) + 1
    centres = np.arange(total, dtype=np.int64) * MEL_HOP  # samples at 16 kHz
    edge_s = np.round(edges * MEL_SAMPLE_RATE * 1e6) / 1e6  # edges in (fractional) samples
    owner = np.searchsorted(edge_s, centres, side="right") - 1
    owner[(centres < edge_s[0]) | (centres >= edge_s[-1])] = -1
    n16 = duration * MEL_SAMPLE_RATE
    t_samples = centres.astype(np.float64)
    if fit == "loop" and n16 > 0:
        t_samples = np.mod(t_samples, n16)
        inside = np.ones(total, bool)
    else:
        inside = t_samples < n16
    src = np.clip(np.floor(t_samples / MEL_HOP + 0.5).astype(np.int64), 0, n_valid - 1)
    rows = np.where(inside[:, None], mel[src], silence)
    valid = owner >= 0
    sums = np.zeros((n_chunks, n_mels), np.float64)
    np.add.at(sums, owner[valid], rows[valid])
    counts = np.bincount(owner[valid], minlength=n_chunks)
    out = sums / np.maximum(counts, 1)[:, None]
    for k in np.flatnonzero(counts == 0):
        middle = 0.5 * (edges[k] + edges[k + 1]) * MEL_SAMPLE_RATE
        t, ok = (np.mod(middle, n16), True) if fit == "loop" and n16 > 0 else (middle, middle < n16)
        out[k] = mel[int(np.clip(np.round(t / MEL_HOP), 0, n_valid - 1))] if ok else silence
    return torch.from_numpy(out.astype(np.float32))


def span_condition(features: dict, num_frames: int, edges, temperature: float, fit: str = "pad"
                   ) -> dict[str, torch.Tensor]:
    """E_a (1024,), M_a (N,) and F_a (N, n_mels) of one clip for one span, from the audio stage's
    stored features (`read_features`). edges: (N + 1,) chunk edges in seconds (chunk k = the sound
    under frame k), or None for the whole clip in N equal chunks (span "frames", as `magnitude`
    and `mel_features` split a waveform)."""
    env_dur, mel_dur = float(features["duration_s"]), float(features["mel_duration_s"])
    n = int(num_frames)
    env_edges = np.linspace(0.0, env_dur, n + 1) if edges is None else edges
    mel_edges = np.linspace(0.0, mel_dur, n + 1) if edges is None else edges
    if len(env_edges) != n + 1:
        raise ValueError(f"span_condition: {len(env_edges)} edges for {n} frames")
    return {
        "embedding": torch.from_numpy(np.asarray(features["embedding"], np.float32)),
        "magnitude": magnitude_from_envelope(features["envelope"], env_dur, env_edges, temperature, fit),
        "mel": mel_for_frames(features["mel"], mel_dur, mel_edges, fit),
    }


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

FEATURE_ARRAYS = ("embedding", "envelope", "mel")


def read_features(store, artifact: str, key: str, what: str = "audio") -> dict | None:
    """The stored arrays and the durations of a complete audio artifact (None if not complete)."""
    data = store.read(artifact, key, names=list(FEATURE_ARRAYS))
    if data is None:
        return None
    attrs = store.attrs(artifact, key) or {}
    if "duration_s" not in attrs or "envelope" not in data:
        return None
    return {**data, "duration_s": float(attrs["duration_s"]), "mel_duration_s": float(attrs["mel_duration_s"])}


STAGE = "audio"


def model_identity(cfg) -> dict:
    """What identifies the audio encoder in cache keys: the preset, or the weights file."""
    if cfg.models.preset == "tiny":
        return {"preset": "tiny", "seed": cfg.models.seed}
    if cfg.models.preset == "toy":
        from models import toy

        return toy.identity("imagebind")
    return {"preset": cfg.models.preset, "imagebind": file_fingerprint(cfg.models.paths.imagebind)}


def params(cfg) -> dict:
    """What the stored features depend on. Not the temperature nor any frame count: M_a and F_a
    are derived per edit (and per fine-tuning run) from these rate-independent features."""
    sc = cfg.stages.audio
    return {"n_mels": sc.n_mels, "model": model_identity(cfg),
            "features": {"envelope_rate": ENVELOPE_RATE, "mel_hop": MEL_HOP, "mel_rate": MEL_SAMPLE_RATE,
                         "mel_n_fft": MEL_N_FFT}}


def work_items(cfg, catalog) -> list:
    """One item per catalogued clip; its key covers the clip's bytes, the parameters and the model."""
    sc = cfg.stages.audio
    p = params(cfg)
    from tasks.grid import selected_clips

    wanted = selected_clips(cfg, catalog)
    items = []
    for e in catalog.entries:
        if e["media"] != "audio" or e["id"] not in wanted:
            continue
        key = StageKey.build(STAGE, sc.code_version, p, inputs={"audio": e["content_hash"]})
        items.append(WorkItem(stage=STAGE, item_id=e["id"], artifact=f"audio/{e['id']}", key=key,
                              audio_id=e["id"], payload={"path": e["path"], "label": e["label"]}))
    return items


def load_encoder(cfg) -> torch.nn.Module:
    from models.imagebind_audio import ImageBindAudioEncoder

    if cfg.models.preset == "tiny":
        enc = ImageBindAudioEncoder.tiny(seed=cfg.models.seed)
    elif cfg.models.preset == "toy":
        from models import toy

        enc = toy.load_audio_encoder()
    else:
        enc = ImageBindAudioEncoder.from_checkpoint(cfg.models.paths.imagebind)
    return enc.to(cfg.models.device).eval()


def run_batch(cfg, items, store, ledger, progress=None, encoder: torch.nn.Module | None = None, claims=None):
    """Store E_a, the 100 Hz envelope and the 10 ms log-Mel frames of each item into Zarr audio/{id}
    (the encoder is loaded once). Arrays: "embedding" (1024,), "envelope" (ceil(100 d),),
    "mel" (ceil(100 d16), n_mels); attributes duration_s (at the clip's rate) and mel_duration_s
    (at 16 kHz). `read_features` + `span_condition` turn them into an edit's M_a and F_a."""
    sc = cfg.stages.audio
    encoder = encoder if encoder is not None else load_encoder(cfg)

    def compute(item, writer) -> None:
        path = item.payload["path"]
        wav, sr = decode_audio(path)
        emb = embed_clips(encoder, [(wav, sr)], sources=[path])[0]
        mel, mel_duration = mel_frames(wav, sr, sc.n_mels, source=path)
        writer.write("embedding", emb.numpy().astype(np.float32))
        writer.write("envelope", envelope(wav, sr, source=path))
        writer.write("mel", mel)
        writer.set_attrs(sample_rate=int(sr), num_samples=int(wav.shape[-1]), channels=int(wav.shape[0]),
                         duration_s=int(wav.shape[-1]) / int(sr), mel_duration_s=mel_duration,
                         envelope_rate=ENVELOPE_RATE, mel_hop_s=MEL_HOP / MEL_SAMPLE_RATE,
                         label=item.payload.get("label"), source=str(path))

    return run_items(items, store, ledger, compute, progress=progress, claims=claims)


@task(name="audio-features", cache_policy=StageCachePolicy())
def stage_task(cfg, items) -> dict:
    """Prefect task over one batch; returns ids only (the data is in Zarr)."""
    return run_logged_batch(STAGE, run_batch, cfg, items)

"""Audio stage functions: decoding, magnitude (M_a), log-Mel (F_a), batched embeddings (E_a)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import scipy.signal
import soundfile as sf
import torch

from models.imagebind_audio import ImageBindAudioEncoder, preprocess
from tasks.audio import (
    ENVELOPE_RATE,
    MEL_HOP,
    MEL_LOG_EPS,
    MEL_N_FFT,
    AudioDecodeError,
    InvalidAudioError,
    decode_audio,
    embed_clips,
    envelope,
    frame_edges,
    magnitude,
    magnitude_from_envelope,
    mel_features,
    mel_for_frames,
    mel_frames,
    span_condition,
)


def _fixtures_audio() -> Path | None:
    """$AUDIOSCENIC_FIXTURES/audio, else ../shared/fixtures/audio beside the repository (never committed)."""
    env = os.environ.get("AUDIOSCENIC_FIXTURES")
    root = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "fixtures"
    return root / "audio" if (root / "audio").is_dir() else None


# ------------------------------------------------------------------ magnitude


def test_magnitude_exact_values_and_mean_one():
    # four chunks with mean |amplitude| 0.4, 0.2, 0, 0.1 (signs alternate: only |x| counts)
    levels = [0.4, 0.2, 0.0, 0.1]
    x = np.concatenate([lv * np.where(np.arange(1000) % 2, 1.0, -1.0) for lv in levels]).astype(np.float32)
    out = magnitude(torch.from_numpy(x)[None], 16000, 4, temperature=0.25)
    m = np.array(levels) / 0.4
    expected = 4 * np.exp(m / 0.25) / np.exp(m / 0.25).sum()
    assert out.shape == (4,) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6)
    assert float(out.mean()) == pytest.approx(1.0, abs=1e-6)
    assert out[0] > out[1] > out[3] > out[2]  # louder chunk -> larger value


def test_magnitude_louder_chunk_larger_and_stereo_mixed_to_mono():
    rng = np.random.default_rng(0)
    x = 0.05 * rng.standard_normal((2, 44100 * 2))
    x[:, 44100 // 2 : 44100] *= 8  # frames 2 and 3 of 8 are loud
    out = magnitude(torch.from_numpy(x), 44100, 8)
    assert int(out.argmax()) in (2, 3) and min(out[2], out[3]) > 2 * max(out[[0, 1, 4, 5, 6, 7]])
    assert float(out.mean()) == pytest.approx(1.0, abs=1e-6)
    # channels are averaged before |.|: opposite channels cancel to silence
    cancel = torch.from_numpy(np.stack([x[0], -x[0]]))
    torch.testing.assert_close(magnitude(cancel, 44100, 8), torch.ones(8))


def test_magnitude_silence_constant_and_large_temperature():
    torch.testing.assert_close(magnitude(torch.zeros(1, 16000), 16000, 10), torch.ones(10))
    torch.testing.assert_close(magnitude(torch.full((2, 16000), -0.3), 16000, 10), torch.ones(10))
    loud_quiet = torch.cat([torch.full((1, 8000), 0.9), torch.full((1, 8000), 0.01)], dim=1)
    sharp = magnitude(loud_quiet, 16000, 2, temperature=0.25)
    flat = magnitude(loud_quiet, 16000, 2, temperature=1e6)
    assert float(sharp[0] / sharp[1]) == pytest.approx(np.exp((1 - 0.01 / 0.9) / 0.25), rel=1e-5)
    torch.testing.assert_close(flat, torch.ones(2), rtol=0, atol=1e-5)


def test_magnitude_fewer_samples_than_frames_and_uneven_chunks():
    out = magnitude(torch.tensor([[0.0, 1.0, 0.0]]), 16000, 6)
    # frame k takes the sample at floor(k * 3 / 6): 0, 0, 1, 1, 2, 2
    m = np.array([0, 0, 1, 1, 0, 0.0])
    np.testing.assert_allclose(out.numpy(), 6 * np.exp(m / 0.25) / np.exp(m / 0.25).sum(), rtol=1e-6)
    # 10 samples in 3 chunks: [0, 3), [3, 6), [6, 10)
    x = torch.tensor([[1.0, 1, 1, 0, 0, 0, 0, 0, 0, 2]])
    m = np.array([1.0, 0.0, 0.5]) / 1.0
    np.testing.assert_allclose(magnitude(x, 16000, 3).numpy(), 3 * np.exp(m / 0.25) / np.exp(m / 0.25).sum(), rtol=1e-6)


def test_magnitude_rejects_nan_inf_and_bad_arguments():
    x = torch.zeros(2, 1000)
    x[1, 500] = float("nan")
    with pytest.raises(InvalidAudioError, match=r"dog_bark\.wav: magnitude: 1 NaN/infinite samples \(first at sample 500\)"):
        magnitude(x, 16000, 8, source="dog_bark.wav")
    x[1, 500] = float("inf")
    with pytest.raises(ValueError, match="rain.flac"):
        magnitude(x, 16000, 8, source=Path("clips/rain.flac"))
    with pytest.raises(InvalidAudioError, match="temperature"):
        magnitude(torch.ones(1, 10), 16000, 2, temperature=0.0)
    with pytest.raises(InvalidAudioError, match="num_frames"):
        magnitude(torch.ones(1, 10), 16000, 0)
    with pytest.raises(InvalidAudioError, match="no samples"):
        magnitude(torch.ones(1, 0), 16000, 2)


# ------------------------------------------------------------------ mel


def _hz_to_mel(f):
    return 2595.0 * np.log10(1.0 + f / 700.0)


def _mel_to_hz(m):
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def _numpy_log_mel(x: np.ndarray, sr: int, n_mels: int) -> np.ndarray:
    """Independent float64 log-Mel: centred reflect-padded STFT, periodic Hann, HTK triangles."""
    pad = MEL_N_FFT // 2
    xp = np.pad(x.astype(np.float64), pad, mode="reflect")
    n_stft = 1 + (len(xp) - MEL_N_FFT) // MEL_HOP
    idx = np.arange(MEL_N_FFT)[None, :] + MEL_HOP * np.arange(n_stft)[:, None]
    window = scipy.signal.get_window("hann", MEL_N_FFT, fftbins=True)
    power = np.abs(np.fft.rfft(xp[idx] * window, axis=1)) ** 2  # (frames, bins)
    freqs = np.linspace(0, sr / 2, MEL_N_FFT // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sr / 2), n_mels + 2))
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    fb = np.maximum(0, np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)))  # (mels, bins)
    return np.log(power @ fb.T + MEL_LOG_EPS)


def _numpy_pool(logmel: np.ndarray, n: int, num_frames: int) -> np.ndarray:
    out = np.empty((num_frames, logmel.shape[1]))
    for k in range(num_frames):
        lo, hi = k * n / num_frames, (k + 1) * n / num_frames
        members = [j for j in range(logmel.shape[0]) if lo <= j * MEL_HOP < hi]
        out[k] = logmel[members].mean(axis=0)
    return out


def _test_signal(seconds: float, sr: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    x = 0.05 * rng.standard_normal(t.size) + 0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * (300 + 900 * t) * t)
    x *= 1 + 0.5 * np.sin(2 * np.pi * 1.5 * t)  # loudness changes over time
    return x.astype(np.float32)


@pytest.mark.parametrize("num_frames", [8, 24])
def test_mel_matches_numpy_reference(num_frames):
    x = _test_signal(3.0, 16000, seed=num_frames)
    stereo = np.stack([x, x])  # mono mix of identical channels is the channel itself
    got = mel_features(torch.from_numpy(stereo), 16000, num_frames, n_mels=128)
    ref = _numpy_pool(_numpy_log_mel(x, 16000, 128), x.size, num_frames)
    assert got.shape == (num_frames, 128) and got.dtype == torch.float32
    # A log difference d is a relative difference of about d in the Mel power itself, so
    # "within 1e-4 relative" on the spectrogram is |log a - log b| < 1e-4 (relative error on
    # the log values is meaningless where they cross 0); also relative on the log values away from 0.
    diff = np.abs(got.numpy() - ref)
    assert diff.max() < 1e-4, diff.max()
    away = np.abs(ref) > 0.1
    assert (diff[away] / np.abs(ref[away])).max() < 1e-4
    # higher loudness in a frame -> higher mean log-Mel
    loud = np.array([np.abs(c).mean() for c in np.array_split(x, num_frames)])
    assert np.corrcoef(loud, ref.mean(axis=1))[0, 1] > 0.8


def test_mel_other_rates_are_resampled_to_16k_and_short_clips_work():
    import torchaudio.functional as AF

    x = torch.from_numpy(_test_signal(2.0, 44100, seed=3))[None]
    direct = mel_features(x, 44100, 6, n_mels=64)
    via16k = mel_features(AF.resample(x, 44100, 16000), 16000, 6, n_mels=64)
    assert direct.shape == (6, 64)
    torch.testing.assert_close(direct, via16k, rtol=0, atol=1e-5)
    # 0.1 s into 30 frames: frames shorter than a hop take the nearest STFT frame
    short = mel_features(torch.from_numpy(_test_signal(0.1, 16000, seed=4))[None], 16000, 30)
    assert short.shape == (30, 128) and torch.isfinite(short).all()
    # 100 samples (shorter than half a window) and digital silence stay finite
    assert torch.isfinite(mel_features(torch.randn(1, 100), 16000, 4)).all()
    silent = mel_features(torch.zeros(1, 16000), 16000, 4)
    torch.testing.assert_close(silent, torch.full((4, 128), float(np.log(MEL_LOG_EPS))))


def test_mel_rejects_nan():
    x = torch.zeros(1, 16000)
    x[0, 3] = float("-inf")
    with pytest.raises(InvalidAudioError, match=r"siren\.wav: mel_features: 1 NaN/infinite"):
        mel_features(x, 16000, 4, source="siren.wav")


# ------------------------------------------------------------------ stored features -> per-frame M_a / F_a


def test_envelope_is_mean_abs_per_10ms_bin_at_the_clips_rate():
    sr = 22050  # 220.5 samples per bin: bin j covers [floor(j * 220.5), floor((j + 1) * 220.5))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, sr + 77)).astype(np.float32)  # 1 s + 77 samples: 101 bins, the last short
    env = envelope(torch.from_numpy(x), sr)
    mono = np.abs(x.astype(np.float64).mean(axis=0))
    bounds = np.minimum(np.arange(102) * sr // ENVELOPE_RATE, x.shape[1])
    expected = [mono[a:b].mean() for a, b in zip(bounds[:-1], bounds[1:])]
    assert env.shape == (101,) and env.dtype == np.float32
    np.testing.assert_allclose(env, expected, rtol=1e-5)


@pytest.mark.parametrize("sr,seconds,n", [(16000, 2.0, 20), (44100, 5.0, 50), (48000, 3.0, 15)])
def test_magnitude_from_envelope_equals_the_waveform_function_on_10ms_boundaries(sr, seconds, n):
    # N chunks of the whole clip whose edges fall on 10 ms bins: the two paths are the same sums
    x = torch.from_numpy(_test_signal(seconds, sr, seed=n))[None]
    env = envelope(x, sr)
    want = magnitude(x, sr, n, temperature=0.25)
    got = magnitude_from_envelope(env, x.shape[1] / sr, np.linspace(0, seconds, n + 1), 0.25)
    assert got.shape == (n,) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and at a frame rate: chunk k = [k / fps, (k + 1) / fps) of the clip's first n / fps seconds
    fps = n / seconds * 2  # the first half of the clip
    head = x[:, : round(seconds / 2 * sr)]
    torch.testing.assert_close(magnitude_from_envelope(env, x.shape[1] / sr, frame_edges(n, fps), 0.25),
                               magnitude(head, sr, n, 0.25), rtol=1e-5, atol=1e-5)


def test_magnitude_from_envelope_close_when_boundaries_fall_inside_bins():
    sr = 44100
    x = torch.from_numpy(_test_signal(4.0, sr, seed=7))[None]
    env = envelope(x, sr)
    # Chunk edges between 10 ms bins: the envelope is taken as flat within a bin, so a chunk's mean
    # is off by at most its two partial bins' deviation; the softmax at tau 0.25 multiplies that by
    # ~4. This signal beats (440 Hz against a 300 Hz+ chirp) within 10 ms bins: a hard case.
    for n, tol in ((7, 0.03), (24, 0.03), (97, 0.08)):  # chunks of 571, 167 and 41 ms
        got = magnitude_from_envelope(env, 4.0, np.linspace(0, 4.0, n + 1), 0.25).numpy()
        want = magnitude(x, sr, n, 0.25).numpy()
        assert np.abs(got - want).max() < tol * want.max(), (n, np.abs(got - want).max())
        assert np.corrcoef(got, want)[0, 1] > 0.999


@pytest.mark.parametrize("n", [8, 24, 300])
def test_mel_for_frames_equals_mel_features_for_the_whole_clip(n):
    for sr in (16000, 44100):
        x = torch.from_numpy(_test_signal(3.0, sr, seed=n))[None]
        mel, dur16 = mel_frames(x, sr, 64)
        assert mel.shape == (-(-int(dur16 * 16000) // MEL_HOP), 64)
        got = mel_for_frames(mel, dur16, np.linspace(0, dur16, n + 1))
        torch.testing.assert_close(got, mel_features(x, sr, n, 64), rtol=0, atol=1e-5)


def test_mel_for_frames_at_a_frame_rate_pools_the_frames_under_each_video_frame():
    x = torch.from_numpy(_test_signal(2.0, 16000, seed=2))[None]
    mel, dur = mel_frames(x, 16000, 32)
    out = mel_for_frames(mel, dur, frame_edges(10, 10.0)).numpy()  # 10 frames at 10 fps: 100 ms each
    for k in range(10):
        np.testing.assert_allclose(out[k], mel[10 * k : 10 * k + 10].mean(axis=0), rtol=1e-5, atol=1e-5)
    # 100 fps: one Mel frame per chunk; 400 fps: chunks without a centre take the nearest frame
    np.testing.assert_allclose(mel_for_frames(mel, dur, frame_edges(50, 100.0)).numpy(), mel[:50], atol=1e-6)
    fast = mel_for_frames(mel, dur, frame_edges(8, 400.0)).numpy()
    np.testing.assert_allclose(fast[[0, 4]], mel[[0, 1]], atol=1e-6)
    assert np.isfinite(fast).all()


def test_pad_and_loop_past_the_end_of_the_clip():
    sr, fps = 16000, 10.0
    t = np.arange(sr) / sr  # 1 s: quiet first half, loud second half
    x = np.where(t < 0.5, 0.1, 0.8) * np.sin(2 * np.pi * 300 * t)
    w = torch.from_numpy(x.astype(np.float32))[None]
    env, (mel, mdur) = envelope(w, sr), mel_frames(w, sr, 32)
    edges = frame_edges(30, fps)  # a 3 s span over a 1 s clip
    pad = magnitude_from_envelope(env, 1.0, edges, 0.25, fit="pad").numpy()
    loop = magnitude_from_envelope(env, 1.0, edges, 0.25, fit="loop").numpy()
    # pad: silence after 1 s (m = 0, the smallest weight); loop: the clip again, period 10 frames
    assert np.allclose(pad[10:], pad[10]) and pad[10] < pad[:10].min()
    np.testing.assert_allclose(loop[:10], loop[10:20], rtol=1e-5)
    np.testing.assert_allclose(loop[:10], loop[20:], rtol=1e-5)
    assert loop[5:10].min() > 2 * loop[:5].max() and float(loop.mean()) == pytest.approx(1.0, abs=1e-5)
    mpad = mel_for_frames(mel, mdur, edges, fit="pad").numpy()
    mloop = mel_for_frames(mel, mdur, edges, fit="loop").numpy()
    np.testing.assert_allclose(mpad[12:], np.log(MEL_LOG_EPS), atol=1e-5)  # digital silence
    np.testing.assert_allclose(mloop[12:20], mloop[2:10], atol=1e-4)
    np.testing.assert_allclose(mpad[:9], mloop[:9], atol=1e-6)  # identical inside the clip
    with pytest.raises(ValueError, match="audio_fit"):
        magnitude_from_envelope(env, 1.0, edges, 0.25, fit="repeat")


def test_silence_gives_all_ones_and_never_nan():
    w = torch.zeros(1, 8000)
    env = envelope(w, 16000)
    for fit in ("pad", "loop"):
        torch.testing.assert_close(magnitude_from_envelope(env, 0.5, frame_edges(12, 10.0), 0.25, fit),
                                   torch.ones(12))
    tiny = envelope(torch.ones(1, 3), 16000)  # 3 samples: one bin
    assert np.isfinite(magnitude_from_envelope(tiny, 3 / 16000, frame_edges(5, 24.0), 0.25).numpy()).all()


def test_magnitude_follows_loudness_under_each_frame():
    """A clip that swells and fades at known times: per-frame M_a ranks like the loudness under each frame."""
    from scipy.stats import spearmanr

    sr, fps, seconds = 22050, 12.0, 5.0
    t = np.arange(int(seconds * sr)) / sr
    loudness = lambda s: 0.05 + 0.9 * np.exp(-(((s - 1.5) / 0.4) ** 2)) + 0.5 * np.exp(-(((s - 3.8) / 0.3) ** 2))
    noise = np.random.default_rng(0).standard_normal(t.size)
    w = torch.from_numpy((loudness(t) * noise * 0.5).astype(np.float32))[None]
    n = int(seconds * fps)
    cond = span_condition({"embedding": np.zeros(4), "envelope": envelope(w, sr), "duration_s": seconds,
                           **dict(zip(("mel", "mel_duration_s"), mel_frames(w, sr, 16)))},
                          n, frame_edges(n, fps), 0.25)
    under = loudness((np.arange(n) + 0.5) / fps)
    rho = spearmanr(cond["magnitude"].numpy(), under)[0]
    assert rho >= 0.95, rho
    assert cond["mel"].shape == (n, 16) and spearmanr(cond["mel"].numpy().mean(axis=1), under)[0] >= 0.9


# ------------------------------------------------------------------ decoding


def test_decode_wav_flac_and_misnamed_files(tmp_path):
    rng = np.random.default_rng(0)
    x = (0.5 * rng.standard_normal((22050, 2))).clip(-1, 1).astype(np.float32)
    sf.write(tmp_path / "a.wav", x, 22050, subtype="PCM_16")
    wav, sr = decode_audio(tmp_path / "a.wav")
    assert sr == 22050 and wav.shape == (2, 22050) and wav.dtype == torch.float32
    np.testing.assert_allclose(wav.numpy(), x.T, atol=1 / 32768 + 1e-7)
    # a FLAC named .wav decodes by content
    sf.write(tmp_path / "b.wav", x[:, 0], 48000, format="FLAC")
    wav, sr = decode_audio(tmp_path / "b.wav")
    assert sr == 48000 and wav.shape == (1, 22050)


def test_decode_falls_back_to_pyav(tmp_path):
    import av

    path = tmp_path / "aac_stream.wav"  # AAC in MP4, which libsndfile cannot read
    t = np.arange(22050) / 22050
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=22050, layout="stereo")
        frame = av.AudioFrame.from_ndarray(np.stack([tone, tone]), format="fltp", layout="stereo")
        frame.sample_rate = 22050
        for packet in list(stream.encode(frame)) + list(stream.encode(None)):
            out.mux(packet)
    with pytest.raises(Exception):
        sf.info(str(path))
    wav, sr = decode_audio(path)
    assert sr == 22050 and wav.shape[0] == 2 and 22050 <= wav.shape[1] <= 22050 + 4096
    assert 0.15 < float(wav.abs().max()) < 0.45  # the tone survived the codec


def test_decode_errors_name_the_file(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(AudioDecodeError, match=r"empty\.wav: is empty"):
        decode_audio(tmp_path / "empty.wav")
    (tmp_path / "junk.wav").write_bytes(b"this is not audio at all" * 50)
    with pytest.raises(AudioDecodeError, match=r"junk\.wav: cannot be decoded as audio"):
        decode_audio(tmp_path / "junk.wav")
    sf.write(tmp_path / "nothing.wav", np.zeros((0, 1), np.float32), 16000)
    with pytest.raises(AudioDecodeError, match=r"nothing\.wav: holds no audio samples"):
        decode_audio(tmp_path / "nothing.wav")
    bad = np.zeros(1000, np.float32)
    bad[10] = np.nan
    sf.write(tmp_path / "nan.wav", bad, 16000, subtype="FLOAT")
    with pytest.raises(AudioDecodeError, match=r"nan\.wav: holds 1 NaN/infinite samples"):
        decode_audio(tmp_path / "nan.wav")
    with pytest.raises(AudioDecodeError, match=r"missing\.wav: cannot be read"):
        decode_audio(tmp_path / "missing.wav")
    assert issubclass(AudioDecodeError, ValueError)


# ------------------------------------------------------------------ embeddings


def test_embed_clips_batches_and_keeps_order():
    enc = ImageBindAudioEncoder.tiny(seed=0)
    rng = np.random.default_rng(5)
    clips = [
        (torch.from_numpy(0.1 * rng.standard_normal((2, 44100 * 3)).astype(np.float32)), 44100),
        (torch.from_numpy(0.1 * rng.standard_normal((1, 16000))).float(), 16000),
        (torch.from_numpy(0.1 * rng.standard_normal((1, 48000 * 5)).astype(np.float32)), 48000),
    ]
    got = embed_clips(enc, clips, batch_size=2)
    assert got.shape == (3, 1024)
    with torch.inference_mode():
        for i, (w, sr) in enumerate(clips):
            torch.testing.assert_close(got[i], enc(preprocess(w, sr)[None])[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[0], got[2])
    with pytest.raises(InvalidAudioError, match="broken.wav"):
        embed_clips(enc, [(torch.full((1, 100), float("nan")), 16000)], sources=["broken.wav"])


# ------------------------------------------------------------------ real files


@pytest.mark.skipif(_fixtures_audio() is None, reason="no fixtures (set AUDIOSCENIC_FIXTURES to a folder with audio/)")
def test_real_fixture_files_go_through_every_function():
    folder = _fixtures_audio()
    files = sorted(p for p in folder.iterdir() if p.is_file())
    assert files, f"no files in {folder}"
    enc = ImageBindAudioEncoder.tiny(seed=0)
    rates, channels, pairs = set(), set(), []
    for p in files:
        wav, sr = decode_audio(p)
        rates.add(sr)
        channels.add(wav.shape[0])
        assert wav.dtype == torch.float32 and wav.shape[1] > sr  # every fixture is longer than 1 s
        assert 0.01 < float(wav.abs().max()) <= 1.0, p.name
        img = preprocess(wav, sr)
        assert img.shape == (3, 1, 128, 204) and torch.isfinite(img).all()
        mag = magnitude(wav, sr, 16, source=p)
        assert mag.shape == (16,) and float(mag.mean()) == pytest.approx(1.0, abs=1e-5)
        assert float(mag.max()) > float(mag.min())  # real sounds are not flat
        mel = mel_features(wav, sr, 16, source=p)
        assert mel.shape == (16, 128) and torch.isfinite(mel).all()
        assert float(mel.max()) > np.log(MEL_LOG_EPS) + 5  # well above the silence floor
        pairs.append((wav, sr))
    emb = embed_clips(enc, pairs, batch_size=4)
    assert emb.shape == (len(files), 1024) and torch.isfinite(emb).all()
    assert ((emb.norm(dim=1) > 0) & (emb.norm(dim=1) <= 20.0 + 1e-4)).all()
    if {"cat.wav", "cattle.wav", "motorcycle.wav"} <= {p.name for p in files}:
        # the shared set covers 22.05/44.1/48 kHz, mono and stereo, and MP3 streams named .wav
        assert {22050, 44100, 48000} <= rates and {1, 2} <= channels
        assert (folder / "motorcycle.wav").read_bytes()[:3] == b"ID3"
        wav, sr = decode_audio(folder / "motorcycle.wav")
        assert sr == 44100 and wav.shape[0] == 2 and 28.0 < wav.shape[1] / sr < 29.0

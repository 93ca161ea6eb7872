"""Low-pass filters (closed formulas of DESIGN 1) and the Frequency Fuser (eq. 9)."""
import math

import pytest
import torch

from models.frequency import FrequencyFuser, low_pass_filter


def _reference(shape, kind, d_s, d_t, n):
    """Element-by-element closed formulas with DESIGN's t' = 2t/T - 1 (even sizes)."""
    T, H, W = shape
    out = torch.zeros(shape, dtype=torch.float64)
    for t in range(T):
        for h in range(H):
            for w in range(W):
                tt, hh, ww = 2 * t / T - 1, 2 * h / H - 1, 2 * w / W - 1
                d2 = ((d_s / d_t) * tt) ** 2 + hh**2 + ww**2
                if kind == "gaussian":
                    v = math.exp(-d2 / (2 * d_s**2))
                elif kind == "butterworth":
                    v = 1 / (1 + (d2 / d_s**2) ** n)
                elif kind == "ideal":
                    v = float(d2 <= d_s**2)
                else:
                    v = float(abs(tt) <= d_t and abs(hh) <= d_s and abs(ww) <= d_s)
                out[t, h, w] = v
    return out.float()


@pytest.mark.parametrize("kind", ["gaussian", "butterworth", "ideal", "box"])
@pytest.mark.parametrize("d_s,d_t", [(0.25, 0.25), (0.5, 0.25), (0.4, 0.8)])
def test_filter_equals_closed_formula_on_even_grid(kind, d_s, d_t):
    shape = (4, 8, 6)
    got = low_pass_filter(shape, kind, d_s, d_t, n=3)
    assert got.shape == shape and got.dtype == torch.float32
    torch.testing.assert_close(got, _reference(shape, kind, d_s, d_t, 3), rtol=0, atol=1e-6)


def test_filter_known_values():
    # T=4, H=W=8, d_s=d_t=0.25: at (t, h, w) = (2, 4, 6) -> t'=0, h'=0, w'=0.5, d^2 = 0.25.
    g = low_pass_filter((4, 8, 8), "gaussian", 0.25, 0.25)
    assert g[2, 4, 4].item() == 1.0
    assert g[2, 4, 6].item() == pytest.approx(math.exp(-0.25 / (2 * 0.0625)), abs=1e-7)  # e^-2
    b = low_pass_filter((4, 8, 8), "butterworth", 0.25, 0.25, n=4)
    assert b[2, 4, 6].item() == pytest.approx(1 / (1 + 4.0**4), abs=1e-7)
    # t'=-0.5 is 2 * d_t away in time only: d^2 = (1 * -0.5)^2.
    assert g[1, 4, 4].item() == pytest.approx(math.exp(-2.0), abs=1e-7)
    i = low_pass_filter((4, 8, 8), "ideal", 0.25, 0.25)
    assert i.sum().item() == 5  # the centre, and h' = +-0.25, w' = +-0.25 at t' = 0
    box = low_pass_filter((4, 8, 8), "box", 0.25, 0.25)
    assert box.sum().item() == 9  # |h'|, |w'| in {0, 0.25, -0.25} at t' = 0


@pytest.mark.parametrize("kind", ["gaussian", "butterworth", "ideal", "box"])
def test_odd_sizes_centre_the_zero_frequency(kind):
    shape = (3, 5, 7)
    f = low_pass_filter(shape, kind, 0.25, 0.25)
    assert f[1, 2, 3].item() == 1.0  # fftshift puts DC at (T//2, H//2, W//2)
    # Symmetric around the centre on odd grids.
    torch.testing.assert_close(f, f.flip(0).flip(1).flip(2))
    # Gaussian value at a known offset: t = 2 -> t' = 2/3.
    if kind == "gaussian":
        assert f[2, 2, 3].item() == pytest.approx(math.exp(-((2 / 3) ** 2) / (2 * 0.0625)), abs=1e-7)


def test_zero_cutoff_and_bad_arguments():
    assert low_pass_filter((2, 4, 4), "gaussian", 0.0, 0.25).abs().sum() == 0
    assert low_pass_filter((2, 4, 4), "box", 0.25, 0.0).abs().sum() == 0
    with pytest.raises(ValueError, match="unknown filter kind"):
        low_pass_filter((2, 4, 4), "triangle", 0.25, 0.25)
    with pytest.raises(ValueError, match=r"\(T, H, W\)"):
        low_pass_filter((4, 4), "gaussian", 0.25, 0.25)


def test_fuser_identity_at_init_and_weights_are_one():
    torch.manual_seed(0)
    ff = FrequencyFuser(channels=6, n_mels=10, hidden=8)
    mel = torch.randn(2, 4, 10)
    w = ff.weights(mel)
    assert torch.equal(w, torch.ones(2, 4, 6))
    x = torch.randn(2, 4, 8, 6, 6)
    torch.testing.assert_close(ff(x, w), x, rtol=0, atol=1e-5)


def test_fuser_keeps_low_band_and_scales_high_band_per_temporal_bin():
    torch.manual_seed(0)
    B, Fr, H, W, C = 1, 4, 8, 8, 3
    ff = FrequencyFuser(channels=C, n_mels=5, hidden=8, kind="ideal", d_s=0.25, d_t=0.25)
    x = torch.randn(B, Fr, H, W, C, dtype=torch.float64).float()
    weights = torch.rand(B, Fr, C) + 0.5
    out = ff(x, weights)
    X = torch.fft.fftshift(torch.fft.fftn(x.double(), dim=(1, 2, 3)), dim=(1, 2, 3))
    Y = torch.fft.fftshift(torch.fft.fftn(out.double(), dim=(1, 2, 3)), dim=(1, 2, 3))
    P = low_pass_filter((Fr, H, W), "ideal", 0.25, 0.25).bool()
    # Taking the real part symmetrises the spectrum: Y[k] = (G[k] X[k] + conj(G[-k] X[-k])) / 2
    # = X[k] (G[k] + G[-k]) / 2 for real x. So inside the low band (where the mirror bin is
    # low too) Y = X; outside, the gain is the mean of the weights of bins k and -k.
    lo = P[None, :, :, :, None].expand_as(Y)
    torch.testing.assert_close(Y[lo], X[lo], rtol=0, atol=1e-4)
    g = torch.where(P[None, :, :, :, None], torch.ones(1, dtype=torch.float64), weights.double()[:, :, None, None, :])
    # Mirror of a shifted index k is (-k) mod N in unshifted terms; on the shifted grid
    # of even size N it is (N - k) mod N.
    idx = [(-torch.arange(n)) % n for n in (Fr, H, W)]
    g_mirror = g[:, idx[0]][:, :, idx[1]][:, :, :, idx[2]]
    torch.testing.assert_close(Y, X * (g + g_mirror) / 2, rtol=0, atol=1e-4)
    assert (Y[~lo] - X[~lo]).abs().max() > 1e-2


def test_fuser_rejects_bad_weight_shape():
    ff = FrequencyFuser(channels=3, n_mels=4)
    with pytest.raises(ValueError, match="frequency weights"):
        ff(torch.randn(1, 2, 4, 4, 3), torch.ones(1, 3, 3))


# ----------------------------------------------------------------- F_a: normalisation, alignment, gains (issue 14)

SR = 16000


def _noise(seconds, amplitude, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(1, int(seconds * SR), generator=g) * 2 - 1) * amplitude


def _trained_like(fuser, std=3.0, seed=0):
    """Large random encoder weights (far from the identity init), as after fine-tuning."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in fuser.encoder.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return fuser


@pytest.mark.parametrize("alignment", ["spectrum", "index"])
def test_gains_stay_in_range_from_digital_silence_to_full_scale_noise(alignment):
    from models.frequency import GAIN_RANGE, normalise_mel
    from tasks.audio import mel_features

    t = torch.arange(2 * SR) / SR
    clips = {
        "digital silence": torch.zeros(1, 2 * SR),
        "-80 dBFS noise": _noise(2, 1e-4),
        "-40 dBFS noise": _noise(2, 1e-2),
        "sine": 0.5 * torch.sin(2 * math.pi * 440 * t)[None],
        "full-scale noise": _noise(2, 1.0),
        "full-scale square wave (clipped)": torch.sign(torch.sin(2 * math.pi * 440 * t))[None],
        "full-scale stereo noise at 44.1 kHz": torch.rand(2, 88200, generator=torch.Generator().manual_seed(3)) * 2 - 1,
    }
    frames, n_mels = 8, 128
    fuser = _trained_like(FrequencyFuser(channels=16, n_mels=n_mels, hidden=32, alignment=alignment))
    gains = {}
    for name, wave in clips.items():
        sr = 44100 if "44.1" in name else SR
        mel = mel_features(wave, sr, frames, n_mels)[None]
        feats = fuser.encoder_input(mel)
        # The encoder's input has a fixed scale whatever the loudness: sum of squares <= F * n_mels.
        assert torch.isfinite(feats).all() and (feats**2).sum().item() <= frames * n_mels * (1 + 1e-4), name
        w = fuser.weights(mel)
        assert w.shape == (1, frames, 16)
        assert torch.isfinite(w).all(), name
        assert w.min().item() >= GAIN_RANGE[0] and w.max().item() <= GAIN_RANGE[1], name
        gains[name] = w
    assert GAIN_RANGE == (0.0, 2.0)
    # The weights are not trivially constant: different sounds, different gains (near both ends).
    assert (gains["sine"] - gains["full-scale noise"]).abs().max() > 0.1
    both = torch.cat(list(gains.values()))
    assert both.min() < 0.05 and both.max() > 1.95  # saturating weights reach towards both ends
    # Digital silence: a flat spectrogram standardises to ~0 instead of amplified rounding noise.
    silence = mel_features(clips["digital silence"], SR, frames, n_mels)[None]
    assert normalise_mel(silence).abs().max() < 1e-3
    # Loudness alone does not move the gains: the same noise 40 dB quieter.
    loud, quiet = gains["full-scale noise"], fuser.weights(mel_features(_noise(2, 1.0) * 0.01, SR, frames, n_mels)[None])
    assert (loud - quiet).abs().max() < 0.02 < (loud - gains["sine"]).abs().max()


def test_gains_are_one_at_init_for_any_clip():
    from tasks.audio import mel_features

    fuser = FrequencyFuser(channels=4, n_mels=64)
    for wave in (torch.zeros(1, SR), _noise(1, 1.0)):
        assert torch.equal(fuser.weights(mel_features(wave, SR, 5, 64)[None]), torch.ones(1, 5, 4))


def _monotone(fuser):
    """An encoder whose gain grows with the mean encoder input over mel bins (same for every channel)."""
    with torch.no_grad():
        fuser.encoder[0].weight.fill_(1.0 / fuser.encoder[0].in_features)
        fuser.encoder[0].bias.zero_()
        fuser.encoder[2].weight.fill_(0.5)
        fuser.encoder[2].bias.fill_(1.0)
    return fuser


@pytest.mark.parametrize("frames,k0", [(8, 2), (15, 3), (16, 5)])
def test_temporal_spectrum_alignment_weights_the_pulse_rate_bin_most(frames, k0):
    """F_a pulsing k0 times over the window -> video temporal-frequency bins +-k0 (shifted
    indices F//2 +- k0) get the largest gains; the index-matched form does not do that."""
    n_mels, C = 32, 3
    t = torch.arange(frames, dtype=torch.float64)
    mel = (-5 + 2 * torch.cos(2 * math.pi * k0 * t / frames))[None, :, None].expand(1, frames, n_mels).float()
    fuser = _monotone(FrequencyFuser(channels=C, n_mels=n_mels, hidden=4))
    w = fuser.weights(mel)[0]  # (F, C)
    hi, lo = frames // 2 + k0, frames // 2 - k0
    others = [j for j in range(frames) if j not in (hi, lo)]
    torch.testing.assert_close(w[hi], w[lo], rtol=0, atol=1e-6)  # symmetric: real part loses nothing
    assert (w[hi] > w[others].max(0).values + 0.1).all()
    index = _monotone(FrequencyFuser(channels=C, n_mels=n_mels, hidden=4, alignment="index"))
    assert index.weights(mel)[0, :, 0].argmax().item() == 0  # frame 0 (a pulse peak) -> shifted bin 0

    # The gains go where the video's own spectrum puts temporal frequency k0: a video
    # component oscillating k0 times over the window is scaled by w[hi] (1 - P there).
    x = torch.cos(2 * math.pi * k0 * t / frames).float()[None, :, None, None, None].expand(1, frames, 4, 4, C)
    x = x * torch.tensor([1.0, -1.0, 1.0, -1.0])[None, None, :, None, None]  # high spatial frequency too
    p = low_pass_filter((frames, 4, 4), "gaussian", 0.25, 0.25)[hi, 0, 2]  # shifted (k0, h Nyquist, w 0)
    gain = p + (1 - p) * w[hi]  # (C,)
    assert (gain > 1.1).all()
    torch.testing.assert_close(fuser(x.contiguous(), w[None]), x * gain, rtol=0, atol=1e-5)


@pytest.mark.parametrize("seconds,frames,rate", [(2.0, 8, 1.0), (3.0, 15, 1.0), (2.0, 16, 1.5)])
def test_a_real_clip_pulsing_at_a_known_rate_weights_the_matching_bin(seconds, frames, rate):
    """Noise whose loudness pulses at `rate` Hz, through tasks.audio.mel_features: among the
    time-varying bins, k0 = rate * seconds (cycles per window) gets the largest gain."""
    from tasks.audio import mel_features

    t = torch.arange(int(seconds * SR)) / SR
    wave = _noise(seconds, 0.5, seed=2) * (0.55 + 0.45 * torch.cos(2 * math.pi * rate * t))
    fuser = _monotone(FrequencyFuser(channels=2, n_mels=128, hidden=4))
    w = fuser.weights(mel_features(wave, SR, frames, 128)[None])[0, :, 0]
    k0 = round(rate * seconds)
    non_dc = [j for j in range(frames) if j != frames // 2]
    best = max(non_dc, key=lambda j: w[j].item())
    assert abs(best - frames // 2) == k0
    others = [j for j in non_dc if abs(j - frames // 2) != k0]
    assert w[frames // 2 + k0] > w[others].max() + 0.05


def test_fuser_works_for_any_number_of_frames():
    from models.frequency import temporal_spectrum

    torch.manual_seed(0)
    for frames in (1, 2, 5, 7, 8):
        fuser = _trained_like(FrequencyFuser(channels=3, n_mels=6, hidden=5), std=0.5)
        mel = torch.randn(2, frames, 6) * 3 - 4
        w = fuser.weights(mel)
        assert w.shape == (2, frames, 3) and torch.isfinite(w).all()
        x = torch.randn(2, frames, 4, 6, 3)
        assert fuser(x, w).shape == x.shape
        # Row F//2 is the DC bin: the mean of z over the frames, times sqrt(F).
        z = torch.randn(1, frames, 6)
        torch.testing.assert_close(temporal_spectrum(z)[0, frames // 2], z[0].sum(0).abs() / math.sqrt(frames))


def test_unknown_alignment_is_rejected():
    with pytest.raises(ValueError, match="alignment"):
        FrequencyFuser(channels=3, n_mels=4, alignment="phase")

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

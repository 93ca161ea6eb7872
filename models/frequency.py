"""Spatio-temporal low-pass filters and the Frequency Fuser (paper 4.5, eq. 9; DESIGN 1).

Filters live on the fftshift-ed grid of a (T, H, W) block: the zero frequency sits
at index (T//2, H//2, W//2). With normalised coordinates

    t' = 2 (t - T//2) / T,   h' = 2 (h - H//2) / H,   w' = 2 (w - W//2) / W
    d^2 = ((d_s / d_t) t')^2 + h'^2 + w'^2

the kinds are (FreeInit's family, DESIGN 1):

    gaussian     exp(-d^2 / (2 d_s^2))
    butterworth  1 / (1 + (d^2 / d_s^2)^n)
    ideal        1 where d^2 <= d_s^2, else 0
    box          1 where |t'| <= d_t and |h'| <= d_s and |w'| <= d_s, else 0

For even sizes t' equals DESIGN's 2t/T - 1 exactly. For odd sizes 2t/T - 1 would put
the zero frequency off the centre (at -1/T), so that an ideal filter could even drop
the DC bin; centring on T//2 keeps the DC bin at d = 0 for every size.

'box' is the axis-aligned box circumscribing the 'ideal' ellipsoid: the temporal
scaling d_s/d_t makes the ideal region reach |t'| = d_t along time and d_s in space,
so the box has half-widths d_t (time) and d_s (height, width) in the same
normalised units. (FreeInit's box uses index thresholds round(N//2 * d); ours is
the same idea expressed in the coordinates shared by the other kinds.)

d_s == 0 or d_t == 0 gives an all-zero filter for every kind (no low band: the
whole spectrum counts as high frequency), as in FreeInit.

The Frequency Fuser's audio weights F_a^w (DESIGN 1, decisions where the paper is silent)
-----------------------------------------------------------------------------------------
F_a (B, F, n_mels) is the log-Mel spectrogram pooled per video frame (tasks.audio.
mel_features: log(mel power + 1e-6), so from about -13.8 for digital silence up to about
+8 for full-scale noise). Three steps turn it into the gains of the high band:

1. Normalisation: per-clip standardisation over the window's frames and mel bins,
   z = (F_a - mean) / sqrt(var + MEL_STD_FLOOR^2) (population variance). Chosen over
   fixed statistics because (a) in the log domain a change of loudness is a constant
   offset, which standardisation removes exactly, so a clip played louder or quieter
   than the fine-tuning clip gets the same gains (loudness is the Magnitude
   Modulator's job, and M_a is itself normalised per clip); (b) no dataset statistics
   of our own exist to fix (ESC-50 vs AudioSet vs music would each give others); (c)
   the result is O(1) whatever the mel settings. MEL_STD_FLOOR (0.1 nat, 0.43 dB)
   keeps an (almost) constant spectrogram, digital silence above all, at z ~ 0
   instead of amplifying rounding noise. sum(z^2) <= F * n_mels always.
2. Alignment ("aligned in the frequency domain along the time axis"):
   'spectrum' (default): S_a = |FFT over the window's frames of z| (norm="ortho",
   per mel bin), fftshift-ed like the video's spectrum, so row k of S_a is audio
   temporal-frequency bin k and weights video temporal-frequency bin k, for any F,
   odd or even. By Parseval sum(S_a^2) = sum(z^2) <= F * n_mels, so the encoder's
   input has the same scale for every window length. |S_a| is symmetric in k for real
   input, so the weights of bins k and -k agree and the real part taken after the
   inverse FFT (see FrequencyFuser) loses nothing. A clip pulsing at r Hz over a
   window of F frames at frame rate fps peaks at bins +-r * F / fps.
   'index': the earlier form, z itself: frame j's features weight (shifted)
   temporal-frequency bin j. Kept for comparison (UNet3DConfig.fuser_alignment).
3. Encoder and bound: F_a^w = 1 + tanh(Enc(S_a) - 1), Enc = Linear, SiLU, Linear with
   the last layer at weight 0, bias 1, so F_a^w is exactly 1 (the identity) at
   initialisation and, whatever Enc learns and whatever the clip, every gain lies in
   GAIN_RANGE = [0, 2]: the audio can remove a high-frequency component or at most
   double it, never flip its sign, and no input (silence, clipping noise) can blow
   up the high band. (The paper's Enc is unbounded; tanh adds no parameter and has
   slope 1 at the identity, so training starts as with a plain Enc.)
"""
from __future__ import annotations

import torch
from torch import nn

FILTER_KINDS = ("gaussian", "butterworth", "ideal", "box")
FUSER_ALIGNMENTS = ("spectrum", "index")
MEL_STD_FLOOR = 0.1  # nat of log-Mel power; see the module docstring
GAIN_RANGE = (0.0, 2.0)  # every Frequency Fuser gain lies in this closed interval


def _centred_coords(size: int) -> torch.Tensor:
    return 2.0 * (torch.arange(size, dtype=torch.float64) - size // 2) / size


def low_pass_filter(
    shape: tuple[int, int, int], kind: str = "gaussian", d_s: float = 0.25, d_t: float = 0.25, n: int = 4
) -> torch.Tensor:
    """Low-pass filter of `shape` (T, H, W) on the fftshift-ed grid, float32 in [0, 1]."""
    if len(shape) != 3:
        raise ValueError(f"shape must be (T, H, W), got {tuple(shape)}")
    if kind not in FILTER_KINDS:
        raise ValueError(f"unknown filter kind '{kind}'; expected one of {FILTER_KINDS}")
    if d_s < 0 or d_t < 0:
        raise ValueError(f"cut-offs must be >= 0, got d_s={d_s}, d_t={d_t}")
    T, H, W = (int(s) for s in shape)
    if d_s == 0 or d_t == 0:
        return torch.zeros(T, H, W)
    t, h, w = torch.meshgrid(_centred_coords(T), _centred_coords(H), _centred_coords(W), indexing="ij")
    if kind == "box":
        inside = (t.abs() <= d_t) & (h.abs() <= d_s) & (w.abs() <= d_s)
        return inside.float()
    d2 = ((d_s / d_t) * t) ** 2 + h**2 + w**2
    if kind == "gaussian":
        out = torch.exp(-d2 / (2 * d_s**2))
    elif kind == "butterworth":
        out = 1.0 / (1.0 + (d2 / d_s**2) ** n)
    else:  # ideal
        out = (d2 <= d_s**2).double()
    return out.float()


def normalise_mel(mel: torch.Tensor, floor: float = MEL_STD_FLOOR) -> torch.Tensor:
    """(B, F, n_mels) log-Mel -> per-clip standardised float32 (module docstring, step 1)."""
    x = mel.float()
    mean = x.mean(dim=(1, 2), keepdim=True)
    var = x.var(dim=(1, 2), keepdim=True, correction=0)
    return (x - mean) / torch.sqrt(var + floor**2)


def temporal_spectrum(z: torch.Tensor) -> torch.Tensor:
    """(B, F, n) -> (B, F, n): |FFT over frames| (ortho), fftshift-ed along F (row F//2 = DC)."""
    return torch.fft.fftshift(torch.fft.fft(z.float(), dim=1, norm="ortho").abs(), dim=1)


class FrequencyFuser(nn.Module):
    """Eq. 9: keep the low band of the 3D spectrum, weight the high band by Enc(F_a).

    Works channels-last on tokens viewed as (B, F, H, W, C), the layout a transformer
    block already has, so no transpose is needed. `weights` maps the per-frame log-Mel
    features (B, F, n_mels) to gains (B, F, C) in GAIN_RANGE: normalised, aligned
    ('spectrum' or 'index') and encoded as in the module docstring; row j weights
    temporal-frequency bin j of the fftshift-ed spectrum, broadcast over (H, W).

    Enc's last layer starts at weight 0, bias 1, so the weights are exactly 1 and the
    module is the identity (up to FFT round-off) at initialisation.
    """

    def __init__(
        self,
        channels: int,
        n_mels: int,
        hidden: int = 128,
        kind: str = "gaussian",
        d_s: float = 0.25,
        d_t: float = 0.25,
        n: int = 4,
        alignment: str = "spectrum",
    ):
        super().__init__()
        if kind not in FILTER_KINDS:
            raise ValueError(f"unknown filter kind '{kind}'; expected one of {FILTER_KINDS}")
        if alignment not in FUSER_ALIGNMENTS:
            raise ValueError(f"unknown alignment '{alignment}'; expected one of {FUSER_ALIGNMENTS}")
        self.kind, self.d_s, self.d_t, self.n = kind, d_s, d_t, n
        self.alignment = alignment
        self.encoder = nn.Sequential(nn.Linear(n_mels, hidden), nn.SiLU(), nn.Linear(hidden, channels))
        self.reset_identity()
        # Filters depend only on the shape; caching them keeps the forward cheap and
        # deterministic (important when gradient checkpointing recomputes it).
        self._filters: dict[tuple[int, int, int], torch.Tensor] = {}

    def reset_identity(self) -> None:
        nn.init.zeros_(self.encoder[-1].weight)
        nn.init.ones_(self.encoder[-1].bias)

    def encoder_input(self, mel: torch.Tensor) -> torch.Tensor:
        """(B, F, n_mels) raw log-Mel -> (B, F, n_mels) float32: S_a ('spectrum') or z ('index')."""
        z = normalise_mel(mel)
        return temporal_spectrum(z) if self.alignment == "spectrum" else z

    def weights(self, mel: torch.Tensor) -> torch.Tensor:
        """(B, F, n_mels) raw log-Mel F_a -> (B, F, C) gains in GAIN_RANGE, row j for shifted bin j."""
        pre = self.encoder(self.encoder_input(mel).to(self.encoder[-1].weight.dtype))
        return 1.0 + torch.tanh(pre - 1.0)

    def _unshifted_filter(self, shape: tuple[int, int, int], device: torch.device) -> torch.Tensor:
        key = tuple(int(s) for s in shape)
        p = self._filters.get(key)
        if p is None:
            p = low_pass_filter(key, self.kind, self.d_s, self.d_t, self.n)
            # Multiplying the unshifted spectrum by ifftshift(P) equals
            # ifftshift(fftshift(X) * P): one shift of a small filter instead of two
            # shifts of the activations.
            p = torch.fft.ifftshift(p, dim=(0, 1, 2))
            self._filters[key] = p
        return p.to(device)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (B, F, H, W, C), weights (B, F, C) -> (B, F, H, W, C), same dtype as x."""
        B, F, H, W, C = x.shape
        if weights.shape != (B, F, C):
            raise ValueError(f"frequency weights must be {(B, F, C)}, got {tuple(weights.shape)}")
        # FFTs in float32: half-precision FFTs are unsupported on CPU and restricted
        # to power-of-two sizes on CUDA.
        spec = torch.fft.fftn(x.float(), dim=(1, 2, 3))
        p = self._unshifted_filter((F, H, W), x.device)[None, :, :, :, None]
        w = torch.fft.ifftshift(weights.float(), dim=1)[:, :, None, None, :]
        gain = p + (1.0 - p) * w  # X*P + X*(1-P)*w in one multiply
        out = torch.fft.ifftn(spec * gain, dim=(1, 2, 3)).real
        return out.to(x.dtype)

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
"""
from __future__ import annotations

import torch
from torch import nn

FILTER_KINDS = ("gaussian", "butterworth", "ideal", "box")


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


class FrequencyFuser(nn.Module):
    """Eq. 9: keep the low band of the 3D spectrum, weight the high band by Enc(F_a).

    Works channels-last on tokens viewed as (B, F, H, W, C), the layout a transformer
    block already has, so no transpose is needed. Enc maps the per-frame log-Mel
    features (B, F, n_mels) to weights (B, F, C); row j weights temporal-frequency
    bin j of the fftshift-ed spectrum (DESIGN 1), broadcast over (H, W).

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
    ):
        super().__init__()
        if kind not in FILTER_KINDS:
            raise ValueError(f"unknown filter kind '{kind}'; expected one of {FILTER_KINDS}")
        self.kind, self.d_s, self.d_t, self.n = kind, d_s, d_t, n
        self.encoder = nn.Sequential(nn.Linear(n_mels, hidden), nn.SiLU(), nn.Linear(hidden, channels))
        self.reset_identity()
        # Filters depend only on the shape; caching them keeps the forward cheap and
        # deterministic (important when gradient checkpointing recomputes it).
        self._filters: dict[tuple[int, int, int], torch.Tensor] = {}

    def reset_identity(self) -> None:
        nn.init.zeros_(self.encoder[-1].weight)
        nn.init.ones_(self.encoder[-1].bias)

    def weights(self, mel: torch.Tensor) -> torch.Tensor:
        """(B, F, n_mels) -> (B, F, C)."""
        return self.encoder(mel)

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

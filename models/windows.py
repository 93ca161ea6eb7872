"""Windowed denoising over a long span (DESIGN 6 "Long videos").

A span of F frames is denoised in windows of `window` frames that overlap by
`overlap` frames. Every model call sees one window, so the activations a step
needs are set by the window, not by the span. At every step the model outputs of
overlapping windows are blended (a linear ramp across each overlap, normalised
per frame); since a DDIM step is linear in the model output, that is the same as
blending the stepped latents, and inversion and sampling blend alike, so sampling
retraces a windowed inversion.

Anchor: sparse-causal attention reads frame 0 and frame i-1 (Tune-A-Video). So
that all windows share one reference, every window that does not start at frame 0
is given the span's frame 0 in front of its own frames ("anchored"). The model
treats the anchor as a clip of its own (no temporal mixing with the window) and
only uses it as the key/value frame 0 of the window's sparse-causal attention;
its output is dropped. Temporal attention, temporal convolutions and the
Frequency Fuser's FFT act within a window.

Layout: windows start at 0, window - overlap apart; the last one ends at the
span's last frame (it may overlap its neighbour by more than `overlap`), so every
window has exactly `window` frames (the FFT and temporal attention see one size).
window=None or window >= F is one window over the whole span: the model is called
once, exactly as without windows.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["Window", "plan_windows", "window_weights", "denoise_windowed", "WindowedModel"]


@dataclass(frozen=True)
class Window:
    start: int
    end: int  # exclusive
    anchored: bool  # the span's frame 0 goes in front (the window does not start at 0)

    @property
    def frames(self) -> int:
        return self.end - self.start

    def index(self, device=None) -> torch.Tensor:
        """Span frame indices the model sees, the anchor (0) first when anchored."""
        idx = torch.arange(self.start, self.end, device=device)
        if self.anchored:
            idx = torch.cat([torch.zeros(1, dtype=idx.dtype, device=device), idx])
        return idx

    def take(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """The model's view of a per-frame tensor whose frame axis is `dim`."""
        return x.index_select(dim, self.index(x.device))


def plan_windows(frames: int, window: int | None, overlap: int = 0, anchor: bool = True) -> list[Window]:
    """Cover [0, frames) with windows of `window` frames, `overlap` apart from the next one."""
    frames = int(frames)
    if frames < 1:
        raise ValueError(f"a span needs at least one frame, got {frames}")
    if window is None or int(window) >= frames:
        return [Window(0, frames, False)]
    window, overlap = int(window), int(overlap)
    if window < 2:
        raise ValueError(f"window must be >= 2 frames (or None for the whole span), got {window}")
    if not 0 <= overlap < window:
        raise ValueError(f"overlap must be in [0, window) = [0, {window}), got {overlap}")
    step = window - overlap
    out, start = [], 0
    while True:
        end = start + window
        if end >= frames:
            start = frames - window
            out.append(Window(start, frames, anchor and start > 0))
            return out
        out.append(Window(start, end, anchor and start > 0))
        start += step


def window_weights(windows: list[Window], frames: int) -> list[torch.Tensor]:
    """Per window, (frames_in_window,) float64 blend weights; summed over windows they are 1 per frame."""
    raw = []
    for k, w in enumerate(windows):
        n = w.frames
        j = torch.arange(n, dtype=torch.float64)
        wt = torch.ones(n, dtype=torch.float64)
        if k > 0:  # ramp up across the overlap with the previous window
            ov = windows[k - 1].end - w.start
            if ov > 0:
                wt = torch.minimum(wt, (j + 1) / (ov + 1))
        if k + 1 < len(windows):  # ramp down across the overlap with the next window
            ov = w.end - windows[k + 1].start
            if ov > 0:
                wt = torch.minimum(wt, (n - j) / (ov + 1))
        raw.append(wt)
    total = torch.zeros(frames, dtype=torch.float64)
    for w, wt in zip(windows, raw):
        total[w.start : w.end] += wt
    if bool((total <= 0).any()):
        raise ValueError("the windows do not cover every frame of the span")
    return [wt / total[w.start : w.end] for w, wt in zip(windows, raw)]


# fn(x_window (B, C, f, H, W), t, window) -> output of the same shape; with window.anchored, f
# counts the anchor in front.
WindowFn = Callable[[torch.Tensor, torch.Tensor, Window], torch.Tensor]


def denoise_windowed(fn: WindowFn, x: torch.Tensor, t: torch.Tensor, windows: list[Window],
                     weights: list[torch.Tensor] | None = None) -> torch.Tensor:
    """One model evaluation over the span x (B, C, F, H, W), window by window, blended."""
    F = x.shape[2]
    if len(windows) == 1 and windows[0].start == 0 and windows[0].end == F and not windows[0].anchored:
        return fn(x, t, windows[0])  # one window: exactly the unwindowed call
    weights = weights if weights is not None else window_weights(windows, F)
    out = None
    for w, wt in zip(windows, weights):
        y = fn(w.take(x, 2), t, w)
        if w.anchored:
            y = y[:, :, 1:]
        if out is None:
            out = torch.zeros(*y.shape[:2], F, *y.shape[3:], dtype=torch.float32, device=y.device)
        out[:, :, w.start : w.end] += y.float() * wt.to(y.device, torch.float32).view(1, 1, -1, 1, 1)
    return out.to(x.dtype)


class WindowedModel:
    """A DDIM model function (x, t) -> out over a span, evaluated in windows (models.ddim.ModelFn)."""

    def __init__(self, fn: WindowFn, frames: int, window: int | None, overlap: int = 0, anchor: bool = True):
        self.fn = fn
        self.windows = plan_windows(frames, window, overlap, anchor)
        self.weights = window_weights(self.windows, frames)
        self.frames = int(frames)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.shape[2] != self.frames:
            raise ValueError(f"expected a span of {self.frames} frames, got {x.shape[2]}")
        return denoise_windowed(self.fn, x, t, self.windows, self.weights)

"""Window planning and blending for long spans (models.windows), on model stand-ins."""
import pytest
import torch

from models.windows import Window, WindowedModel, denoise_windowed, plan_windows, window_weights


def test_plan_covers_the_span_with_equal_windows_and_anchors_all_but_the_first():
    ws = plan_windows(20, 8, 2)
    assert [(w.start, w.end, w.anchored) for w in ws] == [(0, 8, False), (6, 14, True), (12, 20, True)]
    ws = plan_windows(23, 8, 2)  # the last window is pulled back to end at the last frame
    assert [(w.start, w.end) for w in ws] == [(0, 8), (6, 14), (12, 20), (15, 23)]
    assert all(w.frames == 8 for w in ws)
    assert plan_windows(5, 8, 2) == [Window(0, 5, False)]
    assert plan_windows(5, None, 0) == [Window(0, 5, False)]
    assert not any(w.anchored for w in plan_windows(30, 8, 2, anchor=False))
    assert Window(6, 9, True).index().tolist() == [0, 6, 7, 8]


@pytest.mark.parametrize("bad", [dict(window=1, overlap=0), dict(window=8, overlap=8), dict(window=8, overlap=-1)])
def test_plan_rejects_bad_settings(bad):
    with pytest.raises(ValueError):
        plan_windows(20, **bad)


@pytest.mark.parametrize("frames,window,overlap", [(20, 8, 2), (23, 8, 3), (9, 4, 0), (120, 16, 4), (17, 16, 15)])
def test_weights_sum_to_one_and_ramp_across_overlaps(frames, window, overlap):
    ws = plan_windows(frames, window, overlap)
    wts = window_weights(ws, frames)
    total = torch.zeros(frames, dtype=torch.float64)
    for w, wt in zip(ws, wts):
        assert wt.shape == (w.frames,) and bool((wt > 0).all())
        total[w.start : w.end] += wt
    assert torch.allclose(total, torch.ones(frames, dtype=torch.float64))
    # Frames seen by one window only take that window's output unchanged.
    seen = torch.zeros(frames)
    for w in ws:
        seen[w.start : w.end] += 1
    for w, wt in zip(ws, wts):
        only = seen[w.start : w.end] == 1
        assert torch.equal(wt[only], torch.ones(int(only.sum()), dtype=torch.float64))


def test_framewise_model_is_unchanged_by_windows_and_the_anchor_output_is_dropped():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 23, 3, 5, generator=g)
    calls = []

    def fn(xw, t, w):
        calls.append((w.start, w.end, w.anchored, xw.shape[2]))
        if w.anchored:  # the anchor is the span's frame 0
            assert torch.equal(xw[:, :, 0], x[:, :, 0])
        return torch.sin(xw) * t  # frame by frame: blending must give back exactly this

    out = WindowedModel(fn, 23, 8, 2)(x, torch.tensor(3.0))
    assert torch.allclose(out, torch.sin(x) * 3.0, atol=1e-6)
    assert calls == [(0, 8, False, 8), (6, 14, True, 9), (12, 20, True, 9), (15, 23, True, 9)]


def test_one_window_is_exactly_the_unwindowed_call():
    x = torch.randn(1, 4, 6, 2, 2)

    def fn(xw, t, w):
        return xw.cumsum(2) * t  # mixes frames: only an exact pass-through keeps it

    assert torch.equal(WindowedModel(fn, 6, 16, 4)(x, torch.tensor(2.0)), fn(x, torch.tensor(2.0), None))
    assert torch.equal(WindowedModel(fn, 6, None, 0)(x, torch.tensor(2.0)), fn(x, torch.tensor(2.0), None))


def test_blend_is_the_weighted_mean_of_the_window_outputs():
    x = torch.zeros(1, 1, 10, 1, 1)
    ws = plan_windows(10, 6, 2)  # [0, 6) and [4, 10): frames 4 and 5 are shared

    def fn(xw, t, w):
        return torch.full_like(xw, float(w.start))  # window 0 says 0, window 1 says 4

    out = denoise_windowed(fn, x, torch.tensor(0), ws).flatten()
    # Overlap of 2: ramps (1, 2/3, 1/3 ...) normalised -> frame 4: 2/3 * 0 + 1/3 * 4, frame 5: 1/3 * 0 + 2/3 * 4.
    assert torch.allclose(out, torch.tensor([0, 0, 0, 0, 4 / 3, 8 / 3, 4, 4, 4, 4], dtype=torch.float32))


def test_span_length_is_checked():
    m = WindowedModel(lambda xw, t, w: xw, 10, 4, 1)
    with pytest.raises(ValueError, match="10 frames"):
        m(torch.zeros(1, 1, 9, 1, 1), torch.tensor(0))


def test_config_windows_are_validated(tmp_path):
    from tasks.config import ConfigError, config_from_dict

    cfg = config_from_dict({"workdir": str(tmp_path)})
    assert (cfg.stages.windows.window, cfg.stages.windows.overlap) == (16, 4)
    assert config_from_dict({"workdir": str(tmp_path), "stages": {"windows": {"window": None}}}).stages.windows.window is None
    with pytest.raises(ConfigError, match="stages.windows"):
        config_from_dict({"workdir": str(tmp_path), "stages": {"windows": {"window": 4, "overlap": 4}}})
    with pytest.raises(ConfigError, match="stages.windows.window"):
        config_from_dict({"workdir": str(tmp_path), "stages": {"windows": {"window": 1}}})

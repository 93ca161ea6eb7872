"""Video models on tiny presets: Grounded-SAM helpers with known answers, depth, VAE, loading."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from models.checkpoints import MissingWeightsError
from models.depth import DepthEstimator, normalize_depth
from models.grounded_sam import (
    GroundedSAM,
    caption_token_mask,
    normalize_caption,
    sam_mask_to_image,
    select_box,
)
from models.vae import FrameVAE, vae_config
from tasks.sample_data import render_video


@pytest.fixture(scope="module")
def gsam():
    return GroundedSAM.tiny(seed=0)


@pytest.fixture(scope="module")
def clip():
    frames, masks = render_video(5, 4, 48, 80, (220, 40, 40))
    return frames, masks


# ----------------------------------------------------------------------------- captions


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Dog", "dog."),
        ("  Brown   DOG. ", "brown dog."),
        ("dog...", "dog."),
        ("bear_cub", "bear cub."),
        ("man skiing", "man skiing."),
    ],
)
def test_caption_normalisation(raw, expected):
    assert normalize_caption(raw) == expected


def test_empty_caption_is_refused():
    with pytest.raises(ValueError, match="empty caption"):
        normalize_caption("  . ")


def test_caption_tokens_exclude_specials_and_the_full_stop(gsam):
    tok = gsam.dino_processor.tokenizer
    ids = tok("dog.")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["[CLS]", "d", "##o", "##g", ".", "[SEP]"]
    assert caption_token_mask(ids, gsam._ignore).tolist() == [False, True, True, True, False, False]


# ----------------------------------------------------------------------------- box selection


def _logit(p):
    p = torch.as_tensor(p, dtype=torch.float64)
    return torch.log(p / (1 - p)).float()


def _detections():
    """4 queries over a 6-token caption [CLS] d ##o ##g . [SEP] (padded to 8 with -inf)."""
    probs = torch.full((4, 8), 0.01)
    probs[0, 0] = 0.90  # only [CLS] fires: high score, but no caption word -> rejected by the text threshold
    probs[1, 1:4] = 0.60  # a weaker dog
    probs[2, 2] = 0.80  # the best dog
    probs[3, 1:4] = 0.30  # below the box threshold
    logits = _logit(probs)
    logits[:, 6:] = float("-inf")
    boxes = torch.tensor(
        [[0.5, 0.5, 0.2, 0.2], [0.25, 0.25, 0.1, 0.1], [0.5, 0.5, 0.5, 0.25], [0.9, 0.9, 0.1, 0.1]]
    )
    mask = torch.tensor([False, True, True, True, False, False])
    return logits, boxes, mask


def test_threshold_filtering_picks_the_best_captioned_box():
    logits, boxes, mask = _detections()
    det = select_box(logits, boxes, mask, image_size=(100, 200))
    assert det.query == 2 and det.kept == 2
    assert det.score == pytest.approx(0.80, abs=1e-5)
    # (cx, cy, w, h) = (0.5, 0.5, 0.5, 0.25) of a 200 x 100 image
    assert det.box == pytest.approx((50.0, 37.5, 150.0, 62.5))


def test_thresholds_reject_queries():
    logits, boxes, mask = _detections()
    # box threshold above 0.8: the only survivor would be query 0, which has no caption word
    assert select_box(logits, boxes, mask, (100, 200), box_threshold=0.85) is None
    # text threshold above every caption-token probability: nothing
    assert select_box(logits, boxes, mask, (100, 200), text_threshold=0.85) is None
    # text threshold between 0.6 and 0.8: query 1 drops, query 2 stays
    det = select_box(logits, boxes, mask, (100, 200), text_threshold=0.7)
    assert (det.query, det.kept) == (2, 1)
    # both thresholds at 0: every query counts, query 0 wins on its [CLS] score
    det = select_box(logits, boxes, mask, (100, 200), box_threshold=0.0, text_threshold=0.0)
    assert (det.query, det.kept) == (0, 4)


def test_boxes_are_clipped_to_the_image():
    logits, boxes, mask = _detections()
    boxes[2] = torch.tensor([0.95, 0.05, 0.3, 0.3])
    det = select_box(logits, boxes, mask, (100, 200))
    assert det.box == pytest.approx((160.0, 0.0, 200.0, 20.0))


# ----------------------------------------------------------------------------- SAM coordinates


class _BoxEcho(torch.nn.Module):
    """Stands in for SamModel: its 'mask' is exactly the prompt box, drawn in SAM's low-res frame."""

    def __init__(self, encoder_size: int, low: int):
        super().__init__()
        self.encoder_size, self.low = encoder_size, low
        self.seen = None

    def forward(self, pixel_values, input_boxes, multimask_output):
        assert multimask_output is False and pixel_values.shape[-2:] == (self.encoder_size, self.encoder_size)
        self.seen = input_boxes[0, 0].tolist()
        x0, y0, x1, y1 = self.seen
        centres = (torch.arange(self.low) + 0.5) * self.encoder_size / self.low  # low-res pixel centres, model frame
        inside = ((centres[None, :] >= x0) & (centres[None, :] <= x1)) & ((centres[:, None] >= y0) & (centres[:, None] <= y1))
        logits = torch.where(inside, 10.0, -10.0)
        return SimpleNamespace(pred_masks=logits[None, None, None])


def test_sam_mask_lands_on_a_forced_box_in_original_coordinates(gsam, clip):
    image = clip[0][0]  # 48 x 80: SAM resizes the long side to 128 and pads the bottom
    echo = _BoxEcho(128, 32)
    real_sam = gsam.sam
    gsam.sam = echo
    try:
        box = (20.0, 10.0, 60.0, 34.0)
        mask = gsam.segment(image, box)
    finally:
        gsam.sam = real_sam
    # the prompt reached the model scaled by 128 / 80 = 1.6 on both axes (48 -> 77 rows: 77/48)
    assert echo.seen == pytest.approx([20 * 1.6, 10 * 77 / 48, 60 * 1.6, 34 * 77 / 48], abs=1e-3)
    assert mask.shape == (48, 80) and mask.dtype == bool
    ys, xs = np.nonzero(mask)
    # one low-res pixel is 4 model pixels = 2.5 source pixels: edges land within that
    assert abs(xs.min() - 20) <= 2.5 and abs(xs.max() + 1 - 60) <= 2.5
    assert abs(ys.min() - 10) <= 2.5 and abs(ys.max() + 1 - 34) <= 2.5
    truth = np.zeros((48, 80), bool)
    truth[10:34, 20:60] = True
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.85


def test_sam_postprocessing_removes_padding(gsam):
    # A low-res mask that is on only in the padded strip must vanish in the original image.
    low = torch.full((32, 32), -10.0)
    low[26:, :] = 10.0  # rows below 48/80 * 32 = 19.2 are padding
    out = sam_mask_to_image(gsam.sam_processor, low, (48, 80), (77, 128))
    assert out.shape == (48, 80) and not out.any()


# ----------------------------------------------------------------------------- Grounded-SAM end to end


def test_grounded_sam_end_to_end_from_saved_folders(gsam, clip, tmp_path):
    frame = clip[0][0]
    gsam.save(tmp_path / "gdino", tmp_path / "sam")
    loaded = GroundedSAM.from_folders(tmp_path / "gdino", tmp_path / "sam")
    # random weights: thresholds 0 so the best query is always an answer
    mask, det = loaded.first_mask(frame, "Ball", box_threshold=0.0, text_threshold=0.0)
    assert mask.shape == frame.shape[:2] and mask.dtype == bool
    x0, y0, x1, y1 = det.box
    assert 0 <= x0 <= x1 <= 80 and 0 <= y0 <= y1 <= 48 and det.kept == 20
    same_mask, same_det = gsam.first_mask(frame, "ball", box_threshold=0.0, text_threshold=0.0)
    assert same_det == det and np.array_equal(same_mask, mask)


def test_no_box_is_a_clear_error(gsam, clip):
    with pytest.raises(ValueError, match=r"no box for caption 'ball\.'"):
        gsam.first_mask(clip[0][0], "ball", box_threshold=1.0)


def test_missing_model_folders_name_the_files(tmp_path):
    with pytest.raises(MissingWeightsError, match=r"Grounding DINO: model folder not found at .*nope.*config\.json"):
        GroundedSAM.from_folders(tmp_path / "nope", tmp_path / "nope2")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(MissingWeightsError, match=r"lacks model\.safetensors or .*pytorch_model\.bin"):
        DepthEstimator.from_folder(tmp_path / "empty")
    with pytest.raises(MissingWeightsError, match=r"VAE .*not found at .*base/vae"):
        FrameVAE.from_base_folder(tmp_path / "base")


# ----------------------------------------------------------------------------- depth


def test_depth_normalisation_known_values():
    d = torch.tensor([[[0.0, 1.0], [2.0, 4.0]], [[3.0, 3.0], [3.0, 3.0]]])
    out = normalize_depth(d)
    assert out[0].tolist() == [[0.0, 0.25], [0.5, 1.0]]
    assert out[1].tolist() == [[0.0, 0.0], [0.0, 0.0]]  # no range: all zeros, never NaN


def test_depth_tiny_hybrid_roundtrip(clip, tmp_path):
    frames = clip[0]
    est = DepthEstimator.tiny(0)
    assert est.model.config.is_hybrid and type(est.model.dpt.embeddings).__name__ == "DPTViTHybridEmbeddings"
    out = est(frames, batch_size=3)
    assert out.shape == (4, 48, 80) and out.dtype == torch.float32
    assert torch.allclose(out.amin(dim=(1, 2)), torch.zeros(4)) and torch.allclose(out.amax(dim=(1, 2)), torch.ones(4))
    est.save(tmp_path / "dpt")
    again = DepthEstimator.from_folder(tmp_path / "dpt")
    assert torch.equal(again(frames), est(frames))


# ----------------------------------------------------------------------------- VAE


def test_vae_scaling_factor_comes_from_the_config(clip, tmp_path):
    frames = np.ascontiguousarray(clip[0][:, :48, :48])
    vae = FrameVAE.random(seed=1, **{**vae_config(tiny=True), "scaling_factor": 0.5})
    vae.save_as_base(tmp_path / "base")
    loaded = FrameVAE.from_base_folder(tmp_path / "base")
    assert loaded.scaling_factor == 0.5
    z = loaded.encode(frames, chunk=3)
    assert z.shape == (4, 4, 6, 6) and z.dtype == torch.float32
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        mean = loaded.vae.encode(x).latent_dist.mean
    assert torch.allclose(z, mean * 0.5, atol=1e-5)


def test_vae_refuses_sizes_it_cannot_encode(clip):
    with pytest.raises(ValueError, match="not a multiple of the VAE's downsampling"):
        FrameVAE.tiny(0).encode(np.ascontiguousarray(clip[0][:, :44, :80]))

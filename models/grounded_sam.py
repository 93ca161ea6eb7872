"""Grounded-SAM first-frame masks (DESIGN 1 "Masks"): Grounding DINO box -> SAM mask.

Grounding DINO (transformers `GroundingDinoForObjectDetection`) reads frame 0 and a
caption (the video's object noun), SAM (transformers `SamModel`) turns the best box
into one mask in the frame's own pixel coordinates. XMem then propagates it
(models.xmem). Both models load from local Hugging Face folders; `tiny()` builds
the same classes with small configs and seeded random weights, and processors that
need no download (a character-level WordPiece vocabulary built in code).

Box selection follows Grounded-SAM's demo: a query's score is its highest token
probability (sigmoid of the logits); it is kept when the score exceeds the box
threshold (0.35) *and* at least one caption word-piece exceeds the text threshold
(0.25), so a box that only matches [CLS]/[SEP]/"." is not an answer; the best box
is the kept query with the highest score.
"""
from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.local_folders import require_model_folder

BOX_THRESHOLD = 0.35
TEXT_THRESHOLD = 0.25
# Word pieces that carry no object meaning in a caption (besides the tokenizer's special tokens).
PUNCTUATION = (".", ",")


# ----------------------------------------------------------------------------- pure helpers


def normalize_caption(text: str) -> str:
    """Grounding DINO's caption form: lower case, single spaces, one trailing '.'."""
    words = " ".join(str(text).replace("_", " ").split()).lower().strip()
    words = words.rstrip(". ").strip()
    if not words:
        raise ValueError(f"empty caption {text!r}: Grounding DINO needs the object's name")
    return words + "."


def caption_token_mask(input_ids: Sequence[int], ignore_ids: set[int], length: int | None = None) -> torch.Tensor:
    """(length,) bool: True at word pieces of the caption (not special tokens or punctuation)."""
    ids = list(input_ids)
    n = len(ids) if length is None else length
    mask = torch.zeros(n, dtype=torch.bool)
    for i, t in enumerate(ids[:n]):
        mask[i] = int(t) not in ignore_ids
    return mask


@dataclass(frozen=True)
class Detection:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in the image's pixels
    score: float
    query: int  # index of the Grounding DINO query that produced it
    kept: int  # how many queries passed both thresholds

    def as_dict(self) -> dict:
        return {"box": [float(v) for v in self.box], "score": float(self.score), "query": self.query, "kept": self.kept}


def select_box(
    logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    token_mask: torch.Tensor,
    image_size: tuple[int, int],
    box_threshold: float = BOX_THRESHOLD,
    text_threshold: float = TEXT_THRESHOLD,
) -> Detection | None:
    """Best box of one image's Grounding DINO outputs, or None when no query passes.

    logits (Q, T) raw token logits (positions past the text are -inf), pred_boxes (Q, 4)
    normalised (cx, cy, w, h), token_mask (<= T,) True at caption word pieces,
    image_size (height, width). The box comes back as pixel (x0, y0, x1, y1), clipped
    to the image.
    """
    probs = torch.sigmoid(logits.float())
    scores = probs.max(dim=-1).values
    tm = torch.zeros(probs.shape[-1], dtype=torch.bool)
    tm[: min(len(token_mask), probs.shape[-1])] = token_mask[: probs.shape[-1]].bool()
    text_ok = (probs[:, tm] > text_threshold).any(dim=-1) if tm.any() else torch.zeros_like(scores, dtype=torch.bool)
    keep = (scores > box_threshold) & text_ok
    if not keep.any():
        return None
    best = int(torch.where(keep, scores, torch.full_like(scores, -1.0)).argmax())
    h, w = image_size
    cx, cy, bw, bh = pred_boxes[best].float().tolist()
    x0, x1 = np.clip([(cx - bw / 2) * w, (cx + bw / 2) * w], 0, w)
    y0, y1 = np.clip([(cy - bh / 2) * h, (cy + bh / 2) * h], 0, h)
    return Detection((float(x0), float(y0), float(x1), float(y1)), float(scores[best]), best, int(keep.sum()))


def sam_mask_to_image(
    processor, pred_masks: torch.Tensor, original_size, reshaped_size, threshold: float = 0.0
) -> np.ndarray:
    """One low-resolution SAM mask (any of (1,1,1,h,w), (1,1,h,w), (h,w)) -> bool (H, W) in the original image.

    SAM's frame is the image resized so its longest side is the encoder size, then padded
    at the bottom/right; the processor removes the padding and scales back (bilinear), so
    the mask lands in the original pixel grid.
    """
    m = pred_masks.float()
    while m.ndim < 4:
        m = m[None]
    m = m.reshape(1, 1, *m.shape[-2:])
    out = processor.post_process_masks(
        [m], [tuple(int(v) for v in original_size)], [tuple(int(v) for v in reshaped_size)],
        mask_threshold=threshold, binarize=True,
    )[0]
    return out[0, 0].cpu().numpy().astype(bool)


# ----------------------------------------------------------------------------- tiny presets


def tiny_tokenizer(max_length: int = 64):
    """BERT WordPiece tokenizer over letters and digits (every word splits into characters).

    Built in code so the tiny preset needs no vocabulary download; the real models
    bring their own tokenizer files.
    """
    from transformers import BertTokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits)
    vocab = specials + list(PUNCTUATION) + ["-", "'"] + chars + ["##" + c for c in chars]
    return BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, model_max_length=max_length)


def tiny_grounding_dino_config():
    from transformers import BertConfig, GroundingDinoConfig, SwinConfig

    backbone = SwinConfig(
        image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4,
        out_features=["stage2", "stage3", "stage4"],
    )
    text = BertConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64,
    )
    # decoder_layers >= 2: the per-layer box heads are tied to layer 0's, which needs a second layer.
    return GroundingDinoConfig(
        backbone_config=backbone, text_config=text, d_model=32, encoder_layers=1, decoder_layers=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_attention_heads=2, decoder_attention_heads=2,
        num_queries=20, num_feature_levels=4, max_text_len=64, encoder_n_points=2, decoder_n_points=2,
    )


def grounding_dino_processor(shortest_edge: int = 800, longest_edge: int = 1333, max_text_len: int = 256):
    from transformers import GroundingDinoProcessor
    from transformers.models.grounding_dino.image_processing_pil_grounding_dino import GroundingDinoImageProcessorPil

    image_processor = GroundingDinoImageProcessorPil(size={"shortest_edge": shortest_edge, "longest_edge": longest_edge})
    return GroundingDinoProcessor(image_processor=image_processor, tokenizer=tiny_tokenizer(max_text_len))


def tiny_sam_config():
    from transformers import SamConfig, SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig

    vision = SamVisionConfig(
        hidden_size=32, output_channels=32, num_hidden_layers=2, num_attention_heads=2, image_size=128, patch_size=16,
        window_size=4, global_attn_indexes=[1], num_pos_feats=16, mlp_ratio=2.0,
    )
    prompt = SamPromptEncoderConfig(hidden_size=32, image_size=128, patch_size=16, mask_input_channels=4)
    decoder = SamMaskDecoderConfig(
        hidden_size=32, mlp_dim=64, num_hidden_layers=2, num_attention_heads=2, iou_head_hidden_dim=32
    )
    return SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)


def sam_processor_for(config):
    """A SamProcessor matching a SamConfig's encoder size (1024 -> 256 masks for the real models)."""
    from transformers import SamProcessor
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    size = int(config.vision_config.image_size)
    low = size * 4 // int(config.vision_config.patch_size)  # the mask decoder upsamples embeddings 4x
    image_processor = SamImageProcessorPil(
        size={"longest_edge": size}, pad_size={"height": size, "width": size},
        mask_size={"longest_edge": low}, mask_pad_size={"height": low, "width": low},
    )
    return SamProcessor(image_processor=image_processor)


def _seeded(build, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


# ----------------------------------------------------------------------------- the model pair


class GroundedSAM:
    """Grounding DINO + SAM on one image: caption -> best box -> single mask."""

    def __init__(self, dino, dino_processor, sam, sam_processor):
        self.dino, self.dino_processor = dino.eval(), dino_processor
        self.sam, self.sam_processor = sam.eval(), sam_processor
        tok = dino_processor.tokenizer
        self._ignore = set(tok.all_special_ids) | {tok.convert_tokens_to_ids(p) for p in PUNCTUATION}
        self._ignore.discard(tok.unk_token_id)  # an unknown word piece still names the object

    # -- constructors --------------------------------------------------------------------
    @classmethod
    def random(cls, dino_config, sam_config, dino_processor, sam_processor=None, seed: int = 0) -> GroundedSAM:
        """Any configs with seeded random weights (tiny preset, benchmarks of full-size architectures)."""
        from transformers import GroundingDinoForObjectDetection, SamModel

        dino = _seeded(lambda: GroundingDinoForObjectDetection(dino_config), seed)
        sam = _seeded(lambda: SamModel(sam_config), seed + 1)
        return cls(dino, dino_processor, sam, sam_processor or sam_processor_for(sam_config))

    @classmethod
    def tiny(cls, seed: int = 0) -> GroundedSAM:
        return cls.random(
            tiny_grounding_dino_config(), tiny_sam_config(), grounding_dino_processor(128, 192, max_text_len=64), seed=seed
        )

    @classmethod
    def from_folders(cls, dino_path, sam_path, device: str = "cpu", dino_setting=None, sam_setting=None) -> GroundedSAM:
        """Local Hugging Face folders (e.g. grounding-dino-tiny, sam-vit-huge); never the hub."""
        from transformers import GroundingDinoForObjectDetection, GroundingDinoProcessor, SamModel, SamProcessor

        dp = require_model_folder(dino_path, "Grounding DINO", needs=("config.json",), setting=dino_setting)
        sp = require_model_folder(sam_path, "SAM", needs=("config.json",), setting=sam_setting)
        dino = GroundingDinoForObjectDetection.from_pretrained(dp, local_files_only=True).to(device)
        sam = SamModel.from_pretrained(sp, local_files_only=True).to(device)
        return cls(
            dino, GroundingDinoProcessor.from_pretrained(dp, local_files_only=True),
            sam, SamProcessor.from_pretrained(sp, local_files_only=True),
        )

    def save(self, dino_dir: str | Path, sam_dir: str | Path) -> None:
        """Write both in the Hugging Face folder format that `from_folders` reads."""
        self.dino.save_pretrained(dino_dir)
        self.dino_processor.save_pretrained(dino_dir)
        self.sam.save_pretrained(sam_dir)
        self.sam_processor.save_pretrained(sam_dir)

    def to(self, device) -> GroundedSAM:
        self.dino.to(device)
        self.sam.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.dino.parameters()).device

    # -- inference -------------------------------------------------------------------------
    @torch.inference_mode()
    def detect(
        self, image: np.ndarray, caption: str, box_threshold: float = BOX_THRESHOLD, text_threshold: float = TEXT_THRESHOLD
    ) -> Detection | None:
        """Best box for `caption` on uint8 (H, W, 3) `image`, in its pixels; None if nothing passes."""
        text = normalize_caption(caption)
        max_len = int(self.dino.config.max_text_len)
        inputs = self.dino_processor(images=image, text=text, return_tensors="pt", truncation=True, max_length=max_len)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        out = self.dino(**inputs)
        ids = inputs["input_ids"][0].tolist()
        mask = caption_token_mask(ids, self._ignore)
        return select_box(
            out.logits[0].cpu(), out.pred_boxes[0].cpu(), mask, image.shape[:2], box_threshold, text_threshold
        )

    @torch.inference_mode()
    def segment(self, image: np.ndarray, box: Sequence[float]) -> np.ndarray:
        """SAM's single mask for one box (x0, y0, x1, y1 in image pixels) -> bool (H, W)."""
        inputs = self.sam_processor(images=image, input_boxes=[[[float(v) for v in box]]], return_tensors="pt")
        out = self.sam(
            pixel_values=inputs["pixel_values"].to(self.device, torch.float32),
            input_boxes=inputs["input_boxes"].to(self.device, torch.float32),
            multimask_output=False,
        )
        original, reshaped = inputs["original_sizes"][0].tolist(), inputs["reshaped_input_sizes"][0].tolist()
        return sam_mask_to_image(self.sam_processor, out.pred_masks.cpu(), original, reshaped)

    def first_mask(
        self, image: np.ndarray, caption: str, box_threshold: float = BOX_THRESHOLD, text_threshold: float = TEXT_THRESHOLD
    ) -> tuple[np.ndarray, Detection]:
        """Mask of the caption's object on `image`; ValueError (naming the caption) when none is found."""
        det = self.detect(image, caption, box_threshold, text_threshold)
        if det is None:
            raise ValueError(
                f"Grounding DINO found no box for caption {normalize_caption(caption)!r} "
                f"(box threshold {box_threshold}, text threshold {text_threshold})"
            )
        return self.segment(image, det.box), det

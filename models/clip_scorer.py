"""CLIP ViT-L/14 image and text embeddings for the evaluation metrics (DESIGN 1 "Metrics").

transformers `CLIPModel` with its tokenizer (`CLIPTokenizer`) and image processor
(`CLIPImageProcessorPil`: PIL resize of the shortest side to 224, bicubic,
centre crop 224, OpenAI mean/std; the PIL backend needs no torchvision), from a
local `clip-vit-large-patch14` folder; nothing is downloaded.

Tiny preset: the same classes with a small config, seeded random weights and a
byte-level tokenizer built in code (one token per byte, no merges), so tests
and the demo run offline in seconds. `save` writes the official folder layout,
so the folder loader is tested on a saved tiny model.

Embeddings are the projected features (`get_image_features` / `get_text_features`),
float32 on CPU, *not* normalised: the metric functions take cosines.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from models.local_folders import require_model_folder

# Pixel side of the tiny vision tower: small enough for CPU tests, a multiple of its patch.
TINY_IMAGE_SIZE = 32
TINY_MAX_TOKENS = 32


def _byte_symbols() -> list[str]:
    """GPT-2 / CLIP byte-level alphabet: 256 printable characters, one per byte value."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    extra = 0
    out = {}
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def tiny_tokenizer():
    """A CLIPTokenizer with a 514-token byte vocabulary (each byte alone and word-final), built offline.

    Every text tokenises (no unknown bytes); start/end tokens take the last two ids,
    as in OpenAI's vocabulary, so the end token is the highest id of every sequence.
    """
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": 256 + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=TINY_MAX_TOKENS)


def tiny_config(vocab_size: int, bos: int, eos: int):
    from transformers import CLIPConfig

    text = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=TINY_MAX_TOKENS, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
    )
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=TINY_IMAGE_SIZE, patch_size=8,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


def tiny_image_processor():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    s = TINY_IMAGE_SIZE
    return CLIPImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s})


class ClipScorer:
    """CLIP embeddings: uint8 frames (F, H, W, 3) -> (F, D); texts -> (T, D); float32 CPU tensors."""

    def __init__(self, model, tokenizer, image_processor):
        self.model, self.tokenizer, self.image_processor = model.eval(), tokenizer, image_processor

    @classmethod
    def tiny(cls, seed: int = 0) -> ClipScorer:
        from transformers import CLIPModel

        tok = tiny_tokenizer()
        config = tiny_config(len(tok), tok.bos_token_id, tok.eos_token_id)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = CLIPModel(config)
        return cls(model, tok, tiny_image_processor())

    @classmethod
    def from_folder(cls, path, device: str = "cpu", setting: str | None = None) -> ClipScorer:
        """A local clip-vit-large-patch14 folder: config.json, weights, tokenizer files, preprocessor_config.json."""
        from transformers import CLIPModel, CLIPTokenizer
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        p = require_model_folder(
            path, "CLIP (clip-vit-large-patch14)", needs=("config.json", "preprocessor_config.json"), setting=setting
        )
        if not ((p / "tokenizer.json").exists() or ((p / "vocab.json").exists() and (p / "merges.txt").exists())):
            from models.checkpoints import MissingWeightsError

            raise MissingWeightsError(f"CLIP: model folder '{p}' lacks tokenizer.json (or vocab.json + merges.txt)")
        model = CLIPModel.from_pretrained(p, local_files_only=True).to(device)
        tokenizer = CLIPTokenizer.from_pretrained(p, local_files_only=True)
        processor = CLIPImageProcessorPil.from_pretrained(p, local_files_only=True)
        return cls(model, tokenizer, processor)

    def save(self, path: str | Path) -> None:
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @staticmethod
    def _pooled(out) -> torch.Tensor:
        # transformers 5 returns a model output whose pooler_output is the projection; 4.x a tensor.
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    @torch.inference_mode()
    def embed_images(self, frames: np.ndarray, batch_size: int = 8) -> torch.Tensor:
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 (F, H, W, 3), got {frames.dtype} {frames.shape}")
        dtype = next(self.model.parameters()).dtype
        outs = []
        for i in range(0, len(frames), max(1, int(batch_size))):
            pixels = self.image_processor(images=list(frames[i : i + batch_size]), return_tensors="pt")["pixel_values"]
            feats = self._pooled(self.model.get_image_features(pixel_values=pixels.to(self.device, dtype)))
            outs.append(feats.float().cpu())
        return torch.cat(outs)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        texts = list(texts)
        if not texts:
            raise ValueError("embed_texts needs at least one text")
        enc = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        feats = self.model.get_text_features(
            input_ids=enc["input_ids"].to(self.device), attention_mask=enc["attention_mask"].to(self.device)
        )
        return self._pooled(feats).float().cpu()

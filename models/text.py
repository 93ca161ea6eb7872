"""The base model's text encoder, used for one thing: the blank prompt "" (paper 4.1).

AudioScenic keeps the U-Net's cross-attention but feeds it the encoding of an empty
prompt, computed once per loaded model. The real encoder is the base folder's
`tokenizer/` + `text_encoder/` (a transformers CLIPTextModel; SD 2.x pipelines use
its last hidden state, padded to the tokenizer's max length). The tiny preset is a
small CLIPTextModel with a letters-only BPE vocabulary, both built offline.
"""
from __future__ import annotations

from pathlib import Path

import torch

from models.local_folders import require_model_folder

TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def tiny_tokenizer(max_length: int = 77):
    """A CLIP tokenizer over single letters (no merges): enough for "" and for tests, built offline."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def tiny_text_encoder(seed: int = 0, hidden_size: int = 32, max_length: int = 77):
    """(tokenizer, CLIPTextModel) with seeded random weights; hidden_size = the U-Net's cross_attention_dim."""
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = tiny_tokenizer(max_length)
    config = CLIPTextConfig(
        vocab_size=len(tok.get_vocab()), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=max_length,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModel(config)
    return tok, model.eval()


def load_text_encoder(base: str | Path, device: str | torch.device = "cpu", setting: str | None = None):
    """(tokenizer, CLIPTextModel) from a local diffusers pipeline folder's tokenizer/ and text_encoder/."""
    from transformers import CLIPTextModel, CLIPTokenizer

    root = Path(base).expanduser() if base is not None else None
    require_model_folder(None if root is None else root / "text_encoder", "text encoder (base model's text_encoder/)",
                         setting=setting)
    tok_dir = None if root is None else root / "tokenizer"
    require_model_folder(tok_dir, "tokenizer (base model's tokenizer/)", needs=(), weights=TOKENIZER_FILES,
                         setting=setting)
    tok = CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    model = CLIPTextModel.from_pretrained(str(root / "text_encoder"), local_files_only=True, torch_dtype=torch.float32)
    return tok, model.to(device).eval()


@torch.no_grad()
def encode_prompt(tokenizer, text_encoder, prompt: str = "") -> torch.Tensor:
    """(1, max_length, hidden) float32: the last hidden state, as SD 2.x pipelines feed the U-Net."""
    ids = tokenizer(
        prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    dev = next(text_encoder.parameters()).device
    return text_encoder(ids.to(dev))[0].float()

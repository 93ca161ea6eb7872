"""Checks for local transformers / diffusers model folders (nothing is ever downloaded).

A Hugging Face folder holds a config and one weights file whose name depends on
when it was saved (safetensors or the older pickle), so "one of" these names is
accepted. Errors are `MissingWeightsError`s naming the folder and what is missing.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from models.checkpoints import MissingWeightsError

HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
DIFFUSERS_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
)


def require_model_folder(
    path: str | Path | None,
    what: str,
    *,
    needs: Iterable[str] = ("config.json",),
    weights: Sequence[str] = HF_WEIGHTS,
    setting: str | None = None,
) -> Path:
    """The folder as a Path, or MissingWeightsError saying which files it should hold."""
    where = f" (config: {setting})" if setting else ""
    needs = list(needs)
    expected = ", ".join(needs + [" or ".join(weights)])
    if path is None:
        raise MissingWeightsError(
            f"{what}: no model folder configured{where}. Expected a local folder holding {expected}; "
            "nothing is downloaded at run time. Use the 'tiny' preset for a demo."
        )
    p = Path(path).expanduser()
    if not p.is_dir():
        raise MissingWeightsError(
            f"{what}: model folder not found at '{p}'{where}. Expected a local folder holding {expected}; "
            "nothing is downloaded at run time."
        )
    missing = [n for n in needs if not (p / n).exists()]
    if weights and not any((p / w).exists() for w in weights):
        missing.append(" or ".join(weights))
    if missing:
        raise MissingWeightsError(f"{what}: model folder '{p}'{where} lacks {', '.join(missing)}")
    return p

"""Loading weights from local files only, with errors a user can act on.

Every model in this package loads from a path the user gives; nothing is ever
downloaded. These helpers give the same clear message everywhere: which file,
which keys, what to do.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch


class MissingWeightsError(FileNotFoundError):
    """A configured weights file or folder is not there (or is incomplete)."""


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or shapes do not match the architecture."""


def require_file(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise MissingWeightsError(
            f"{what}: weights file not found at '{p}'. Download it yourself and set its path in the config "
            f"(nothing is downloaded at run time), or use the 'tiny' preset."
        )
    return p


def require_folder(path: str | Path, expected: Iterable[str], what: str) -> Path:
    """Check a local model folder exists and holds each of `expected` (relative paths)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise MissingWeightsError(
            f"{what}: model folder not found at '{p}'. Expected a local folder holding: "
            f"{', '.join(expected)}. Set its path in the config, or use the 'tiny' preset."
        )
    missing = [e for e in expected if not (p / e).exists()]
    if missing:
        raise MissingWeightsError(f"{what}: model folder '{p}' lacks {', '.join(missing)}")
    return p


def load_state_dict(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """Read a checkpoint as tensors only: safetensors, or torch pickle with weights_only=True."""
    p = require_file(path, what)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    try:
        obj = torch.load(p, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError:
        # Legacy (non-zip) checkpoints cannot be memory-mapped.
        obj = torch.load(p, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping):
        raise CheckpointMismatchError(f"{what}: '{p}' does not hold a state dict (got {type(obj).__name__})")
    return dict(obj)


def check_state_dict(
    module: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str | Path, what: str
) -> None:
    """Strict key and shape check with a message naming the offending keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shape = sorted(
        f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
        for k in set(own) & set(state)
        if tuple(own[k].shape) != tuple(state[k].shape)
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else ""))
    if unexpected:
        problems.append(
            f"unexpected keys: {', '.join(unexpected[:10])}" + (" ..." if len(unexpected) > 10 else "")
        )
    if bad_shape:
        problems.append(f"shape mismatch: {', '.join(bad_shape[:10])}")
    if problems:
        raise CheckpointMismatchError(f"{what}: checkpoint '{source}' does not match the architecture; " + "; ".join(problems))

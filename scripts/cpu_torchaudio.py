"""Make torchaudio importable beside a CPU-only torch.

The registry's torchaudio wheel is a CUDA build whose compiled extension cannot
load against the CPU torch wheel, so `import torchaudio` fails. We only use its
pure-Python parts (Kaldi fbank, MelSpectrogram, resample), which work once the
compiled libraries are absent. Does nothing when torch has CUDA.
"""
from __future__ import annotations

import importlib.util
import pathlib
import sys

import torch


def main() -> int:
    if torch.version.cuda is not None:
        print("torch has CUDA; torchaudio left as installed")
        return 0
    spec = importlib.util.find_spec("torchaudio")
    if spec is None or not spec.submodule_search_locations:
        print("torchaudio is not installed", file=sys.stderr)
        return 1
    lib = pathlib.Path(list(spec.submodule_search_locations)[0]) / "lib"
    removed = [p for p in lib.glob("*.so")]
    for p in removed:
        p.unlink()
    print(f"CPU-only torch: removed {len(removed)} torchaudio extension(s) from {lib}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Zarr latent write/read vs raw numpy save/load of the same array (same run, same disk).

The array is one video's inversion latents at the paper's size: 8 frames x 4 x 96 x 96
float32 (and a 24-frame clip), written through the artifact store's commit protocol.

Usage: python benchmarks/bench_zarr.py [out.json]
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from storage import ArtifactStore  # noqa: E402


def best(fn, repeats=5):
    t = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        t = min(t, time.perf_counter() - t0)
    return t


def main(argv=None) -> dict:
    out = Path((argv or sys.argv[1:] or [str(REPO / "benchmarks" / "results" / "zarr.json")])[0])
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = ArtifactStore(Path(tmp) / "store.zarr")
        for frames in (8, 24):
            x = np.random.default_rng(0).normal(size=(frames, 4, 96, 96)).astype(np.float32)
            npy = Path(tmp) / f"x{frames}.npy"
            path = f"inversion/v{frames}/m"
            w_np = best(lambda: np.save(npy, x))
            r_np = best(lambda: np.load(npy))
            w_z = best(lambda: store.write(path, "k", {"latents": x}))
            r_z = best(lambda: store.read(path, "k")["latents"])
            assert np.array_equal(store.read(path, "k")["latents"], x)
            result[f"{frames}x4x96x96_float32"] = {
                "mbytes": round(x.nbytes / 1e6, 2),
                "numpy_save_s": round(w_np, 5), "numpy_load_s": round(r_np, 5),
                "zarr_write_commit_s": round(w_z, 5), "zarr_read_s": round(r_z, 5),
                "zarr_write_vs_numpy": round(w_z / w_np, 2), "zarr_read_vs_numpy": round(r_z / r_np, 2),
            }
    print(json.dumps(result, indent=1))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()

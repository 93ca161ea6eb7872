"""Per-frame CPU time of XMem propagation, tiny preset and full-size architecture (random weights).

Usage: python benchmarks/bench_xmem.py [OUT_JSON] (default benchmarks/results/xmem.json)

For each model it times `models.xmem.propagate` over a short synthetic video at a small
resolution (default memory settings: mem_every 5, top_k 30, ...), and, as the baseline
measured in the same run on the same frames, one key-encoder pass per frame (the ResNet-50
trunk + key projection every frame needs anyway). `ratio_vs_baseline` = propagate time per
frame / baseline time per frame, i.e. what the value encoder, memory readout and decoder cost
on top of the unavoidable per-frame encoding; it is less machine-dependent than seconds.
Timings are medians of interleaved repeats after a warm-up (wall clock; `per_frame_s_min` is
the fastest run, the least disturbed by other processes).
"""
from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.xmem import XMem, propagate  # noqa: E402

torch.manual_seed(0)  # the full-size model's random weights

HEIGHT, WIDTH, FRAMES = 128, 128, 8
REPEATS_TINY, REPEATS_FULL = 7, 3


def _video(n: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    frames = np.repeat(rng.integers(0, 120, size=(1, h, w, 3), dtype=np.uint8), n, axis=0)
    for t in range(n):
        frames[t, h // 4 : h // 2, w // 4 + 2 * t : w // 2 + 2 * t] = (230, 200, 40)
    mask = np.zeros((h, w), dtype=bool)
    mask[h // 4 : h // 2, w // 4 : w // 2] = True
    return frames, mask


def bench(name: str, model: XMem, frames: np.ndarray, mask: np.ndarray, repeats: int) -> dict:
    n = len(frames)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255

    def baseline():
        with torch.inference_mode():
            for i in range(n):
                model.encode_key(x[i : i + 1])

    def run():
        propagate(model, frames, mask)

    baseline()  # warm-up (allocator, first-call kernels)
    run()
    # Interleaved so that load from other processes hits both measurements alike.
    base_t, run_t = [], []
    for _ in range(repeats):
        for fn, acc in ((baseline, base_t), (run, run_t)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    base = statistics.median(base_t) / n
    per_frame = statistics.median(run_t) / n
    return {
        "model": name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "per_frame_s": round(per_frame, 5),
        "per_frame_s_min": round(min(run_t) / n, 5),
        "fps": round(1 / per_frame, 2),
        "baseline": "key encoder + key projection, one pass per frame, same model and frames",
        "baseline_per_frame_s": round(base, 5),
        "ratio_vs_baseline": round(per_frame / base, 3),
    }


def main(argv: list[str]) -> Path:
    out = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent / "results" / "xmem.json"
    frames, mask = _video(FRAMES, HEIGHT, WIDTH)
    results = [
        bench("tiny", XMem.tiny(seed=0), frames, mask, REPEATS_TINY),
        bench("full", XMem(), frames, mask, REPEATS_FULL),
    ]
    report = {
        "benchmark": "xmem_propagate_cpu",
        "resolution": [HEIGHT, WIDTH],
        "frames": FRAMES,
        "repeats": {"tiny": REPEATS_TINY, "full": REPEATS_FULL},
        "memory_config": "defaults (mem_every 5, top_k 30, mid-term 5..10, 128 prototypes, 10000 long-term)",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "results": results,
        "full_vs_tiny_per_frame": round(results[1]["per_frame_s"] / results[0]["per_frame_s"], 2),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return out


if __name__ == "__main__":
    main(sys.argv)

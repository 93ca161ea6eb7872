"""Per-frame CPU time of the video-stage models, tiny presets and full-size architectures.

Full-size = the real architecture with random weights (nothing is downloaded), run at
a small resolution so the benchmark stays short. Every time is also given as a ratio
to a baseline measured in the same run, right before each model (a fixed 3x3
convolution), so numbers from different machines or loads can be compared.

    .venv/bin/python benchmarks/bench_video.py [benchmarks/results/video.json] [--threads N]

On a shared machine, --threads 1 is steadier: OpenMP threads that wait for a busy
core can slow a call several times over.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FRAMES = 4


def best_of(fn, repeat: int = 3) -> float:
    """Fastest of `repeat` timed calls after one warm-up (the least disturbed by other load)."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def baseline() -> float:
    x = torch.randn(1, 64, 128, 128)
    w = torch.randn(64, 64, 3, 3)
    with torch.inference_mode():
        return best_of(lambda: torch.nn.functional.conv2d(x, w, padding=1), repeat=10)


def clip(size: int) -> np.ndarray:
    from tasks.sample_data import render_video

    frames, _ = render_video(3, FRAMES, size, size, (220, 40, 40))
    return frames


def bench_grounding_dino(full: bool):
    from transformers import GroundingDinoConfig

    from models.grounded_sam import GroundedSAM, grounding_dino_processor, tiny_grounding_dino_config, tiny_sam_config

    if full:  # grounding-dino-tiny: Swin-T + BERT-base, 900 queries; image short side 256 instead of 800
        cfg, proc, size = GroundingDinoConfig(), grounding_dino_processor(256, 427), 256
    else:
        cfg, proc, size = tiny_grounding_dino_config(), grounding_dino_processor(128, 192, 64), 128
    g = GroundedSAM.random(cfg, tiny_sam_config(), proc)
    frame = clip(size)[0]
    return size, best_of(lambda: g.detect(frame, "ball", 0.0, 0.0), repeat=2)  # runs on frame 0 only


def bench_sam(full: bool):
    from transformers import SamConfig, SamPromptEncoderConfig, SamVisionConfig

    from models.grounded_sam import GroundedSAM, grounding_dino_processor, tiny_grounding_dino_config, tiny_sam_config

    if full:  # sam-vit-base widths and depths; encoder input 512 instead of 1024
        size = 512
        cfg = SamConfig(vision_config=SamVisionConfig(image_size=size), prompt_encoder_config=SamPromptEncoderConfig(image_size=size))
    else:
        cfg, size = tiny_sam_config(), 128
    g = GroundedSAM.random(tiny_grounding_dino_config(), cfg, grounding_dino_processor(128, 192, 64))
    frame = clip(size)[0]
    box = (size * 0.3, size * 0.3, size * 0.7, size * 0.7)
    return size, best_of(lambda: g.segment(frame, box), repeat=2)


def bench_xmem(full: bool):
    from models.xmem import XMem, propagate

    size = 128 if full else 64
    model = XMem() if full else XMem.tiny(0)
    frames = clip(size)
    first = np.zeros((size, size), bool)
    first[size // 4 : size // 2, size // 4 : size // 2] = True
    return size, best_of(lambda: propagate(model, frames, first)) / FRAMES


def bench_depth(full: bool):
    from models.depth import DepthEstimator, hybrid_config

    size = 192 if full else 64  # dpt-hybrid-midas runs at 384; half of that here
    est = DepthEstimator.random(hybrid_config(tiny=not full, image_size=size))
    frames = clip(size)
    return size, best_of(lambda: est(frames, batch_size=FRAMES)) / FRAMES


def bench_vae(full: bool):
    from models.vae import FrameVAE, vae_config

    size = 128 if full else 64
    vae = FrameVAE.random(0, **vae_config(tiny=not full))
    frames = clip(size)
    return size, best_of(lambda: vae.encode(frames, chunk=FRAMES)) / FRAMES


MODELS = {
    "grounding_dino": bench_grounding_dino,
    "sam": bench_sam,
    "xmem": bench_xmem,
    "depth_dpt_hybrid": bench_depth,
    "vae_encoder": bench_vae,
}


def main(argv: list[str]) -> int:
    args = list(argv[1:])
    if "--threads" in args:
        i = args.index("--threads")
        torch.set_num_threads(int(args[i + 1]))
        del args[i : i + 2]
    out = Path(args[0]) if args else REPO / "benchmarks" / "results" / "video.json"
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    base = baseline()
    report = {
        "what": "seconds per frame on CPU (best of repeats); ratio = seconds / the baseline measured just before",
        "baseline": {"op": "conv2d 3x3, 64->64 channels, 1x64x128x128, float32", "seconds": base},
        "frames_per_call": FRAMES,
        "torch_threads": threads,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "models": {},
    }
    for name, fn in MODELS.items():
        report["models"][name] = {}
        for variant, full in (("tiny", False), ("full_size", True)):
            # The machine may be shared: a baseline taken right before each model follows the load.
            local = baseline()
            with torch.inference_mode():
                size, seconds = fn(full)
            report["models"][name][variant] = {
                "resolution": size, "seconds_per_frame": seconds, "baseline_seconds": local, "ratio": seconds / local,
            }
            print(f"{name:18s} {variant:9s} {size:4d}px  {seconds * 1000:9.1f} ms/frame  {seconds / local:9.1f} x baseline",
                  flush=True)
    report["baseline_after"] = baseline()  # drift check over the whole run
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"baseline {base * 1000:.2f} ms (after: {report['baseline_after'] * 1000:.2f} ms) -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))

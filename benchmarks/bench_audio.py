"""Audio stage timings on CPU (issue 3).

1. Embedding one 5 s clip with the real-size ImageBind audio branch (random
   weights: same compute as the real ones), split into preprocessing and the
   encoder forward, against two baselines measured in the same run:
   preprocessing alone and the tiny preset's forward.
2. magnitude + mel_features throughput (clips/s) for 5 s, 44.1 kHz stereo clips.

Usage: python benchmarks/bench_audio.py [out.json] [--threads N] [--repeats R]
Prints a table and writes JSON (default benchmarks/results/audio.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.imagebind_audio import ImageBindAudioEncoder, preprocess  # noqa: E402
from tasks.audio import magnitude, mel_features  # noqa: E402


def _timed(fn, repeats: int, warmup: int = 1) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "runs": repeats}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default="benchmarks/results/audio.json")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--clips", type=int, default=20, help="clips for the magnitude+mel throughput")
    ap.add_argument("--frames", type=int, default=8, help="video frames per clip (N) for magnitude/mel")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    rng = np.random.default_rng(0)
    sr = 44100
    t = np.arange(5 * sr) / sr
    clip = torch.from_numpy(
        np.stack([0.3 * np.sin(2 * np.pi * 440 * t), 0.3 * np.sin(2 * np.pi * 660 * t)])
        + 0.05 * rng.standard_normal((2, t.size))
    ).float()

    t0 = time.perf_counter()
    huge = ImageBindAudioEncoder.huge(seed=0)
    build_s = time.perf_counter() - t0
    tiny = ImageBindAudioEncoder.tiny(seed=0)
    x = preprocess(clip, sr)[None]

    with torch.inference_mode():
        pre = _timed(lambda: preprocess(clip, sr), args.repeats)
        huge_fwd = _timed(lambda: huge(x), args.repeats)
        tiny_fwd = _timed(lambda: tiny(x), args.repeats)
        end_to_end = _timed(lambda: huge(preprocess(clip, sr)[None]), args.repeats)

    clips = [clip * float(g) for g in np.linspace(0.2, 1.0, args.clips)]

    def features():
        for c in clips:
            magnitude(c, sr, args.frames)
            mel_features(c, sr, args.frames)

    feat = _timed(features, max(1, args.repeats // 2))
    mag_only = _timed(lambda: [magnitude(c, sr, args.frames) for c in clips], max(1, args.repeats // 2))

    result = {
        "device": "cpu",
        "torch_threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "embed_5s_clip": {
            "input": "5 s, 44.1 kHz stereo -> (1, 3, 1, 128, 204)",
            "huge_params": sum(p.numel() for p in huge.parameters()),
            "huge_build_random_s": build_s,
            "end_to_end_huge_s": end_to_end,
            "huge_forward_s": huge_fwd,
            "baseline_preprocess_only_s": pre,
            "baseline_tiny_forward_s": tiny_fwd,
            "huge_forward_over_preprocess": huge_fwd["median_s"] / pre["median_s"],
        },
        "magnitude_mel": {
            "input": f"{args.clips} clips of 5 s, 44.1 kHz stereo, N={args.frames} frames, 128 mels",
            "clips_per_s": args.clips / feat["median_s"],
            "magnitude_only_clips_per_s": args.clips / mag_only["median_s"],
            "batch_time_s": feat,
        },
    }
    e = result["embed_5s_clip"]
    ms = lambda r: f"{r['median_s'] * 1e3:9.1f} ms median, {r['min_s'] * 1e3:8.1f} ms best"  # noqa: E731
    print(f"CPU ({os.cpu_count()} cores), {args.threads} torch threads, torch {torch.__version__}, {args.repeats} runs each")
    print(f"embed one 5 s clip, real-size branch ({e['huge_params'] / 1e6:.1f} M params):")
    print(f"  end to end (preprocess + forward)  {ms(end_to_end)}")
    print(f"  forward only                       {ms(huge_fwd)}")
    print(f"  baseline: preprocess only          {ms(pre)}")
    print(f"  baseline: tiny preset forward      {ms(tiny_fwd)}")
    m = result["magnitude_mel"]
    m["best_clips_per_s"] = args.clips / feat["min_s"]
    print(
        f"magnitude + mel, 5 s 44.1 kHz stereo, N={args.frames}: {m['clips_per_s']:.1f} clips/s median, "
        f"{m['best_clips_per_s']:.1f} best (magnitude alone {m['magnitude_only_clips_per_s']:.0f} clips/s)"
    )

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()

"""Forward time and peak memory: inflated 3D U-Net vs the 2D U-Net per frame, same weights.

    .venv/bin/python benchmarks/bench_unet3d.py [OUT_JSON] [--quick] [--threads N] [--device cpu|cuda]

OUT_JSON defaults to benchmarks/results/unet3d.json. Cases: the tiny preset at
16x16 latents and sd21-unclip-h at 32x32 latents (random weights), 2 and 4 frames,
batch 1, float32, no grad. Modes:

* 2d_per_frame: the 2D U-Net called once per frame (the reference of the ratios);
* 2d_folded:    the 2D U-Net once on all frames folded into the batch;
* inflated:     AudioScenicUNet3D, every switch on, full audio condition and a mask.

Time. One process builds the preset, inflates it, and times the three modes
round-robin: the 2D modes call `model.unet`, which outside a 3D forward is the
plain 2D U-Net, so all modes use the very same weight tensors, and interleaving
spreads the noise of a shared machine evenly over the modes. Median and minimum
of the rounds after one warm-up round are reported; ratios use both.

Peak memory. tracemalloc does not see torch's CPU allocations, so each mode is
measured in a fresh subprocess that builds the model and inputs, runs a warm-up
forward, resets the kernel's RSS high-water mark (writes 5 to
/proc/self/clear_refs, Linux >= 4.0) and reports VmHWM - VmRSS across one more
forward: the extra resident memory the forward needs (activations, workspaces),
weights excluded. Without clear_refs it falls back to the ru_maxrss delta, only a
lower bound. On CUDA: torch.cuda.max_memory_allocated minus the memory allocated before.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from peak_memory import peak_mb  # benchmarks/ (the script's folder) is on sys.path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "unet3d.json"
MODES = ("2d_per_frame", "2d_folded", "inflated")




def _setup(spec: dict):
    """Model (inflated; its .unet is the 2D U-Net) and one forward function per mode."""
    import torch

    from models.unet3d import AudioCondition, build_unet2d, inflate

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    dev = torch.device(spec["device"])
    B, Fr, S = 1, spec["frames"], spec["latent"]
    model = inflate(build_unet2d(spec["preset"], seed=0)).to(dev).eval()
    unet = model.unet
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 4, Fr, S, S, generator=g).to(dev)
    ehs = torch.randn(B, 77, unet.config.cross_attention_dim, generator=g).to(dev)
    t = torch.tensor([500], device=dev)
    emb = torch.randn(B, 1024, generator=g).to(dev)
    audio = AudioCondition(
        embedding=emb,
        magnitude=torch.rand(B, Fr, generator=g).to(dev),
        mel=torch.randn(B, Fr, 128, generator=g).to(dev),
    )
    mask = (torch.rand(B, Fr, S * 8, S * 8, generator=g) > 0.5).float().to(dev)
    labels = model.tasi.augment(emb, 0) if unet.class_embedding is not None else None
    xf = x.transpose(1, 2).reshape(B * Fr, 4, S, S)
    lf = None if labels is None else labels.repeat_interleave(Fr, 0)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def run(mode):
        with torch.no_grad():
            if mode == "inflated":
                out = model(x, t, ehs, audio=audio, mask=mask).sample
            elif mode == "2d_folded":
                out = unet(xf, t.expand(B * Fr), ehs.repeat_interleave(Fr, 0), class_labels=lf).sample
            else:
                out = torch.stack([unet(x[:, :, i], t, ehs, class_labels=labels).sample for i in range(Fr)], 2)
        sync()
        return out

    from models.unet3d_io import _is_new_part

    n2d = sum(p.numel() for n, p in model.unet.named_parameters() if not _is_new_part("unet." + n))
    info = {
        "threads": torch.get_num_threads(),
        "params_2d_m": n2d / 1e6,
        "params_inflated_m": sum(p.numel() for p in model.parameters()) / 1e6,
    }
    return run, info


def timing_worker(spec: dict) -> dict:
    run, info = _setup(spec)
    for mode in MODES:  # warm-up round
        run(mode)
    times = {m: [] for m in MODES}
    for _ in range(spec["repeats"]):
        for mode in MODES:
            t0 = time.perf_counter()
            run(mode)
            times[mode].append(time.perf_counter() - t0)
    return {"times_s": times, **info}


def memory_worker(spec: dict) -> dict:

    run, _ = _setup(spec)
    mode = spec["mode"]
    run(mode)  # warm-up: one-time workspaces are not part of the steady state
    mb, method = peak_mb(lambda: run(mode), spec["device"])
    return {"peak_forward_mb": mb, "memory_method": method}


def _subprocess(kind: str, spec: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, f"--{kind}-worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark {kind} worker failed for {spec}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default=str(DEFAULT_OUT))
    ap.add_argument("--quick", action="store_true", help="tiny preset only")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up round")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--timing-worker", help=argparse.SUPPRESS)
    ap.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.timing_worker:
        print(json.dumps(timing_worker(json.loads(args.timing_worker))))
        return 0
    if args.memory_worker:
        print(json.dumps(memory_worker(json.loads(args.memory_worker))))
        return 0

    cases = [("tiny", 16, 2), ("tiny", 16, 4)]
    if not args.quick:
        cases += [("sd21-unclip-h", 32, 2), ("sd21-unclip-h", 32, 4)]
    results = []
    for preset, latent, frames in cases:
        repeats = max(args.repeats, 10) if preset == "tiny" else args.repeats  # tiny: ms-scale, cheap to repeat
        spec = dict(preset=preset, latent=latent, frames=frames, device=args.device, repeats=repeats,
                    threads=args.threads)
        timing = _subprocess("timing", spec)
        row = {"preset": preset, "latent": [latent, latent], "frames": frames, "batch": 1, "dtype": "float32",
               "threads": timing["threads"], "params_2d_m": timing["params_2d_m"],
               "params_inflated_m": timing["params_inflated_m"]}
        for mode in MODES:
            ts = timing["times_s"][mode]
            row[mode] = {"time_s": statistics.median(ts), "time_min_s": min(ts), "times_s": ts,
                         **_subprocess("memory", {**spec, "mode": mode})}
            print(f"{preset:14s} {latent}x{latent} F={frames} {mode:13s} median {row[mode]['time_s']:8.3f} s "
                  f"min {row[mode]['time_min_s']:8.3f} s  peak {row[mode]['peak_forward_mb']:8.1f} MB", flush=True)
        for ref in ("2d_per_frame", "2d_folded"):
            r = row[ref]
            row[f"ratio_inflated_vs_{ref}"] = {
                "time_median": row["inflated"]["time_s"] / r["time_s"],
                "time_min": row["inflated"]["time_min_s"] / r["time_min_s"],
                "peak_memory": row["inflated"]["peak_forward_mb"] / max(r["peak_forward_mb"], 1e-9),
            }
        q = row["ratio_inflated_vs_2d_per_frame"]
        print(f"  inflated / 2d_per_frame: time {q['time_median']:.2f} (min {q['time_min']:.2f}), "
              f"peak memory {q['peak_memory']:.2f}", flush=True)
        results.append(row)

    import torch

    out = {
        "benchmark": "unet3d",
        "device": args.device,
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "loadavg_at_end": os.getloadavg(),
            "torch": torch.__version__,
        },
        "results": results,
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(out, indent=2))
    tmp.replace(path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Long spans in windows: peak memory and time per frame of an edit step vs the span's length.

    .venv/bin/python benchmarks/bench_windows.py [OUT_JSON] [--quick] [--device cpu|cuda]
        [--case PRESET:LATENT:WINDOW:OVERLAP ...] [--frames 16 48 120] [--precision float32|bfloat16]

OUT_JSON defaults to benchmarks/results/windows.json. One editing step is
tasks.edit.edit_latents with a one-step DDIM schedule: the inflated U-Net on
[zero; clip] rows (classifier-free guidance), E_a/M_a/F_a, a SceneMasker mask and a
depth ControlNet per frame, over a span of F frames in windows of WINDOW frames
overlapping by OVERLAP (the span's frame 0 as anchor), random weights. Default cases:
the tiny preset at 16x16 latents (128 px) and sd21-unclip-h at 8x8 latents (64 px),
both with window 8, overlap 2 (the quick config's windows; every span is then several
windows, so each span pays the same overlap and anchor share), at 16, 48 and 120 frames; plus the same step without
windows (the whole span in one call) at the shortest and longest span, the baseline
that shows what windows save.

Each (case, frames) runs in a fresh subprocess: build the models, one warm-up step on
a short span, then the peak memory of one step over the span (benchmarks/peak_memory:
VmHWM - VmRSS after resetting the high-water mark on a CPU, max_memory_allocated on
CUDA; activations and workspaces beyond the resident weights), on a CPU also the peak
of live tensor storage counted op by op (what max_memory_allocated is on CUDA, free of
the C allocator's noise), then the step's time
(the minimum of --repeats runs; wall and, on a CPU, process CPU seconds, which other
jobs sharing the cores disturb far less than wall time). Figures: peak at the longest span / peak at the
shortest (windows: should stay near 1), and time per frame at each span / at the
shortest (flat = linear in the span). Ratios come from one run.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from peak_memory import peak_mb, tensor_peak_mb  # benchmarks/ (the script's folder) is on sys.path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "windows.json"
DEFAULT_CASES = ["tiny:16:8:2", "sd21-unclip-h:8:8:2"]
GUIDANCE = 7.5


def parse_case(text: str) -> dict:
    parts = text.split(":")
    try:
        if len(parts) != 4 or not parts[0]:
            raise ValueError
        latent, window, overlap = (int(p) for p in parts[1:])
        if latent <= 0 or window < 2 or not 0 <= overlap < window:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"case must be PRESET:LATENT:WINDOW:OVERLAP (window >= 2, 0 <= overlap < window), e.g. tiny:8:8:2; "
            f"got '{text}'") from None
    return {"preset": parts[0], "latent": latent, "window": window, "overlap": overlap}


def measure(spec: dict) -> dict:
    """One (case, frames) in this process: peak memory and time of one windowed edit step."""
    import torch

    from bench_diffusion import _controlnet
    from models.ddim import DDIM, tiny_scheduler_config
    from models.unet3d import AudioCondition, preset
    from models.windows import plan_windows
    from tasks import edit

    torch.manual_seed(0)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    dev = torch.device(spec["device"])
    model = preset(spec["preset"], seed=0).to(dev)
    cn = _controlnet(spec["preset"]).to(dev)
    one = DDIM(tiny_scheduler_config(), 1)
    S, window, overlap = spec["latent"], spec["window"], spec["overlap"]
    amp = (torch.autocast(dev.type, dtype=torch.bfloat16) if spec.get("precision") == "bfloat16"
           else contextlib.nullcontext())

    def inputs(frames):
        g = torch.Generator().manual_seed(1)
        return dict(
            z_T=torch.randn(1, 4, frames, S, S, generator=g).to(dev),
            prompt=torch.randn(1, 77, model.unet.config.cross_attention_dim, generator=g).to(dev),
            audio=AudioCondition(embedding=torch.randn(1, 1024, generator=g).to(dev),
                                 magnitude=(torch.rand(1, frames, generator=g) * 2).to(dev),
                                 mel=torch.randn(1, frames, 128, generator=g).to(dev)),
            mask=(torch.rand(1, frames, 8 * S, 8 * S, generator=g) > 0.5).float().to(dev),
            control=torch.rand(1, 3, frames, 8 * S, 8 * S, generator=g).to(dev),
        )

    def step(x, win):
        with torch.no_grad(), amp:
            edit.edit_latents(model, one, x["z_T"], x["prompt"], x["audio"], GUIDANCE, mask=x["mask"], controlnet=cn,
                              control=x["control"], window=win, overlap=overlap if win else 0)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    frames = spec["frames"]
    win = window if spec["windowed"] else None
    step(inputs(min(frames, window + 2)), win)  # warm-up: allocator, kernels, filters
    x = inputs(frames)
    peak, how = peak_mb(lambda: step(x, win), spec["device"])
    tensors = tensor_peak_mb(lambda: step(x, win))[0] if spec["device"] == "cpu" else None
    times, cpu = [], []
    for _ in range(spec["repeats"]):
        t0, c0 = time.perf_counter(), time.process_time()
        step(x, win)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    windows = plan_windows(frames, win, overlap if win else 0, model.config.sparse_causal_attention)
    return {
        "frames": frames, "windowed": spec["windowed"], "peak_mb": round(peak, 1), "peak_how": how,
        "tensor_peak_mb": None if tensors is None else round(tensors, 2),
        "step_s": round(min(times), 4), "s_per_frame": round(min(times) / frames, 5),
        "cpu_s_per_frame": round(min(cpu) / frames, 5),
        "windows": len(windows), "frames_evaluated": sum(w.frames + w.anchored for w in windows),
        "threads": torch.get_num_threads(),
    }


def run_case(case: dict, args) -> dict:
    rows = []
    runs = [(f, True) for f in args.frames] + [(min(args.frames), False), (max(args.frames), False)]
    for frames, windowed in runs:
        spec = {**case, "frames": frames, "windowed": windowed, "device": args.device, "threads": args.threads,
                "precision": args.precision, "repeats": args.repeats if case["preset"] == "tiny" else 1}
        r = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True)
        if r.returncode != 0:
            rows.append({"frames": frames, "windowed": windowed, "error": r.stderr.strip().splitlines()[-1:]})
            print(f"  {case['preset']} {frames} frames windowed={windowed}: FAILED {r.stderr[-500:]}", flush=True)
            continue
        row = json.loads(r.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"  {case['preset']} {frames:4d} frames {'windowed' if windowed else 'whole   '}: "
              f"peak {row['peak_mb']:8.1f} MB (tensors {row['tensor_peak_mb']} MB), "
              f"{row['s_per_frame'] * 1000:8.2f} ms/frame ({row['cpu_s_per_frame'] * 1000:.2f} CPU ms)", flush=True)
    win = {r["frames"]: r for r in rows if r.get("windowed") and "error" not in r}
    whole = {r["frames"]: r for r in rows if not r.get("windowed") and "error" not in r}
    lo, hi = min(args.frames), max(args.frames)
    ratios = {}
    if lo in win and hi in win:
        ratios["peak_longest_over_shortest"] = round(win[hi]["peak_mb"] / max(win[lo]["peak_mb"], 1e-9), 3)
        if win[lo].get("tensor_peak_mb"):
            ratios["tensor_peak_longest_over_shortest"] = round(win[hi]["tensor_peak_mb"] / win[lo]["tensor_peak_mb"], 3)
        ratios["time_per_frame_over_shortest"] = {
            str(f): round(win[f]["s_per_frame"] / win[lo]["s_per_frame"], 3) for f in sorted(win)}
        spread = [win[f]["s_per_frame"] for f in win]
        ratios["time_per_frame_max_over_min"] = round(max(spread) / min(spread), 3)
        if args.device == "cpu":  # CPU seconds: what the step costs, whatever else shares the cores
            cpu = [win[f]["cpu_s_per_frame"] for f in win]
            ratios["cpu_time_per_frame_max_over_min"] = round(max(cpu) / min(cpu), 3)
    if hi in win and hi in whole:
        ratios["peak_whole_over_windowed_at_longest"] = round(whole[hi]["peak_mb"] / max(win[hi]["peak_mb"], 1e-9), 3)
    if lo in whole and hi in whole:
        ratios["peak_whole_longest_over_shortest"] = round(whole[hi]["peak_mb"] / max(whole[lo]["peak_mb"], 1e-9), 3)
    return {"case": case, "rows": rows, "ratios": ratios}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", nargs="?", default=str(DEFAULT_OUT))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--case", action="append", type=parse_case)
    ap.add_argument("--frames", type=int, nargs="+", default=[16, 48, 120])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--precision", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny preset only, 8 and 24 frames")
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return 0
    cases = args.case or [parse_case(c) for c in DEFAULT_CASES]
    if args.quick:
        cases, args.frames = [parse_case("tiny:8:8:2")], [8, 24]
    result = {"machine": {"python": platform.python_version(), "platform": platform.platform(), "device": args.device},
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "precision": args.precision, "cases": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for case in cases:
        print(f"{case['preset']} at {case['latent']}x{case['latent']} latents, window {case['window']}, "
              f"overlap {case['overlap']}", flush=True)
        result["cases"].append(run_case(case, args))
        out.write_text(json.dumps(result, indent=1))  # a run cut short keeps the finished cases
        print(f"  ratios: {json.dumps(result['cases'][-1]['ratios'])}", flush=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

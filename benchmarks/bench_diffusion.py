"""Seconds per denoising step and peak memory: inversion, editing and fine-tuning steps vs a 2D baseline.

    .venv/bin/python benchmarks/bench_diffusion.py [OUT_JSON] [--quick] [--threads N] [--device cpu|cuda]
        [--case PRESET:LATENT:FRAMES ...] [--precision float32|autocast] [--repeats N] [--memory-in-process]

OUT_JSON defaults to benchmarks/results/diffusion.json. Cases: the tiny preset at
8x8 latents x 8 frames (the demo's 64 px) and sd21-unclip-h at 16x16 latents
(128 px) x 2 frames, random weights, float32, one video; `--case` (repeatable)
replaces them, e.g. `--case tiny:8:8 --case sd21-unclip-h:64:8` (LATENT is the
latent side, pixels = 8 x LATENT). Modes, each one step of the code the stages run:

* baseline_2d_cfg: what editing frame by frame with the plain base would cost per
  step: the diffusers 2D U-Net on all frames folded into the batch, doubled for
  classifier-free guidance, plus a depth ControlNet per frame, and diffusers'
  DDIMScheduler.step. The reference of every ratio.
* inversion: one DDIM inversion step (tasks.inversion.invert_latents with a
  one-step schedule): inflated U-Net, zero condition, blank prompt.
* edit: one editing step (tasks.edit.edit_latents, one step): inflated U-Net on
  [zero; clip] rows, E_a/M_a/F_a, SceneMasker mask, depth ControlNet.
* finetune: one training step (tasks.finetune.train): forward, backward through
  the trainable set, gradient clipping, AdamW. Its time is the median gap between
  the step callbacks after the first step (which also allocates AdamW's state).

Time: one process builds the models and times the modes round-robin after a
warm-up round (the noise of a shared machine spreads over all modes); median and
minimum are reported, ratios use both. Peak memory: each mode in a fresh
subprocess, after a warm-up: VmHWM - VmRSS across one more step after resetting
the high-water mark (/proc/self/clear_refs), i.e. what the step needs beyond the
weights already resident; for fine-tuning that includes the gradients and AdamW's
state, which a run holds for all its steps. On CUDA: max_memory_allocated minus
the memory allocated before; there `--memory-in-process` takes that measurement in
the timing process, after the timed rounds, instead of in four fresh processes (the
allocator's counters need no fresh process; it saves four model builds per case).

Precision: weights are float32. `--precision autocast` runs the inference modes
(baseline_2d_cfg, inversion, edit) under torch.autocast(device, bfloat16); it only
applies on CUDA (on a CPU they stay float32, and the JSON says so). Fine-tuning
runs as tasks.finetune.train decides: float32 on a CPU, bfloat16 autocast (float16
with a gradient scaler where bfloat16 is unsupported) with gradient checkpointing
on CUDA, whatever --precision says. Each mode's entry records its "precision".
The JSON is rewritten after each case, so a run cut short keeps the finished cases.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
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
sys.path.insert(0, str(ROOT))
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "diffusion.json"
MODES = ("baseline_2d_cfg", "inversion", "edit", "finetune")
INFERENCE_MODES = ("baseline_2d_cfg", "inversion", "edit")
BASELINE = "baseline_2d_cfg"
GUIDANCE = 7.5
PRECISIONS = ("float32", "autocast")
DEFAULT_CASES = [("tiny", 8, 8), ("sd21-unclip-h", 16, 2)]


def parse_case(text: str) -> tuple[str, int, int]:
    """'PRESET:LATENT:FRAMES' -> (preset, latent side, frames)."""
    parts = text.split(":")
    try:
        if len(parts) != 3 or not parts[0]:
            raise ValueError
        latent, frames = int(parts[1]), int(parts[2])
        if latent <= 0 or frames <= 0:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"case must be PRESET:LATENT:FRAMES with positive integers, e.g. tiny:8:8; got '{text}'") from None
    return parts[0], latent, frames


def inference_precision(device: str, precision: str) -> str:
    """What the inference modes run in: autocast applies on CUDA only."""
    if precision == "autocast" and device.startswith("cuda"):
        return "bfloat16 autocast"
    return "float32"




def _controlnet(preset: str, seed: int = 0):
    """The tiny preset's ControlNet, or an SD 2.1-sized depth ControlNet (no class embedding), random weights."""
    import torch
    from diffusers import ControlNetModel

    from models.unet3d import PRESETS, build_controlnet

    if preset == "tiny":
        return build_controlnet("tiny", seed)
    p = PRESETS[preset]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ControlNetModel(
            in_channels=p["in_channels"], down_block_types=p["down_block_types"],
            block_out_channels=p["block_out_channels"], layers_per_block=p["layers_per_block"],
            cross_attention_dim=p["cross_attention_dim"], attention_head_dim=p["attention_head_dim"],
            use_linear_projection=p["use_linear_projection"], upcast_attention=p.get("upcast_attention", False),
            norm_num_groups=p["norm_num_groups"],
        ).eval()


def _setup(spec: dict):
    """One step function per mode, over one set of models and inputs."""
    import torch
    from diffusers import DDIMScheduler

    from models.ddim import DDIM, tiny_scheduler_config
    from models.unet3d import AudioCondition, controlnet_residuals, preset
    from tasks import edit, finetune, inversion

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    dev = torch.device(spec["device"])
    precision = {m: inference_precision(spec["device"], spec.get("precision", "float32")) for m in INFERENCE_MODES}

    def amp():
        if precision[BASELINE] == "bfloat16 autocast":
            return torch.autocast(dev.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    Fr, S = spec["frames"], spec["latent"]
    model = preset(spec["preset"], seed=0).to(dev)
    unet2d = model.unet  # outside a 3D forward: the plain diffusers 2D U-Net, same weights
    cn = _controlnet(spec["preset"]).to(dev)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 4, Fr, S, S, generator=g).to(dev)
    prompt = torch.randn(1, 77, unet2d.config.cross_attention_dim, generator=g).to(dev)
    audio = AudioCondition(embedding=torch.randn(1, 1024, generator=g).to(dev),
                           magnitude=(torch.rand(1, Fr, generator=g) * 2).to(dev),
                           mel=torch.randn(1, Fr, 128, generator=g).to(dev))
    mask = (torch.rand(1, Fr, 8 * S, 8 * S, generator=g) > 0.5).float().to(dev)
    depth = torch.rand(1, 3, Fr, 8 * S, 8 * S, generator=g).to(dev)
    conf = tiny_scheduler_config()
    one = DDIM(conf, 1)  # a one-step schedule: one call = exactly one step of the stages' loops
    ref = DDIMScheduler.from_config(conf)
    ref.set_timesteps(50)
    t_ref = ref.timesteps[10]
    labels = torch.zeros(2, 2048, device=dev)  # 2D baseline: unCLIP's class slot, its null label

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def baseline():
        with torch.no_grad(), amp():
            x = z[0].transpose(0, 1)  # (F, C, h, w): frames folded
            down, mid = controlnet_residuals(cn, z, t_ref, prompt, depth)
            xx = torch.cat([x, x])
            out = unet2d(xx, t_ref, prompt.expand(2 * Fr, -1, -1), class_labels=labels.repeat_interleave(Fr, 0),
                         down_block_additional_residuals=[torch.cat([r, r]) for r in down],
                         mid_block_additional_residual=torch.cat([mid, mid])).sample
            u, c = out.chunk(2)
            ref.step(u + GUIDANCE * (c - u), t_ref, x)

    def invert():
        with amp():
            inversion.invert_latents(model, one, z, prompt)

    def edit_step():
        with torch.no_grad(), amp():
            edit.edit_latents(model, one, z, prompt, audio, GUIDANCE, mask=mask, controlnet=cn, control=depth)

    step_times: list[float] = []

    def train(n=3):
        marks = [time.perf_counter()]
        res = finetune.train(model, z, audio, prompt, one.alphas_cumprod.to(dev),
                             finetune.TrainSettings(steps=n, checkpoint_every=10**6),
                             callback=lambda s, loss: (sync(), marks.append(time.perf_counter())))
        precision["finetune"] = (f"{res.mixed_precision} autocast + gradient checkpointing"
                                 if res.gradient_checkpointing else res.mixed_precision)
        step_times.extend(b - a for a, b in itertools.pairwise(marks[1:]))  # steps after the first

    fns = {"baseline_2d_cfg": baseline, "inversion": invert, "edit": edit_step, "finetune": train}

    def run(mode):
        fns[mode]()
        sync()

    info = {
        "threads": torch.get_num_threads(),
        "params_unet_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "params_trainable_m": sum(p.numel() for p in model.trainable_parameters()) / 1e6,
        "params_controlnet_m": sum(p.numel() for p in cn.parameters()) / 1e6,
        "precision": precision,  # finetune's entry appears once it has run
    }
    return run, step_times, info


def timing_worker(spec: dict) -> dict:
    run, step_times, info = _setup(spec)
    for mode in MODES:  # warm-up round
        run(mode)
    step_times.clear()
    times = {m: [] for m in MODES if m != "finetune"}
    for _ in range(spec["repeats"]):
        for mode in MODES:
            t0 = time.perf_counter()
            run(mode)
            if mode != "finetune":
                times[mode].append(time.perf_counter() - t0)
    times["finetune"] = list(step_times)
    out = {"times_s": times, **info}
    if spec.get("memory_in_process"):
        # Every mode is warm by now; the allocator's counters make each step's peak exact (CUDA).
        out["memory"] = {}
        for mode in MODES:
            gc.collect()
            m = _measure_peak(run, mode, spec["device"])
            out["memory"][mode] = {**m, "memory_method": m["memory_method"] + " (in the timing process)"}
    return out


def memory_worker(spec: dict) -> dict:
    run, _, _ = _setup(spec)
    mode = spec["mode"]
    run(mode)  # warm-up: one-time workspaces are not part of the steady state
    return _measure_peak(run, mode, spec["device"])


def _measure_peak(run, mode: str, device: str) -> dict:
    """Peak memory of one more step of `mode` (already warmed up) beyond what is resident before it."""
    mb, method = peak_mb(lambda: run(mode), device)
    return {"peak_step_mb": mb, "memory_method": method}


def _write(path: Path, out: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(out, indent=2))
    tmp.replace(path)


def _machine(device: str) -> dict:
    import torch

    m = {"platform": platform.platform(), "cpu_count": os.cpu_count(),
         "loadavg_at_end": os.getloadavg(), "torch": torch.__version__}
    if device.startswith("cuda"):
        m.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    return m


def _subprocess(kind: str, spec: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, f"--{kind}-worker", json.dumps(spec)],
        capture_output=True, text=True, check=False, cwd=ROOT,
        # Keep an inherited PYTHONPATH (e.g. wheels installed with --target) behind the repo.
        env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)},
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
    ap.add_argument("--case", action="append", type=parse_case, metavar="PRESET:LATENT:FRAMES",
                    help="a case to run (repeatable); replaces the default cases (and --quick)")
    ap.add_argument("--precision", choices=PRECISIONS, default="float32",
                    help="inference modes: float32, or bfloat16 autocast (CUDA only; float32 on a CPU)")
    ap.add_argument("--memory-in-process", action="store_true",
                    help="CUDA: measure each mode's peak in the timing process after the timed rounds instead of "
                         "one fresh process per mode (the allocator's counters are exact either way; saves four "
                         "model builds per case)")
    ap.add_argument("--timing-worker", help=argparse.SUPPRESS)
    ap.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.timing_worker:
        print(json.dumps(timing_worker(json.loads(args.timing_worker))))
        return 0
    if args.memory_worker:
        print(json.dumps(memory_worker(json.loads(args.memory_worker))))
        return 0

    if args.memory_in_process and args.device != "cuda":
        ap.error("--memory-in-process needs --device cuda (a CPU's RSS peaks need a fresh process per mode)")
    if args.case:
        from models.unet3d import PRESETS

        unknown = sorted({c[0] for c in args.case} - set(PRESETS))
        if unknown:
            ap.error(f"unknown preset(s) {unknown}; choose from {sorted(PRESETS)}")
        cases = list(args.case)
    else:
        cases = DEFAULT_CASES[:1] if args.quick else list(DEFAULT_CASES)
    path = Path(args.out)
    results = []
    out = {"benchmark": "diffusion", "device": args.device, "baseline": BASELINE, "precision": args.precision}
    for preset_name, latent, frames in cases:
        repeats = max(args.repeats, 10) if preset_name == "tiny" else args.repeats
        spec = {"preset": preset_name, "latent": latent, "frames": frames, "device": args.device,
                "repeats": repeats, "threads": args.threads, "precision": args.precision,
                "memory_in_process": args.memory_in_process}
        timing = _subprocess("timing", spec)
        row = {"preset": preset_name, "latent": [latent, latent], "pixels": [8 * latent, 8 * latent],
               "frames": frames, "batch": 1, "dtype": "float32", "guidance_scale": GUIDANCE,
               **{k: v for k, v in timing.items() if k not in ("times_s", "precision", "memory")}}
        for mode in MODES:
            ts = timing["times_s"][mode]
            mem = timing["memory"][mode] if "memory" in timing else _subprocess("memory", {**spec, "mode": mode})
            row[mode] = {"time_s": statistics.median(ts), "time_min_s": min(ts), "times_s": ts,
                         "precision": timing["precision"][mode], **mem}
        base = row[BASELINE]
        for mode in MODES:
            r = row[mode]
            r["ratio_vs_baseline"] = {
                "time_median": r["time_s"] / base["time_s"], "time_min": r["time_min_s"] / base["time_min_s"],
                "peak_memory": r["peak_step_mb"] / max(base["peak_step_mb"], 1e-9),
            }
            print(f"{preset_name:14s} {latent}x{latent} F={frames} {mode:16s} median {r['time_s']:8.3f} s/step "
                  f"min {r['time_min_s']:8.3f}  peak {r['peak_step_mb']:8.1f} MB  "
                  f"x{r['ratio_vs_baseline']['time_median']:.2f} time, x{r['ratio_vs_baseline']['peak_memory']:.2f} mem",
                  flush=True)
        results.append(row)
        _write(path, {**out, "machine": _machine(args.device), "results": results})  # what is done so far

    _write(path, {**out, "machine": _machine(args.device), "results": results})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

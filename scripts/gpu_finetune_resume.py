"""Fine-tuning resume check on a GPU: a killed and resumed run against an uninterrupted one.

    python3 scripts/gpu_finetune_resume.py [OUT_JSON] [--device cuda] [--steps 40] [--stop 17]
        [--checkpoint-every 5] [--sd21-steps 20] [--sd21-stop 7] [--sd21-latent 32] [--sd21-frames 4]
        [--skip-sd21]

For each case (the tiny preset at 8x8 latents x 4 frames, as the tests; then
sd21-unclip-h at 32x32 latents x 4 frames): random weights, random latents, prompt
and audio condition (seeded), tasks.finetune.train with the stage's settings
(TrainSettings defaults: AdamW at 3e-5, 10% condition dropout; on CUDA bfloat16
autocast + gradient checkpointing, as train decides):

* uninterrupted: `steps` steps from the initial trainable weights, no checkpoint;
* again, uninterrupted: the run-to-run difference the kernels alone give (on a GPU
  some backward kernels accumulate with atomics, so two identical runs may differ
  in the last bits; this is the floor the resume can be judged against);
* killed: from the same initial weights and RNG state, a checkpoint every
  `checkpoint_every` steps, the step callback raises after step `stop`;
* resumed: trainable weights reset to the initial ones (as a fresh process would
  have them), the global RNG reseeded differently, train() again with the same
  checkpoint and run key: it must pick up at the last checkpoint and end where the
  uninterrupted run ended.

Reported per case (stdout and OUT_JSON, default $OUT/finetune-resume-cuda.json):
max |w_resumed - w_uninterrupted| over the trainable weights, the same for the two
uninterrupted runs, how far the weights moved from their start, the losses of the
first and last 5 steps of both runs, the precision TrainResult reports, whether the
loss went down (first 5 vs last 5 steps, and the mean loss over 8 fixed (t, noise)
draws before and after: finetune.evaluation_loss), seconds per step and, on CUDA,
peak memory (torch.cuda.max_memory_allocated over the uninterrupted run).

Exit status 1 when a case fails, its resumed weights differ from the uninterrupted
run's by more than TOLERANCE (1e-3), it did not resume from its last checkpoint, or
a loss after the resume point differs from the uninterrupted run's by more than
LOSS_RTOL (5%, relative).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Tolerance on max |w_resumed - w_uninterrupted| over the trainable weights: 1e-3.
# bfloat16 autocast on CUDA is deterministic given the same kernels and inputs, and a
# correct resume restores weights, AdamW state, the draw generator and the RNGs; what
# may remain is the last-bit noise of backward kernels that accumulate with atomics,
# which AdamW can turn into up to ~lr (3e-5) per step per weight. But at lr 3e-5 the
# weights only move ~1e-3 in 40 steps (reported: max_abs_movement_from_init), so the
# weight check alone would not catch a resume that redraws other t / noise; the
# losses after the resume point do: each one must match the uninterrupted run's
# within LOSS_RTOL (a different t changes the v-prediction loss by far more; kernel
# noise by ~1e-3 at most).
TOLERANCE = 1e-3
LOSS_RTOL = 0.05


class Killed(RuntimeError):
    pass


def _inputs(preset_name: str, latent: int, frames: int, dev, seed: int = 1):
    import torch

    from models.unet3d import PRESETS, AudioCondition

    g = torch.Generator().manual_seed(seed)
    cross = PRESETS[preset_name]["cross_attention_dim"]
    z0 = torch.randn(1, 4, frames, latent, latent, generator=g).to(dev)
    prompt = torch.randn(1, 77, cross, generator=g).to(dev)
    audio = AudioCondition(embedding=torch.randn(1, 1024, generator=g).to(dev),
                           magnitude=(torch.rand(1, frames, generator=g) * 2).to(dev),
                           mel=torch.randn(1, frames, 128, generator=g).to(dev))
    return z0, prompt, audio


def run_case(preset_name: str, latent: int, frames: int, steps: int, stop: int, every: int, dev) -> dict:
    import torch

    from models.ddim import DDIM, tiny_scheduler_config
    from models.unet3d import preset
    from tasks import finetune

    if not 0 < stop < steps:
        raise ValueError(f"need 0 < stop < steps, got stop={stop}, steps={steps}")
    cuda = dev.type == "cuda"
    t0 = time.perf_counter()
    model = preset(preset_name, seed=0).to(dev)
    build_s = time.perf_counter() - t0
    names = model.trainable_parameter_names()
    own = dict(model.named_parameters())
    init = {n: own[n].detach().clone() for n in names}
    z0, prompt, audio = _inputs(preset_name, latent, frames, dev)
    alphas = DDIM(tiny_scheduler_config(), 1).alphas_cumprod.to(dev)
    settings = finetune.TrainSettings(steps=steps, checkpoint_every=every)

    def reset():
        with torch.no_grad():
            for n in names:
                own[n].copy_(init[n])

    def weights():
        return {n: own[n].detach().float().cpu().clone() for n in names}

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def max_diff(a, b):
        return max(float((a[n] - b[n]).abs().max()) for n in names)

    def evaluation():
        return finetune.evaluation_loss(model, z0, audio, prompt, alphas, settings.prediction_type, seed=settings.seed + 1)

    # -- uninterrupted (timed; peak memory on CUDA)
    reset()
    eval_before = evaluation()
    torch.manual_seed(1234)
    marks = []
    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated()
    ref = finetune.train(model, z0, audio, prompt, alphas, settings,
                         callback=lambda s, loss: (sync(), marks.append(time.perf_counter())))
    peak = torch.cuda.max_memory_allocated() if cuda else None
    w_ref = weights()
    eval_after = evaluation()
    gaps = [b - a for a, b in itertools.pairwise(marks)]  # steps after the first

    # -- uninterrupted again: the kernels' run-to-run floor
    reset()
    torch.manual_seed(1234)
    ref2 = finetune.train(model, z0, audio, prompt, alphas, settings)
    w_ref2 = weights()

    with tempfile.TemporaryDirectory(prefix="ft-resume-") as tmp:
        ckpt = Path(tmp) / "run.checkpoint.pt"

        # -- killed after step `stop`
        reset()
        torch.manual_seed(1234)

        def kill(step, loss):
            if step == stop:
                raise Killed(f"simulated kill after step {stop}")

        killed_losses = []
        try:
            finetune.train(model, z0, audio, prompt, alphas, settings, checkpoint=ckpt, run_key="resume-check",
                           callback=lambda s, loss: (killed_losses.append(loss), kill(s, loss)))
            raise AssertionError("the killed run was not stopped")
        except Killed:
            pass
        ckpt_step = int(torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["step"])

        # -- resumed: fresh trainable weights and a different global RNG state; the checkpoint restores both
        reset()
        torch.manual_seed(999)
        res = finetune.train(model, z0, audio, prompt, alphas, settings, checkpoint=ckpt, run_key="resume-check")
        ckpt_bytes = ckpt.stat().st_size
    w_res = weights()

    diff = max_diff(w_res, w_ref)
    after = range(res.resumed_from, steps)
    loss_diff = max(abs(res.losses[i] - ref.losses[i]) for i in after)
    loss_rel = max(abs(res.losses[i] - ref.losses[i]) / max(abs(ref.losses[i]), 1e-12) for i in after)
    first, last = statistics.mean(ref.losses[:5]), statistics.mean(ref.losses[-5:])
    precision = (f"{ref.mixed_precision} autocast + gradient checkpointing" if ref.gradient_checkpointing
                 else ref.mixed_precision)
    out = {
        "preset": preset_name, "latent": [latent, latent], "frames": frames, "steps": steps, "stop_after": stop,
        "checkpoint_every": every, "checkpoint_step": ckpt_step, "resumed_from": res.resumed_from,
        "checkpoint_mb": ckpt_bytes / 2**20,
        "precision": precision,
        "train_result": {"mixed_precision": ref.mixed_precision, "gradient_checkpointing": ref.gradient_checkpointing,
                         "resumed_mixed_precision": res.mixed_precision},
        "trainable_params_m": sum(init[n].numel() for n in names) / 1e6,
        "max_abs_diff_resumed_vs_uninterrupted": diff,
        "max_abs_diff_two_uninterrupted_runs": max_diff(w_ref2, w_ref),
        "max_abs_movement_from_init": max(float((w_ref[n] - init[n].float().cpu()).abs().max()) for n in names),
        "loss_max_abs_diff_after_resume": loss_diff, "loss_max_rel_diff_after_resume": loss_rel,
        "loss_max_abs_diff_two_uninterrupted_runs": max(abs(a - b) for a, b in zip(ref.losses, ref2.losses)),
        "losses": {
            "uninterrupted": {"first5": ref.losses[:5], "last5": ref.losses[-5:]},
            "killed_and_resumed": {"first5": res.losses[:5], "last5": res.losses[-5:]},
            "killed_run_before_kill_last": killed_losses[-2:],
        },
        "loss_went_down": {"first5_mean": first, "last5_mean": last, "by_first_last_5": last < first,
                           "eval_before": eval_before, "eval_after": eval_after, "by_eval": eval_after < eval_before},
        "seconds_per_step_median": statistics.median(gaps) if gaps else None,
        "seconds_uninterrupted": ref.seconds, "seconds_build": build_s,
        "tolerance": TOLERANCE, "loss_rtol": LOSS_RTOL,
        "ok": diff <= TOLERANCE and res.resumed_from == ckpt_step and loss_rel <= LOSS_RTOL,
    }
    if cuda:
        out.update(peak_cuda_memory_mb=peak / 2**20, peak_minus_resident_mb=(peak - resident) / 2**20)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = Path(os.environ.get("OUT") or "/tmp/out") / "finetune-resume-cuda.json"
    ap.add_argument("out", nargs="?", default=str(default_out))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--stop", type=int, default=17)
    ap.add_argument("--checkpoint-every", type=int, default=5)
    ap.add_argument("--tiny-latent", type=int, default=8)
    ap.add_argument("--tiny-frames", type=int, default=4)
    ap.add_argument("--sd21-steps", type=int, default=20)
    ap.add_argument("--sd21-stop", type=int, default=7)
    ap.add_argument("--sd21-latent", type=int, default=32)
    ap.add_argument("--sd21-frames", type=int, default=4)
    ap.add_argument("--skip-sd21", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    cases = [("tiny", args.tiny_latent, args.tiny_frames, args.steps, args.stop)]
    if not args.skip_sd21:
        cases.append(("sd21-unclip-h", args.sd21_latent, args.sd21_frames, args.sd21_steps, args.sd21_stop))
    report = {"check": "finetune resume", "device": args.device, "torch": torch.__version__, "cases": []}
    if dev.type == "cuda":
        report.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    ok = True
    for name, latent, frames, steps, stop in cases:
        t0 = time.perf_counter()
        try:
            r = run_case(name, latent, frames, steps, stop, args.checkpoint_every, dev)
        except Exception as e:  # noqa: BLE001 - one case failing must not hide the other's result
            traceback.print_exc()
            r = {"preset": name, "latent": [latent, latent], "frames": frames, "steps": steps, "ok": False,
                 "error": f"{type(e).__name__}: {e}"}
        r["seconds_case"] = time.perf_counter() - t0
        if dev.type == "cuda":
            torch.cuda.empty_cache()  # the case's model is gone: give its blocks back before the next one
        ok &= bool(r["ok"])
        report["cases"].append(r)
        report["ok"] = ok
        path.write_text(json.dumps(report, indent=2))
        if "error" in r:
            print(f"{name}: FAILED {r['error']}", flush=True)
            continue
        mem = f", peak {r['peak_cuda_memory_mb']:.0f} MB" if "peak_cuda_memory_mb" in r else ""
        print(f"{name} {latent}x{latent} F={frames}: {r['precision']}; killed after {stop}, resumed from "
              f"{r['resumed_from']} to {steps}: max|dw| resumed vs uninterrupted {r['max_abs_diff_resumed_vs_uninterrupted']:.3g} "
              f"(two uninterrupted runs {r['max_abs_diff_two_uninterrupted_runs']:.3g}, moved {r['max_abs_movement_from_init']:.3g}; "
              f"tolerance {TOLERANCE:g}) -> {'ok' if r['ok'] else 'FAIL'}", flush=True)
        print(f"  losses uninterrupted first5 {[round(x, 5) for x in r['losses']['uninterrupted']['first5']]} "
              f"last5 {[round(x, 5) for x in r['losses']['uninterrupted']['last5']]}", flush=True)
        print(f"  losses resumed       first5 {[round(x, 5) for x in r['losses']['killed_and_resumed']['first5']]} "
              f"last5 {[round(x, 5) for x in r['losses']['killed_and_resumed']['last5']]}; max |dloss| after resume "
              f"{r['loss_max_abs_diff_after_resume']:.3g}", flush=True)
        d = r["loss_went_down"]
        print(f"  loss went down: first5 {d['first5_mean']:.5f} -> last5 {d['last5_mean']:.5f} ({d['by_first_last_5']}); "
              f"eval {d['eval_before']:.5f} -> {d['eval_after']:.5f} ({d['by_eval']}); "
              f"{r['seconds_per_step_median']:.4f} s/step{mem}", flush=True)
    print(f"wrote {path}; {'ok' if ok else 'FAILED'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

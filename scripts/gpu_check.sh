#!/usr/bin/env bash
# GPU checks of the diffusion stages, in one call on a lent CUDA machine (H100/H200).
#
#   bash scripts/gpu_check.sh        # from the repo root; carry .whl (the wheels the machine lacks)
#
# 1. installs .whl/*.whl into /tmp/site (PYTHONPATH=/tmp/site:$PWD); if the stages'
#    modules still fail to import, retries with .whl/fallback/*.whl (a newer
#    typing_extensions, which pydantic/prefect may want), then stops if they still fail;
# 2. prints nvidia-smi -L and the python / torch / CUDA versions;
# 3. runs, each under its own time limit and each whether or not the others failed:
#    a. benchmarks/bench_diffusion.py on cuda, cases tiny:8:8, sd21-unclip-h:64:8 and
#       sd21-unclip-h:96:8, float32 -> $OUT/diffusion-cuda.json, then the same with
#       --precision autocast (bfloat16) -> $OUT/diffusion-cuda-autocast.json;
#    b. scripts/gpu_finetune_resume.py: killed-and-resumed fine-tuning vs an
#       uninterrupted run (tiny 40 steps, killed after 17; sd21-unclip-h 32x32 x 4
#       frames 20 steps, killed after 7) -> $OUT/finetune-resume-cuda.json.
#    c. benchmarks/bench_windows.py on cuda: sd21-unclip-h at 768 px (96x96 latents), window 16,
#       overlap 4, bfloat16, spans of 16, 48 and 120 frames -> $OUT/windows-cuda.json
#       (GPU_CHECK_WINDOWS=0 skips it; WINDOWS_LIMIT_S, default 420).
#    The whole output also goes to $OUT/gpu-check.log. Exit status 1 if any step failed.
#
# Time: about 4 to 5 minutes on an H100 (the model builds on the CPU dominate); the step
# limits add up to 8.5 minutes at most. The benchmarks pass --memory-in-process: on
# CUDA each mode's peak memory is measured in the timing process after its timed
# rounds (the allocator's counters are exact there) instead of in four fresh processes
# that each rebuild the 1.1B + 0.36B-parameter models, which would add ~4 minutes.
# BENCH_FRESH_MEMORY=1 restores the fresh processes (then raise BENCH_LIMIT_S).
#
# Environment: OUT (default /tmp/out); PY (default python3); BENCH_REPEATS (default 5);
# BENCH_LIMIT_S (default 180, per benchmark run); RESUME_LIMIT_S (default 150);
# GPU_CHECK_CPU_SMOKE=1 runs the same plumbing on a CPU with tiny sizes (to test
# this script without a GPU).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-/tmp/out}"
PY="${PY:-python3}"
SITE=/tmp/site
REPEATS="${BENCH_REPEATS:-5}"
BENCH_LIMIT_S="${BENCH_LIMIT_S:-180}"
RESUME_LIMIT_S="${RESUME_LIMIT_S:-150}"
SMOKE="${GPU_CHECK_CPU_SMOKE:-0}"
BENCH_FRESH_MEMORY="${BENCH_FRESH_MEMORY:-0}"
WINDOWS="${GPU_CHECK_WINDOWS:-1}"
WINDOWS_LIMIT_S="${WINDOWS_LIMIT_S:-420}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

IMPORTS="import tasks.edit, tasks.finetune, tasks.inversion, models.unet3d, models.ddim, prefect, diffusers, zarr, pydantic"

failed=()

step() {  # step NAME LIMIT_S CMD...: run CMD under `timeout` (which kills its whole process group)
    local name=$1 limit=$2 start rc
    shift 2
    echo
    echo "=== $name (limit ${limit} s): $*"
    start=$(date +%s)
    if timeout --kill-after=15 "$limit" "$@"; then
        echo "=== $name: ok in $(( $(date +%s) - start )) s"
    else
        rc=$?
        [ "$rc" -eq 124 ] && echo "=== $name: TIMED OUT after ${limit} s" || echo "=== $name: FAILED (exit $rc)"
        failed+=("$name")
    fi
}

main() {
    echo "=== install .whl -> $SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
    export PYTHONPATH="$SITE:$PWD"

    echo "=== machine"
    nvidia-smi -L || echo "(no nvidia-smi)"
    "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| available', torch.cuda.is_available(), '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"

    if ! "$PY" -c "$IMPORTS"; then
        echo "=== imports failed: retrying with .whl/fallback"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/fallback/*.whl
        "$PY" -c "$IMPORTS" || { echo "=== imports still fail; stopping"; return 1; }
    fi
    "$PY" -c "from importlib.metadata import version as v; print(' | '.join(f'{d} {v(d)}' for d in ('prefect', 'diffusers', 'zarr', 'pydantic', 'transformers', 'huggingface_hub', 'typing_extensions', 'anyio')))" || true

    local device=cuda
    local mem=(--memory-in-process)
    local cases=(--case tiny:8:8 --case sd21-unclip-h:64:8 --case sd21-unclip-h:96:8)
    local resume=()
    if [ "$BENCH_FRESH_MEMORY" = 1 ]; then mem=(); fi
    if [ "$SMOKE" = 1 ]; then  # CPU, tiny sizes: tests the plumbing only
        device=cpu
        mem=()
        cases=(--case tiny:4:2)
        REPEATS=1
        resume=(--steps 6 --stop 3 --checkpoint-every 2 --skip-sd21 --threads 1)
    fi

    step "bench float32" "$BENCH_LIMIT_S" "$PY" benchmarks/bench_diffusion.py "$OUT/diffusion-$device.json" \
        --device "$device" "${cases[@]}" --repeats "$REPEATS" "${mem[@]}"
    step "bench autocast" "$BENCH_LIMIT_S" "$PY" benchmarks/bench_diffusion.py "$OUT/diffusion-$device-autocast.json" \
        --device "$device" "${cases[@]}" --repeats "$REPEATS" --precision autocast "${mem[@]}"
    step "finetune resume" "$RESUME_LIMIT_S" "$PY" scripts/gpu_finetune_resume.py "$OUT/finetune-resume-$device.json" \
        --device "$device" "${resume[@]}"
    # Long spans in windows at 768 px (issue 13): peak memory and time per frame at 16, 48 and 120 frames.
    if [ "$WINDOWS" = 1 ]; then
        local win=(--case sd21-unclip-h:96:16:4 --frames 16 48 120 --precision bfloat16 --repeats 1)
        if [ "$SMOKE" = 1 ]; then win=(--case tiny:4:4:1 --frames 8 12 --repeats 1 --threads 1); fi
        step "bench windows" "$WINDOWS_LIMIT_S" "$PY" benchmarks/bench_windows.py "$OUT/windows-$device.json" \
            --device "$device" "${win[@]}"
    fi

    echo
    echo "=== files in $OUT:"
    ls -l "$OUT"
    if [ "${#failed[@]}" -gt 0 ]; then
        echo "=== FAILED: ${failed[*]}"
        return 1
    fi
    echo "=== all steps ok"
}

main 2>&1 | tee "$OUT/gpu-check.log"  # pipefail: the script's status is main's

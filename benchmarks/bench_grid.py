"""Grid-level figures, each a ratio against a baseline measured in the same run.

- no-op rerun vs cold run of the demo-sized grid (sample data, tiny presets);
- rerun after one clip's bytes changed vs cold run (the last clip: not the one the
  videos are fine-tuned with, so its features, edits and metrics are what is redone);
- orchestration overhead per computed item: the cold run's wall time minus the
  stage work recorded in the ledger (sum of per-item durations), per item,
  against the mean per-item stage work.
All runs go through the CLI (`audioscenic run`) against one Prefect server on
loopback, so server start-up is not counted in any of them.

Usage: python benchmarks/bench_grid.py [out.json] [--videos 2 --clips 4]
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scripts.prefect_server import BIN, start_server, stop_server  # noqa: E402
from storage import Ledger  # noqa: E402
from tasks.config import QUICK_STAGES  # noqa: E402


def run(config: Path, env: dict) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([str(BIN / "audioscenic"), "run", str(config)], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"run failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return wall


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?", default=str(REPO / "benchmarks" / "results" / "grid.json"))
    ap.add_argument("--videos", type=int, default=2)
    ap.add_argument("--clips", type=int, default=4)
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="audioscenic-bench-grid-"))
    server, env = start_server(root / "prefect-home")
    try:
        data = root / "data"
        subprocess.run([str(BIN / "audioscenic"), "sample-data", str(data), "--videos", str(args.videos),
                        "--clips", str(args.clips), "--frames", "8"], check=True, env=env, stdout=subprocess.DEVNULL)
        config = root / "config.yaml"
        config.write_text(yaml.safe_dump({
            "workdir": str(root / "work"),
            "catalogs": {"videos": [{"kind": "davis", "root": str(data / "davis")}],
                         "audio": [{"kind": "esc50", "root": str(data / "esc50")}]},
            "models": {"preset": "tiny"}, "stages": copy.deepcopy(QUICK_STAGES),
        }))
        cold = run(config, env)
        ledger = Ledger(root / "work" / "ledger")
        rows = ledger.read(status="done")
        work = [r for r in rows.to_pylist() if r["stage"] != "catalog"]
        stage_work_s = sum(r["duration_s"] or 0.0 for r in work)
        noop = run(config, env)
        assert ledger.read(status="done").num_rows == rows.num_rows, "no-op rerun recorded new work"
        clip = sorted((data / "esc50" / "audio").glob("*.wav"))[-1]  # the first clip fine-tunes the videos
        raw = bytearray(clip.read_bytes())
        raw[-10] ^= 1
        clip.write_bytes(bytes(raw))
        n_before = ledger.read(status="done").num_rows
        changed = run(config, env)
        redone = sorted(f"{r['stage']}:{r['item_id']}" for r in ledger.read(status="done").sort_by("finished_at").to_pylist()[n_before:]
                        if r["stage"] != "catalog")
    finally:
        stop_server(server)
        shutil.rmtree(root, ignore_errors=True)
    per_item_work = stage_work_s / max(len(work), 1)
    overhead = (cold - stage_work_s) / max(len(work), 1)
    result = {
        "grid": f"{args.videos} videos x {args.clips} clips (tiny presets, 64 px, 8 frames)",
        "items_computed_cold": len(work),
        "cold_run_s": round(cold, 2),
        "noop_rerun_s": round(noop, 2),
        "noop_vs_cold": round(noop / cold, 3),
        "one_changed_clip_rerun_s": round(changed, 2),
        "one_changed_clip_vs_cold": round(changed / cold, 3),
        "recomputed_after_one_clip_changed": redone,
        "stage_work_per_item_s": round(per_item_work, 3),
        "orchestration_overhead_per_item_s": round(overhead, 3),
        "overhead_vs_work_per_item": round(overhead / per_item_work, 2) if per_item_work else None,
    }
    print(json.dumps(result, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()

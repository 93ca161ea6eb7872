"""Issue 16 figures: instant no-op runs and status, hash once.

Part 1, the demo (as a user runs it; no persistent Prefect server, so a run with work
starts a temporary one): `audioscenic demo --workdir W` cold, then in the same run of
this script: a no-op `audioscenic run W/demo.yaml`, `audioscenic status W/demo.yaml
--json` (with and without --no-rescan) and the demo again (a second `make demo`). Ratios
against the cold demo; which heavy modules the no-op run and status imported.

Part 2, a synthetic full-size catalog: 90 DAVIS-layout videos of 70 JPEG frames (854x480)
and 2000 ESC-50-layout WAVs (5 s, 44.1 kHz, 16-bit), all older than the racy window (as
a downloaded data set is). The catalog scan is timed cold (no state file, no earlier
catalog: every file read and probed), hash-only cold (no state file, earlier catalog
there: every file read, probes reused) and warm (one stat per file). Then a ledger with
every planned item done (every stage, every edit of the config's grid) and `status
--json` through the CLI, warm, and with the hash state removed (cold hashing).

Usage: python benchmarks/bench_incremental.py [out.json] [--skip-demo] [--skip-catalog]
       [--videos 90 --frames 70 --clips 2000 --per-class 1]
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

HEAVY = ("torch", "diffusers", "transformers", "torchaudio", "prefect", "zarr")
DAY_NS = 86400 * 10**9


def env_for(root: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PYTHONPATH=str(REPO), PREFECT_HOME=str(root / "prefect-home"), DO_NOT_TRACK="1",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOGGING_LEVEL="WARNING",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="300")  # shared, loaded cores start it slowly
    return env


def cli(args: list[str], env: dict) -> tuple[float, str]:
    """`audioscenic ARGS` from this checkout -> (wall seconds, stdout)."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{args} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return wall, r.stdout


def imported(args: list[str], env: dict) -> list[str]:
    code = (f"import sys\nfrom flows.cli import main\nrc = main({args!r})\n"
            f"print('@@' + ','.join(m for m in {HEAVY!r} if m in sys.modules))\nsys.exit(rc)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{args} failed:\n{r.stderr[-3000:]}")
    return [m for m in r.stdout.rpartition("@@")[2].strip().split(",") if m]


def demo_figures(root: Path) -> dict:
    env = env_for(root)
    work = root / "demo"
    cold, _ = cli(["demo", "--workdir", str(work)], env)
    config = str(work / "demo.yaml")
    noop, out = cli(["run", config], env)
    stage_lines = [line for line in out.splitlines() if " computed, " in line]
    assert stage_lines and all(": 0 computed, " in line for line in stage_lines), out
    status, out = cli(["status", config, "--json"], env)
    report = json.loads(out)
    assert all(s["stale"] == s["missing"] == s["failed"] == 0 for s in report["stages"].values()), report
    status_norescan, _ = cli(["status", config, "--json", "--no-rescan"], env)
    again, _ = cli(["demo", "--workdir", str(work)], env)
    return {
        "demo_cold_s": round(cold, 2),
        "noop_run_s": round(noop, 2),
        "status_s": round(status, 2),
        "status_no_rescan_s": round(status_norescan, 2),
        "demo_second_run_s": round(again, 2),
        "noop_run_vs_demo": round(noop / cold, 3),
        "demo_second_vs_first": round(again / cold, 3),
        "heavy_modules_imported_by_noop_run": imported(["run", config], env),
        "heavy_modules_imported_by_status": imported(["status", config, "--json"], env),
    }


# ----------------------------------------------------------------------------- synthetic full-size catalog


def write_catalog_data(root: Path, videos: int, frames: int, clips: int) -> int:
    from PIL import Image

    rng = np.random.default_rng(0)
    total = 0
    for v in range(videos):
        seq = root / "davis" / "JPEGImages" / "480p" / f"seq{v:03d}"
        seq.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 255, (60, 107, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((854, 480), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=92)
        jpeg = buf.getvalue()
        for f in range(frames):
            data = jpeg + f"frame {v} {f}".encode()  # distinct bytes per frame; still a valid JPEG
            (seq / f"{f:05d}.jpg").write_bytes(data)
            total += len(data)
    audio = root / "esc50" / "audio"
    audio.mkdir(parents=True, exist_ok=True)
    (root / "esc50" / "meta").mkdir(parents=True, exist_ok=True)
    rate, seconds = 44100, 5
    n = rate * seconds
    header = (b"RIFF" + (36 + 2 * n).to_bytes(4, "little") + b"WAVEfmt " + (16).to_bytes(4, "little")
              + (1).to_bytes(2, "little") + (1).to_bytes(2, "little") + rate.to_bytes(4, "little")
              + (2 * rate).to_bytes(4, "little") + (2).to_bytes(2, "little") + (16).to_bytes(2, "little")
              + b"data" + (2 * n).to_bytes(4, "little"))
    rows = []
    for c in range(clips):
        name = f"{1 + c % 5}-{100000 + c}-A-{c % 50}.wav"
        pcm = (rng.standard_normal(n) * 3000).astype("<i2").tobytes()
        (audio / name).write_bytes(header + pcm)
        total += len(header) + len(pcm)
        rows.append([name, 1 + c % 5, c % 50, f"class_{c % 50:02d}", "False", f"{100000 + c}", "A"])
    with open(root / "esc50" / "meta" / "esc50.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "fold", "target", "category", "esc10", "src_file", "take"])
        w.writerows(rows)
    old = time.time_ns() - DAY_NS  # a data set downloaded yesterday
    for p in root.rglob("*"):
        if p.is_file():
            os.utime(p, ns=(old, old))
    return total


def catalog_figures(root: Path, videos: int, frames: int, clips: int, per_class: int) -> dict:
    from flows.plancache import stage_keys
    from flows.preflight import keys_digest, write_report_stamp
    from flows.stages import stage_modules
    from storage import Ledger, state
    from tasks.catalog import read_catalog, scan_catalog, update_catalog
    from tasks.config import QUICK_STAGES, load_config

    data = root / "data"
    t0 = time.perf_counter()
    nbytes = write_catalog_data(data, videos, frames, clips)
    gen_s = time.perf_counter() - t0
    config = root / "full.yaml"
    config.write_text(yaml.safe_dump({
        "workdir": str(root / "work"),
        "catalogs": {"videos": [{"kind": "davis", "root": str(data / "davis")}],
                     "audio": [{"kind": "esc50", "root": str(data / "esc50")}]},
        "models": {"preset": "tiny"}, "stages": QUICK_STAGES,
        "grid": {"selection": "bench", "subsets": {"bench": {"per_class": per_class}}},
    }))
    cfg = load_config(config)
    state_file = state.state_path(cfg.workdir)

    def scan(fresh_state: bool, previous: bool) -> tuple[float, dict]:
        if fresh_state:
            state_file.unlink(missing_ok=True)
        state.forget_states()
        if not previous:
            cfg.catalog_path.unlink(missing_ok=True)
        t = time.perf_counter()
        cat = scan_catalog(cfg)
        took = time.perf_counter() - t
        return took, dict(state.open_state(cfg.workdir).stats, entries=len(cat.entries))

    update_catalog(cfg)  # so that a catalog file exists for the hash-only scan
    cold_full, cold_stats = scan(fresh_state=True, previous=False)
    update_catalog(cfg)
    cold_hash, _ = scan(fresh_state=True, previous=True)
    warm, warm_stats = scan(fresh_state=False, previous=True)
    warm2, _ = scan(fresh_state=False, previous=True)
    warm = min(warm, warm2)

    # Every planned item of every stage recorded done (what a finished run leaves), then status through the CLI.
    catalog = read_catalog(cfg.catalog_path)
    st = state.open_state(cfg.workdir)
    t = time.perf_counter()
    with state.using(st):
        keys = stage_keys(cfg, catalog, stage_modules())
    st.save()
    plan_cold_s = time.perf_counter() - t
    ledger = Ledger(cfg.ledger_url)
    items = 0
    for stage, table in keys.stages.items():
        rows = [dict(stage=stage, item_id=i, key=k) for i, k in zip(table["item_id"].to_pylist(), table["key"].to_pylist())]
        items += len(rows)
        ledger.append(rows)
    ledger.compact()
    index = cfg.workdir / "report" / "index.html"
    index.parent.mkdir(parents=True, exist_ok=True)
    index.write_text("<html></html>")
    m = keys.stages["metrics"]
    write_report_stamp(cfg, catalog, keys_digest(m["item_id"].to_pylist(), m["key"].to_pylist()), {"report": str(index)})

    env = env_for(root)
    status_runs = [cli(["status", str(config), "--json"], env)[0] for _ in range(3)]
    report = json.loads(cli(["status", str(config), "--json"], env)[1])
    assert all(s["stale"] == s["missing"] == s["failed"] == 0 for s in report["stages"].values())
    noop_runs = [cli(["run", str(config)], env)[0] for _ in range(2)]
    state_file.unlink()
    status_cold_hash, _ = cli(["status", str(config), "--json"], env)
    return {
        "catalog": f"{videos} DAVIS-layout videos x {frames} JPEGs (854x480) + {clips} ESC-50-layout WAVs (5 s)",
        "files": cold_stats["hashed"], "bytes": nbytes, "generate_s": round(gen_s, 1),
        "grid": f"per_class {per_class}: {len(keys.stages['edit'])} edits; {items} planned items, all done",
        "scan_cold_s": round(cold_full, 2),
        "scan_cold_hash_only_s": round(cold_hash, 2),
        "scan_warm_s": round(warm, 3),
        "hashing_cold_vs_warm": round(cold_hash / warm, 1),
        "scan_cold_vs_warm": round(cold_full / warm, 1),
        "warm_scan_files_read": warm_stats["hashed"], "warm_scan_cache_hits": warm_stats["hits"],
        "plan_keys_cold_s": round(plan_cold_s, 1),
        "status_json_warm_s": round(min(status_runs), 2),
        "status_json_warm_runs_s": [round(x, 2) for x in status_runs],
        "status_json_cold_hashes_s": round(status_cold_hash, 2),
        "noop_run_warm_s": round(min(noop_runs), 2),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?", default=str(REPO / "benchmarks" / "results" / "incremental.json"))
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--skip-catalog", action="store_true")
    ap.add_argument("--videos", type=int, default=90)
    ap.add_argument("--frames", type=int, default=70)
    ap.add_argument("--clips", type=int, default=2000)
    ap.add_argument("--per-class", type=int, default=1, help="edit grid: clips per ESC-50 class")
    args = ap.parse_args(argv)
    result: dict = {"load_average_at_start": os.getloadavg()[0], "cpus": os.cpu_count()}
    root = Path(tempfile.mkdtemp(prefix="audioscenic-bench-incremental-"))
    try:
        if not args.skip_demo:
            result["demo"] = demo_figures(root)
            print(json.dumps(result["demo"], indent=1), flush=True)
        if not args.skip_catalog:
            result["full_catalog"] = catalog_figures(root, args.videos, args.frames, args.clips, args.per_class)
            print(json.dumps(result["full_catalog"], indent=1), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result["load_average_at_end"] = os.getloadavg()[0]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()

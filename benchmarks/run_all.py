"""Run every benchmark and gather their figures into one JSON.

Each benchmark measures its own baseline in the same run and reports ratios;
this script only runs them one after another (never in parallel: they would
time each other) and merges their JSON files.

Usage: python benchmarks/run_all.py [out.json] [--only NAME ...] [--collect]

--collect runs nothing: it merges the latest results/<name>.json of every benchmark
(e.g. after rerunning one of them alone) into out.json, with each file's time.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = ["planning", "incremental", "grid", "orchestration", "zarr", "audio", "unet3d", "xmem", "video", "diffusion",
           "windows"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?", default=str(HERE / "results" / "all.json"))
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--collect", action="store_true", help="merge the existing results without running anything")
    args = ap.parse_args(argv)
    results: dict = {"machine": {"python": platform.python_version(), "platform": platform.platform()},
                     "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    failed = []
    for name in args.only or BENCHES:
        script = HERE / f"bench_{name}.py"
        if not script.exists():
            results[name] = {"skipped": "benchmark not present"}
            continue
        out = HERE / "results" / f"{name}.json"
        if args.collect:
            if out.exists():
                results[name] = {**json.loads(out.read_text()),
                                 "written": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(out.stat().st_mtime))}
            else:
                failed.append(name)
                results[name] = {"error": f"no {out.name}: run benchmarks/bench_{name}.py"}
            continue
        t0 = time.time()
        r = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True)
        if r.returncode != 0 or not out.exists():
            failed.append(name)
            results[name] = {"error": (r.stderr or r.stdout)[-2000:]}
        else:
            results[name] = json.loads(out.read_text())
        print(f"{name}: {'ok' if name not in failed else 'FAILED'} in {time.time() - t0:.0f} s", flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"figures: {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

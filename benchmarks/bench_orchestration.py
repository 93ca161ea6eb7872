"""Orchestration cost of a grid with a trivial stage compute (issue 15): is it linear?

One stage of edit-like work items (a video x clip grid, batches of 16 that never mix
videos, full cache keys) runs through the real pipeline flow (`flows.pipeline.stages_flow`:
planning, one Prefect task per batch submitted by `run_stage`, the stage cache policy,
claims, the Zarr store and the ledger), against a fresh Prefect server on loopback per
grid size (start-up not counted). The compute writes one byte per item, so what is
measured is the orchestration. Each grid size runs in its own process: its peak RSS is
the flow process's.

Figures: wall seconds per item at each size, and each size's ratio to the smallest
(the baseline, measured in the same run); per-item overhead = (wall - stage work
recorded in the ledger) / items; ledger fragments left after the run; full ledger
reads during the run (counted in the flow process); peak RSS of the flow process.

A grid written VIDEOSxCLIPS:K starts from a ledger that already records all but its last K
items as done (written before the measured process starts): the run plans the whole grid
(work_items_s, plan_s: cost per grid item) and computes K items against a ledger and a
view of the full grid's size (cost per computed item, memory of the full grid's state).
That is how the 180,000-item grid is measured in minutes; the whole run (`--full`) costs
hours on 2 cores, at the same per-item cost.

Usage: python benchmarks/bench_orchestration.py [out.json] [--grids 8x128 128x128]
       python benchmarks/bench_orchestration.py out.json --grids 8x128 90x2000:8192
       [--full]  (adds the 90x2000 = 180,000-item grid computed whole; hours on 2 cores)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from storage.keys import StageKey  # noqa: E402
from tasks.stage import WorkItem, run_items  # noqa: E402
from tasks.stage_task import StageCachePolicy, run_logged_batch, task  # noqa: E402

DEFAULT_GRIDS = ["8x128", "128x128"]  # 1,024 and 16,384 items
FULL_GRID = "90x2000"  # the whole DAVIS x ESC-50 grid: 180,000 items

# -- the trivial stage (module attributes, like a stage module of flows.stages) -------------------------------
STAGE = "bench"
CONFIG_SECTION = "edit"  # its batch size (16) and code version
BATCH_BY_VIDEO = True
GRID = (1, 1)  # videos, clips: set by the child before the flow runs


def work_items(cfg, catalog) -> list[WorkItem]:
    videos, clips = GRID
    params = {"steps": 50, "guidance": 7.5, "variant": "full"}
    items = []
    for v in range(videos):
        inv = StageKey.build("inversion", "1", {"steps": 50}, {"video": f"{v:064x}"}).key
        for a in range(clips):
            key = StageKey.build(STAGE, cfg.stages.edit.code_version, params, upstream={"inversion": inv, "audio": f"{a:064x}"})
            items.append(WorkItem(STAGE, f"v{v}/a{a}/full", f"bench/v{v}/a{a}", key, video_id=f"v{v}", audio_id=f"a{a}",
                                  variant="full"))
    return items


def run_batch(cfg, items, store, ledger, progress=None, claims=None):
    def compute(item, writer):
        writer.write("x", np.zeros(1, np.uint8))

    return run_items(items, store, ledger, compute, progress=progress, claims=claims)


@task(name="bench", cache_policy=StageCachePolicy())
def stage_task(cfg, items: list[WorkItem]) -> dict[str, Any]:
    return run_logged_batch(STAGE, run_batch, cfg, items)


# -- one grid size, in this process ---------------------------------------------------------------------------
def child(grid: str, root: Path) -> dict:
    import flows.pipeline as pipeline
    import flows.planning as planning
    from storage.ledger import Ledger, LedgerView

    global GRID
    size, _, left = grid.partition(":")
    videos, clips = (int(x) for x in size.split("x"))
    GRID = (videos, clips)
    config = write_config(root)
    me = sys.modules[__name__]
    pipeline.stage_modules = lambda: [me]  # the pipeline flow with this one stage
    reads = {"n": 0}
    real_read = Ledger.read

    def counted(self, *a, **kw):
        reads["n"] += 1
        return real_read(self, *a, **kw)

    Ledger.read = counted
    # (batches finished, RSS MiB) every 64 batches, between compaction steps (a merge's buffers come and go)
    samples: list[tuple[int, float]] = []
    real_finished = LedgerView.batch_finished

    def sampled(self):
        real_finished(self)
        if self._batches % 64 == 40:
            samples.append((self._batches, rss_mib()))

    timings = {"work_items_s": 0.0, "plan_s": 0.0}

    def timed(fn, name):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                timings[name] += time.perf_counter() - t
        return wrapper

    real_plan, real_items = planning.plan, me.work_items
    planning.plan, me.work_items = timed(real_plan, "plan_s"), timed(real_items, "work_items_s")

    LedgerView.batch_finished = sampled
    n = videos * clips
    todo = int(left) if left else n  # "VxC:K": the ledger already records all but the last K items as done
    rss0 = rss_mib()
    cpu0, t0 = cpu_s(), time.perf_counter()
    summary = pipeline.stages_flow(str(config))
    wall, cpu = time.perf_counter() - t0, cpu_s() - cpu0
    Ledger.read, LedgerView.batch_finished, planning.plan, me.work_items = real_read, real_finished, real_plan, real_items
    assert summary[STAGE]["computed"] == todo and not summary[STAGE]["failed"], summary[STAGE]
    assert summary[STAGE]["skipped"] == n - todo, summary[STAGE]
    ledger = Ledger(root / "work" / "ledger")
    fragments = len(ledger.fragment_paths())
    rows = ledger.read(stage=STAGE, status="done")
    assert len(set(rows["item_id"].to_pylist())) == n
    work = float(sum(d or 0.0 for d in rows["duration_s"].to_pylist()))
    n = todo  # per computed item (planning covers the whole grid: plan_s, work_items_s)
    # RSS growth while batches finish: least-squares slope over the samples after the first quarter
    tail = samples[len(samples) // 4:]
    growth = None
    if len(tail) > 2:
        mb, mr = sum(b for b, _ in tail) / len(tail), sum(r for _, r in tail) / len(tail)
        growth = 1e3 * sum((b - mb) * (r - mr) for b, r in tail) / sum((b - mb) ** 2 for b, _ in tail)
    return {"grid": grid, "items": n, "grid_items": videos * clips, "batches": -(-n // 16),
            "wall_s": round(wall, 2), "per_item_ms": round(1e3 * wall / n, 3),
            "work_items_s": round(timings["work_items_s"], 2), "plan_s": round(timings["plan_s"], 2),
            "flow_cpu_per_item_ms": round(1e3 * cpu / n, 3),
            "overhead_per_item_ms": round(1e3 * (wall - work) / n, 3), "stage_work_per_item_ms": round(1e3 * work / n, 3),
            "ledger_fragments_after": fragments, "ledger_reads_in_flow_process": reads["n"],
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "rss_before_flow_mib": round(rss0, 1),
            "rss_growth_mib_per_1k_batches": None if growth is None else round(growth, 2),
            "rss_samples_mib": [[b, round(m, 1)] for b, m in samples[:: max(1, len(samples) // 12)]]}


def write_config(root: Path) -> Path:
    import yaml

    config = root / "config.yaml"
    (root / "videos").mkdir(exist_ok=True)  # an empty catalog: the trivial stage makes up its own items
    config.write_text(yaml.safe_dump({"workdir": str(root / "work"),
                                      "catalogs": {"videos": [{"kind": "folder", "root": str(root / "videos")}]}}))
    return config


def prefill(config: Path, grid: str) -> None:
    """Record the grid's first `done` items as done, as an earlier run would have (its ledger compacted into
    fragments of 4,096 rows: a few dozen files). Only the ledger: planning and the cache policy read nothing else."""
    from storage.ledger import Ledger
    from tasks.config import load_config

    global GRID
    size, _, left = grid.partition(":")
    GRID = tuple(int(x) for x in size.split("x"))
    cfg = load_config(config)
    items = work_items(cfg, None)
    items = items[:len(items) - int(left)]
    ledger = Ledger(cfg.ledger_url)
    t = time.time()
    for i in range(0, len(items), 4096):
        ledger.append([dict(stage=it.stage, item_id=it.item_id, video_id=it.video_id, audio_id=it.audio_id,
                            variant=it.variant, key=it.key.key, code_version=it.key.code_version,
                            params_hash=it.key.params_hash, inputs_hash=it.key.inputs_hash,
                            upstream_keys=it.key.upstream_json(), uri=f"store.zarr/{it.artifact}", status="done",
                            error=None, started_at=t, finished_at=t, run_id="prefill")
                       for it in items[i:i + 4096]])


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def cpu_s(pids: list[int] | None = None) -> float:
    """CPU seconds (user + system) of this process, or of the given processes (live ones)."""
    if pids is None:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def group_pids(pgid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                    out.append(int(d.name))
            except (OSError, ValueError, IndexError):
                pass
    return out


def measure(grid: str, keep: bool = False) -> dict:
    from scripts.prefect_server import start_server, stop_server

    root = Path(tempfile.mkdtemp(prefix=f"audioscenic-bench-orch-{grid}-"))
    if ":" in grid:  # here, not in the measured process: its memory and time are not the run's
        prefill(write_config(root), grid)
    server, env = start_server(root / "prefect-home")
    try:
        env = {**env, "PYTHONPATH": str(REPO), "PREFECT_LOGGING_LEVEL": "INFO"}
        server_pids = group_pids(server.pid)
        server_cpu0 = cpu_s(server_pids)
        with open(root / "child.log", "w") as log:  # the flow's INFO lines: one per item
            r = subprocess.run([sys.executable, __file__, "--child", grid, "--root", str(root)], env=env,
                               stdout=subprocess.PIPE, stderr=log, text=True)
        if r.returncode != 0:
            raise SystemExit(f"grid {grid} failed ({r.returncode}):\n{r.stdout[-3000:]}\n"
                             f"{(root / 'child.log').read_text()[-3000:]}")
        out = json.loads(r.stdout.strip().splitlines()[-1])
        out["server_cpu_per_item_ms"] = round(1e3 * (cpu_s(server_pids) - server_cpu0) / out["items"], 3)
        return out
    finally:
        stop_server(server)
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?", default=str(REPO / "benchmarks" / "results" / "orchestration.json"))
    ap.add_argument("--grids", nargs="*", default=None,
                    help="VIDEOSxCLIPS each (the first is the baseline); VIDEOSxCLIPS:K: the ledger already records "
                         "all but the last K items as done, the run plans the whole grid and computes K")
    ap.add_argument("--full", action="store_true", help=f"also the {FULL_GRID} grid (180,000 items)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, Path(args.root))))
        return {}
    grids = list(args.grids or DEFAULT_GRIDS) + ([FULL_GRID] if args.full else [])
    runs = []
    for g in grids:
        runs.append(measure(g))
        print(json.dumps(runs[-1]), flush=True)
    base, base_cpu = runs[0]["per_item_ms"], runs[0]["flow_cpu_per_item_ms"] + runs[0]["server_cpu_per_item_ms"]
    for r in runs:
        r["per_item_vs_baseline"] = round(r["per_item_ms"] / base, 3)
        r["cpu_per_item_vs_baseline"] = round((r["flow_cpu_per_item_ms"] + r["server_cpu_per_item_ms"]) / base_cpu, 3)
    result = {"stage": "one edit-like stage, trivial compute (one byte per item), batches of 16 by video",
              "baseline": runs[0]["grid"], "cpus": os.cpu_count(), "runs": runs,
              "max_per_item_vs_baseline": max(r["per_item_vs_baseline"] for r in runs),
              "max_cpu_per_item_vs_baseline": max(r["cpu_per_item_vs_baseline"] for r in runs),
              "max_peak_rss_mib": max(r["peak_rss_mib"] for r in runs)}
    print(json.dumps(result, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()

"""Planning and status over a full-catalog ledger: 90 videos x 2000 clips, all done.

Builds the 180,000 edit work items (each with its full cache key) and a ledger
holding one done row per item, then times `plan` (what `status` and every run
do first). Baseline, measured in the same run: reading the same rows from
Parquet with pyarrow alone. Both the compacted ledger (one file) and the
uncompacted one (one fragment per 16-edit batch, as workers write it) are timed.

Usage: python benchmarks/bench_planning.py [out.json] [--videos 90 --clips 2000]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow.parquet as pq  # noqa: E402

from storage import Ledger, StageKey  # noqa: E402
from tasks.stage import WorkItem, plan  # noqa: E402


def build_items(videos: int, clips: int) -> list[WorkItem]:
    params = {"steps": 50, "guidance": 7.5, "controlnet_scale": 1.0, "variant": "full"}
    items = []
    for v in range(videos):
        inv = StageKey.build("inversion", "1", {"steps": 50}, {"video": f"{v:064x}"}).key
        for a in range(clips):
            key = StageKey.build("edit", "1", params, {}, {"inversion": inv, "audio": f"{a:064x}"})
            items.append(WorkItem("edit", f"v{v}/a{a}", f"edits/v{v}/a{a}/full", key, video_id=f"v{v}", audio_id=f"a{a}"))
    return items


def rows_for(items: list[WorkItem]) -> list[dict]:
    return [dict(stage=i.stage, item_id=i.item_id, video_id=i.video_id, audio_id=i.audio_id, key=i.key.key,
                 code_version=i.key.code_version, params_hash=i.key.params_hash, inputs_hash=i.key.inputs_hash,
                 upstream_keys=i.key.upstream_json(), uri=i.artifact, started_at=0.0, finished_at=1.0) for i in items]


def timed(fn, repeats=3):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?", default=str(Path(__file__).parent / "results" / "planning.json"))
    ap.add_argument("--videos", type=int, default=90)
    ap.add_argument("--clips", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    items = build_items(args.videos, args.clips)
    keys_s = time.perf_counter() - t0
    rows = rows_for(items)
    result: dict = {"videos": args.videos, "clips": args.clips, "items": len(items),
                    "build_work_items_s": round(keys_s, 3)}
    with tempfile.TemporaryDirectory() as tmp:
        led = Ledger(Path(tmp) / "ledger")
        for i in range(0, len(rows), args.batch):
            led.append(rows[i : i + args.batch])
        result["fragments_uncompacted"] = len(led.fragment_paths())
        t_plan_frag, entries = timed(lambda: plan(items, led), repeats=1)
        assert all(e.state == "done" for e in entries)
        t_read_frag, _ = timed(lambda: led.read(), repeats=1)
        led.compact()
        (frag,) = led.fragment_paths()
        t_raw, _ = timed(lambda: pq.read_table(frag))
        t_plan, entries = timed(lambda: plan(items, led))
        assert all(e.state == "done" for e in entries)
    result.update({
        "raw_parquet_read_s": round(t_raw, 4),
        "plan_compacted_s": round(t_plan, 3),
        "plan_compacted_vs_raw_read": round(t_plan / t_raw, 1),
        "plan_uncompacted_s": round(t_plan_frag, 3),
        "ledger_read_uncompacted_s": round(t_read_frag, 3),
        "plan_uncompacted_vs_compacted": round(t_plan_frag / t_plan, 1),
        "plan_us_per_item_compacted": round(1e6 * t_plan / len(items), 2),
    })
    print(json.dumps(result, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()

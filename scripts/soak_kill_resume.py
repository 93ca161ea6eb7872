"""Kill-and-resume soak: SIGKILL a grid run at seeded random points, resume, verify.

For each trial: start `audioscenic run CONFIG` on a fresh workdir, SIGKILL its
whole process group after a seeded random delay, then check that
  - every artifact that reads as complete equals the uninterrupted run's,
  - nothing half-written is visible (incomplete artifacts read as absent and
    no ledger row says 'done' for them),
then resume (`audioscenic run` again, to completion) and check that
  - no artifact completed before the resume was redone (same commit time),
  - every artifact and every ledger key equals the uninterrupted run's.
One Prefect server serves all runs, so the kills land in stage work rather
than in server start-up.

Usage: python scripts/soak_kill_resume.py [--trials 20] [--seed 0] [--keep DIR]
Exit status 0 when every trial passes.
"""
from __future__ import annotations

import argparse
import copy
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BIN = Path(sys.executable).parent

from scripts.prefect_server import start_server, stop_server  # noqa: E402
from storage import ArtifactStore, Ledger  # noqa: E402
from tasks.config import QUICK_STAGES  # noqa: E402


def artifacts(store: ArtifactStore) -> dict[str, dict]:
    """Every artifact group (path -> attrs), complete or not."""
    out = {}

    def walk(group, prefix):
        attrs = dict(group.attrs)
        if "complete" in attrs:
            out[prefix] = attrs
        for name, child in group.groups():
            walk(child, f"{prefix}/{name}" if prefix else name)

    walk(store._root, "")
    return out


def arrays_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k], equal_nan=True) for k in a)


def run_cli(config: Path, env: dict, **kw) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "audioscenic"), "run", str(config)], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True, **kw)


def make_workdir(root: Path, data: Path, name: str) -> Path:
    work = root / name
    work.mkdir()
    cfg = {"workdir": ".", "catalogs": {"videos": [{"kind": "davis", "root": str(data / "davis")}],
                                        "audio": [{"kind": "esc50", "root": str(data / "esc50")}]},
           "models": {"preset": "tiny"}, "stages": copy.deepcopy(QUICK_STAGES)}
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    return work / "config.yaml"


def check_trial(ref: dict, ref_store: ArtifactStore, work: Path, kill_after: float, env: dict) -> list[str]:
    problems = []
    config = work / "config.yaml"
    proc = run_cli(config, env)
    time.sleep(kill_after)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    store = ArtifactStore(work / "store.zarr")
    ledger = Ledger(work / "ledger")
    seen = artifacts(store)
    done_rows = {(r["uri"], r["key"]) for r in ledger.read(status="done").to_pylist()}
    committed = {}
    for path, attrs in seen.items():
        if attrs.get("complete") is True:
            got = store.read(path, attrs["key"])
            want = ref_store.read(path, attrs["key"])
            if want is None or not arrays_equal(got, want):
                problems.append(f"complete artifact {path} differs from the uninterrupted run")
            committed[path] = attrs["committed_at"]
        else:
            if store.read(path) is not None:
                problems.append(f"half-written artifact {path} is readable")
            if any(uri == store.uri(path) for uri, _ in done_rows):
                problems.append(f"ledger says done for half-written {path}")
    resume = run_cli(config, env)
    _, err = resume.communicate(timeout=900)
    if resume.returncode != 0:
        problems.append(f"resume exited {resume.returncode}: {err.decode(errors='replace')[-2000:]}")
        return problems
    final = artifacts(store)
    for path, t in committed.items():
        if final[path].get("committed_at") != t:
            problems.append(f"{path} was complete before the resume but was redone")
    for path, attrs in ref.items():
        if path not in final or final[path].get("complete") is not True:
            problems.append(f"{path} missing after resume")
        elif final[path]["key"] != attrs["key"] or not arrays_equal(store.read(path), ref_store.read(path)):
            problems.append(f"{path} differs from the uninterrupted run after resume")
    extra = set(p for p, a in final.items() if a.get("complete")) - set(ref)
    if extra:
        problems.append(f"unexpected artifacts: {sorted(extra)}")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", type=Path, default=None, help="keep the work folders here")
    ap.add_argument("--videos", type=int, default=2, help="sample videos in the grid")
    ap.add_argument("--clips", type=int, default=3, help="sample clips in the grid")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="audioscenic-soak-")) if args.keep is None else args.keep
    root.mkdir(parents=True, exist_ok=True)
    server, env = start_server(root / "prefect-home")
    try:
        data = root / "data"
        subprocess.run([str(BIN / "audioscenic"), "sample-data", str(data), "--videos", str(args.videos), "--clips", str(args.clips),
                        "--frames", "8"],
                       check=True, env=env, stdout=subprocess.DEVNULL)
        ref_config = make_workdir(root, data, "reference")
        t0 = time.time()
        r = run_cli(ref_config, env)
        _, err = r.communicate(timeout=1800)
        ref_wall = time.time() - t0
        if r.returncode != 0:
            print(err.decode(errors="replace")[-3000:])
            raise SystemExit("reference run failed")
        ref_store = ArtifactStore(ref_config.parent / "store.zarr")
        ref = {p: a for p, a in artifacts(ref_store).items() if a.get("complete") is True}
        print(f"reference run: {ref_wall:.1f} s, {len(ref)} artifacts")
        failures = 0
        for trial in range(args.trials):
            kill_after = rng.uniform(0.0, ref_wall)
            work_config = make_workdir(root, data, f"trial-{trial:02d}")
            problems = check_trial(ref, ref_store, work_config.parent, kill_after, env)
            status = "ok" if not problems else "FAIL"
            print(f"trial {trial:2d}: killed after {kill_after:5.1f} s: {status}")
            for p in problems:
                print(f"    {p}")
            failures += bool(problems)
            if not problems and args.keep is None:
                shutil.rmtree(work_config.parent)
        print(f"{args.trials - failures}/{args.trials} trials passed")
        return 1 if failures else 0
    finally:
        stop_server(server)
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

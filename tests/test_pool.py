"""One grid over a pool of workers on real services: scripts/check_pool.py (issue 15).

The script starts its own PostgreSQL cluster, Prefect server, moto S3 server and three
workers, runs fan-out grids on them, and stops everything it started; this test only runs
it and reads its verdict and figures. It needs PostgreSQL's binaries (initdb, pg_ctl) and
moto's server (the test extra); without PostgreSQL it is skipped, saying so.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from tests.check_scripts import run_check

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "check_pool.py"
CHECK_TIMEOUT = 1200  # the script's own limit on itself (its CHECK_TIMEOUT); it takes 10-14 minutes here
TEST_TIMEOUT = CHECK_TIMEOUT + 90  # last resort, should the script's own limit fail


def _postgres() -> bool:
    return bool(os.environ.get("PG_BIN") or glob.glob("/usr/lib/postgresql/*/bin/initdb") or shutil.which("initdb"))


@pytest.mark.skipif(not _postgres(), reason="PostgreSQL binaries (initdb, pg_ctl) not found; set PG_BIN")
@pytest.mark.heavy(700)
def test_pool_check_script(tmp_path):
    keep = tmp_path / "check"  # logs, data and result.json stay here for a post-mortem
    # 120 s of "GPU" wait per video in the timed runs: the child runs' start-up (Python, Prefect) is CPU
    # work that two workers on two shared cores cannot overlap, so the waiting must dominate it for the
    # <= 0.65x check to hold beside other tests (with 60 s it measured 0.77 at load 7, 0.48-0.63 at load 4-6).
    env = dict(os.environ, CHECK_TIMEOUT=str(CHECK_TIMEOUT), FRAMES_WAIT_S="120")
    python = REPO / ".venv" / "bin" / "python"
    code, out = run_check([str(python if python.exists() else sys.executable), str(SCRIPT), str(keep)], env,
                          TEST_TIMEOUT)
    assert code == 0, f"check_pool.py exited {code}:\n{out[-10000:]}"
    assert "shut down cleanly; no process left" in out, out[-10000:]
    result = json.loads((keep / "result.json").read_text())
    grid = result["grid"]
    assert grid["state"] == "COMPLETED"
    assert set(grid["workers"]) == {"gpu-1", "gpu-2"}  # both workers took child runs
    assert grid["killed"]["lost_children"]  # the killed worker's child was declared lost, run again
    assert grid["exactly_once"]["adopted"]  # what it had committed was adopted, not redone
    assert result["timing"]["ratio"] <= 0.65, result["timing"]
    assert re.search(r"timing: two workers [\d.]+s, one worker [\d.]+s", out)

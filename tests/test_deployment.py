"""prefect.yaml end to end: scripts/check_deployment.sh (server, process worker, deploy, one run).

The script starts its own throwaway Prefect server (it does not use the session's test
server) and stops everything it started; this test only runs it and reads its verdict.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml

from tests.check_scripts import run_check

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "check_deployment.sh"
CHECK_TIMEOUT = 600  # the script's own limit on itself (its CHECK_TIMEOUT)
TEST_TIMEOUT = CHECK_TIMEOUT + 120  # last resort, should the script's own limit fail


def test_prefect_yaml_describes_the_grid_deployment():
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (dep,) = [d for d in spec["deployments"] if d["name"] == "nightly-grid"]
    assert dep["entrypoint"] == "flows/pipeline.py:edit_grid_flow"
    assert set(dep["parameters"]) == {"config_path", "selection"}
    assert dep["schedules"] and all("cron" in s for s in dep["schedules"])
    assert dep["work_pool"]["name"] == "audioscenic-process"
    assert not spec.get("build") and not spec.get("push")
    assert "prefect.deployments.steps.set_working_directory" in spec["pull"][-1]


@pytest.mark.heavy(150)
def test_deployment_check_script(tmp_path):
    keep = tmp_path / "check"  # logs, data and the Prefect home stay here for a post-mortem
    env = dict(os.environ, CHECK_TIMEOUT=str(CHECK_TIMEOUT))
    code, out = run_check(["bash", str(SCRIPT), str(keep)], env, TEST_TIMEOUT)
    assert code == 0, f"check_deployment.sh exited {code}:\n{out[-10000:]}"
    assert re.search(r"flow run [0-9a-f-]{36}: COMPLETED", out), out[-10000:]
    assert "Flow run finished successfully in 'Completed'" in out
    assert "shut down cleanly; no process left" in out
    # The run edited the grid it was given: the ledger of the check's workdir is not empty.
    assert list((keep / "grid" / "ledger").rglob("*.parquet"))

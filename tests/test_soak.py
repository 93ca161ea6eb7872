"""The short kill-and-resume soak (the full 20-trial version: README, Fault tolerance)."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.heavy(300)
def test_kill_and_resume_short_soak():
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "soak_kill_resume.py"), "--trials", "2", "--seed", "1",
                        "--videos", "1", "--clips", "2"],  # every stage, the smallest grid (CI time)
                       capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "2/2 trials passed" in r.stdout

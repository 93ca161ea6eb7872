"""Running the repository's end-to-end check scripts from tests, bounded."""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_check(argv: list[str], env: dict[str, str], timeout: float) -> tuple[int, str]:
    """(exit code, output) of a check script run in its own session. Past `timeout`, SIGTERM (the scripts
    stop what they started), SIGKILL to the whole group after 120 s more, and an AssertionError."""
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        raise AssertionError(f"{Path(argv[-2]).name} ran past {timeout}s:\n{out[-10000:]}") from None
    return proc.returncode, out

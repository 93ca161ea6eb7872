"""Shared test setup: offline Prefect in a temp home, fixtures for generated data."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_PREFECT_HOME = tempfile.mkdtemp(prefix="audioscenic-prefect-")
# Before anything imports Prefect: no telemetry, and nothing written to the user's ~/.prefect.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import torch  # noqa: E402

# Two cores here and in CI: keep torch from oversubscribing them.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]


def fixtures_dir() -> Path | None:
    """Real media beside the project (never committed); tests using it skip when absent."""
    env = os.environ.get("AUDIOSCENIC_FIXTURES")
    candidates = [Path(env)] if env else [REPO.parent / "shared" / "fixtures"]
    for c in candidates:
        if c.is_dir():
            return c
    return None


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect server (SQLite) for the whole test session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory):
    from tasks.sample_data import write_sample_data

    return write_sample_data(tmp_path_factory.mktemp("sample"), videos=2, clips=4, seed=0, frames=8)

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

# With two xdist workers on two cores, every process gets one thread (the CLI and services the tests
# start inherit it): OpenMP threads spinning on oversubscribed cores slow small ops by orders of magnitude.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import torch  # noqa: E402

# Two cores here and in CI: keep torch from oversubscribing them (one thread per xdist worker:
# `make test` runs two workers side by side).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))

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


def pytest_collection_modifyitems(config, items):
    """Longest first: tests marked `heavy(seconds)` (whole pipelines and services in subprocesses, minutes
    each) start before the rest, so with two xdist workers they overlap the many short tests instead of
    running last, one after another."""
    def weight(item) -> float:
        mark = item.get_closest_marker("heavy")
        return float(mark.args[0]) if mark and mark.args else (1.0 if mark else 0.0)

    items.sort(key=weight, reverse=True)  # stable: collection order otherwise

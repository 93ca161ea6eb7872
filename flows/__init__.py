"""Prefect flows that chain the stages, and the `audioscenic` CLI."""
import os

# Set before Prefect is imported anywhere: no telemetry from a tool that runs offline.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# A fresh PREFECT_HOME migrates the temporary server's database first: on a small busy machine that
# takes longer than Prefect's default wait (20 s), and the run would fail before it starts.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

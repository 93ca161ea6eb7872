"""Prefect flows that chain the stages, and the `audioscenic` CLI."""
import os

# Set before Prefect is imported anywhere: no telemetry from a tool that runs offline.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

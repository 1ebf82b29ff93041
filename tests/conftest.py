"""Shared test setup: offline, telemetry-free, CPU-only environment and a throwaway Prefect backend."""
import os

# --- Environment: set before anything imports prefect, torch or huggingface_hub (they read it early).
# Defaults only, so a developer can still override one from the shell.
for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_DISABLE_TELEMETRY": "1",
    "CUDA_VISIBLE_DEVICES": "",  # tests fake device lists; never grab a real GPU
}.items():
    os.environ.setdefault(_key, _value)

import pytest  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402


# --- Prefect: one temporary server + SQLite database for the whole session (startup costs seconds,
# so it is shared, never per test). Flows in tests never touch a developer's real Prefect server.
@pytest.fixture(autouse=True, scope="session")
def prefect_backend():
    with prefect_test_harness():
        yield

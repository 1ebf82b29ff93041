"""uda-distill: adapt CLIP-class models to an unlabelled domain by knowledge distillation.

Importing the package turns Prefect and DVC telemetry off (unless the user set those variables), asks
cuBLAS for deterministic workspaces, and installs the torchvision guard before anything imports open_clip.
``HF_HUB_OFFLINE`` is left to the user: set it to 1 to forbid downloads (the tests and the smoke run do).
"""
import os

for _key, _value in {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "CUBLAS_WORKSPACE_CONFIG": ":4096:8",  # required for deterministic cuBLAS matmuls (runtime.deterministic)
}.items():
    os.environ.setdefault(_key, _value)

from pipeline import _torchvision_guard  # noqa: E402

_torchvision_guard.install()

__version__ = "0.1.0"

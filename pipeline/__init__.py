"""uda-distill: adapt CLIP-class models to an unlabelled domain by knowledge distillation.

Importing the package makes the environment offline-friendly (telemetry off, hub offline unless the user
says otherwise) and installs the torchvision guard before anything imports open_clip.
"""
import os

for _key, _value in {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
}.items():
    os.environ.setdefault(_key, _value)

from pipeline import _torchvision_guard  # noqa: E402

_torchvision_guard.install()

__version__ = "0.1.0"

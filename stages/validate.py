"""Stage ``validate``: check the whole params file before any other stage runs.

DVC removes a stage's outputs just before it runs the stage's command, and each stage validates its params
only then: a typo would empty ``models/students`` before the stage could refuse it. Every stage depends on
this stage's output, whose content is the same for every valid params file, so DVC runs this first and
stops here on a mistake (with nothing removed), and a valid change re-runs only the stages it concerns.
It depends on every key of the params file, so an unknown top-level key is caught too. It also checks that
the teacher's and student's weights can be had (cached, downloadable, or built by the ``standins`` stage), so a
config whose weights are missing stops here, in seconds, not after the data stages, and builds the prompts and
the method's models on the meta device, so that one that does not fit the models (a prompt depth beyond their
layers) stops here too.
"""
from __future__ import annotations

import sys
from pathlib import Path

from pipeline.command import entry
from pipeline.io import atomic_write_text
from pipeline.orchestration.stage import check_architectures, check_models, start

STAGE = "validate"
CONFIRMATION = "the params file is valid\n"  # constant on purpose: see the module docstring


def main(argv: list[str] | None = None) -> None:
    params = start(STAGE, argv, __doc__)
    check_models(params)
    check_architectures(params)
    atomic_write_text(Path(params["paths"]["run_info"]) / "validate.txt", CONFIRMATION)


if __name__ == "__main__":
    sys.exit(entry(STAGE, main))

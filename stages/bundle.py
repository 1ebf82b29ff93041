"""Stage ``bundle`` (``bundle@<task>``, one per task): the trained student as the folder users ship.

Reads the distill stage's ``student.pt`` and the evaluate stage's ``metrics.json`` of one task and writes
``paths.bundles/<task>/`` (:mod:`pipeline.student.bundle`): ``model.safetensors`` (only what training changed,
no pickle), ``config.json`` (method, base model identity and weights hash, classes, preprocessing, params,
code revision, metrics) and ``README.md`` (the model card). Before the folder replaces the old one, the bundle
is loaded back onto its base model, so a bundle that cannot be rebuilt is never written.
"""
from __future__ import annotations

import sys

from pipeline.artifacts import REDISTILL, Artifacts
from pipeline.command import entry
from pipeline.io import atomic_dir, load_checkpoint, read_json
from pipeline.methods import METHODS
from pipeline.models.factory import load_model
from pipeline.orchestration.stage import checked_model_spec, record_run, start
from pipeline.student.bundle import Bundle, bundle_config, bundle_state, write_bundle
from pipeline.student.card import model_card

STAGE = "bundle"


def main(argv: list[str] | None = None) -> None:
    params = start(STAGE, argv, __doc__, per_task=True)
    (name,) = params["tasks"]
    artifacts = Artifacts(params["paths"])
    checkpoint = load_checkpoint(artifacts.student(name).checkpoint, what="the distill stage's student.pt",
                                 fix=REDISTILL)
    method = METHODS[checkpoint["method"]]
    base = load_model(checked_model_spec(params, method.base_role))
    evaluation = read_json(artifacts.evaluation(name).metrics)
    config = bundle_config(name=name, checkpoint=checkpoint, base=base, params=params, evaluation=evaluation)
    with atomic_dir(artifacts.bundle(name)) as tmp:
        write_bundle(tmp, config=config, state=bundle_state(checkpoint), card=model_card(config))
        Bundle.read(tmp).load_onto(base)
    record_run(params, STAGE, record=f"bundle_{name}")


if __name__ == "__main__":
    sys.exit(entry(STAGE, main))

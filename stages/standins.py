"""Stage ``standins``: pretrain the tiny digits stand-in VLMs named in ``standins.models``.

Only the offline default params.yaml names any; with real weights this stage writes an empty manifest.
"""
from __future__ import annotations

import sys

from pipeline.command import entry
from pipeline.data.shards import shard_classes
from pipeline.io import atomic_dir, atomic_write_json
from pipeline.models.factory import save_local_dir
from pipeline.models.standins import pretrain_standin
from pipeline.orchestration.stage import record_run, run_stage_items, shard_dir, start, task_label

STAGE = "standins"


def main(argv: list[str] | None = None) -> None:
    params = start(STAGE, argv, __doc__)
    st = params["standins"]
    shard_dirs = [shard_dir(params, st["dataset"], d) for d in st["domains"]]
    with atomic_dir(params["paths"]["standins"]) as tmp:
        def work(name, arch, device):
            out = pretrain_standin(arch=arch, shard_dirs=shard_dirs, classnames=shard_classes(*shard_dirs),
                                   templates=st["templates"], epochs=st["epochs"], batch_size=st["batch_size"],
                                   lr=st["lr"], seed=params["seed"], device=device)
            save_local_dir(out["model"], out["model_cfg"], tmp / name)
            atomic_write_json(tmp / name / "train_log.json", out["log"])
            return {"arch": arch, "images": out["n_images"], "final_train_acc": out["log"][-1]["train_acc"]}

        results = run_stage_items(STAGE, params, st["models"], work, label=task_label(params))
        atomic_write_json(tmp / "manifest.json", {"standins": results, "dataset": st["dataset"],
                                                  "domains": st["domains"]})
    record_run(params, STAGE)


if __name__ == "__main__":
    sys.exit(entry(STAGE, main))

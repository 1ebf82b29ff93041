"""Stage ``prepare``: build the bundled digits domains as image-folder trees under ``paths.raw``."""
from __future__ import annotations

import sys

from pipeline.command import entry
from pipeline.data.digits import build_domain
from pipeline.io import atomic_dir
from pipeline.orchestration.stage import record_run, run_stage_items, start, task_label

STAGE = "prepare"


def main(argv: list[str] | None = None) -> None:
    params = start(STAGE, argv, __doc__)
    data = params["data"]
    items = {f"{name}/{domain}": (name, domain, ds) for name, ds in data["datasets"].items()
             for domain in ds["domains"] if ds["format"] == "digits"}
    with atomic_dir(params["paths"]["raw"]) as tmp:
        def work(_name, item, _device):
            dataset, domain, ds = item
            return build_domain(domain, tmp / dataset / domain, per_class=ds["per_class"],
                                image_size=ds["image_size"], seed=data["shuffle_seed"])

        run_stage_items(STAGE, params, items, work, label=task_label(params), on_gpu=False)
    record_run(params, STAGE)


if __name__ == "__main__":
    sys.exit(entry(STAGE, main))

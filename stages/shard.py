"""Stage ``shard``: write every domain's image folder as deterministic webdataset shards."""
from __future__ import annotations

from pathlib import Path

from pipeline.data.classlists import load_classlist
from pipeline.data.shards import write_domain_shards
from pipeline.io import atomic_dir
from pipeline.orchestration.stage import record_run, run_stage_items, start, task_label

STAGE = "shard"


def main(argv: list[str] | None = None) -> None:
    params = start(STAGE, argv, __doc__)
    data, raw = params["data"], Path(params["paths"]["raw"])
    items = {f"{name}/{domain}": (name, domain) for name, ds in data["datasets"].items() for domain in ds["domains"]}
    with atomic_dir(params["paths"]["shards"]) as tmp:
        def work(_name, item, _device):
            dataset, domain = item
            manifest = write_domain_shards(raw / dataset / domain, tmp / dataset / domain, dataset=dataset,
                                           domain=domain, classes=load_classlist(dataset),
                                           maxcount=data["shard_maxcount"], seed=data["shuffle_seed"])
            return {"n": manifest["n"], "shards": len(manifest["shards"])}

        run_stage_items(STAGE, params, items, work, label=task_label(params), on_gpu=False)
    record_run(params, STAGE)


if __name__ == "__main__":
    main()

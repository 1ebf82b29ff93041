"""Stage ``shard``: write every domain of every dataset as deterministic webdataset shards.

``digits`` domains are read from the image folders the prepare stage built under ``paths.raw``; external
datasets (Office-31, Office-Home, VisDA, DomainNet, mini-DomainNet, any folder tree or image list) straight
from the ``root`` their params entry names (layouts: DATASETS.md). Every root and class list is checked
before any work.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from pipeline.command import entry
from pipeline.data.benchmarks import dataset_classes, domain_samples, expected_count, root_of
from pipeline.data.classlists import load_classlist
from pipeline.data.folders import list_class_tree
from pipeline.data.sharding import write_shards
from pipeline.io import atomic_dir
from pipeline.orchestration.stage import record_run, run_stage_items, start, task_label

STAGE = "shard"


def main(argv: list[str] | None = None) -> None:
    params = start(STAGE, argv, __doc__)
    data, raw = params["data"], Path(params["paths"]["raw"])
    datasets = data["datasets"]
    # Before any work: a missing root or class list fails here, naming the dataset and the path.
    for name, ds in datasets.items():
        if ds["format"] != "digits":
            root_of(name, ds)
    classes = {name: load_classlist(name) if ds["format"] == "digits" else dataset_classes(name, ds)
               for name, ds in datasets.items()}
    items = {f"{name}/{domain}": (name, domain) for name, ds in datasets.items() for domain in ds["domains"]}
    with atomic_dir(params["paths"]["shards"]) as tmp:
        def work(_name, item, _device):
            dataset, domain = item
            ds = datasets[dataset]
            if ds["format"] == "digits":
                samples, skipped = list_class_tree(raw / dataset / domain, classes[dataset])
                source = {"folder": f"{params['paths']['raw']}/{dataset}/{domain}"}
            else:
                samples, skipped, source = domain_samples(dataset, ds, domain, classes[dataset])
            manifest = write_shards(samples, tmp / dataset / domain, dataset=dataset, domain=domain,
                                    classes=classes[dataset], maxcount=data["shard_maxcount"],
                                    seed=data["shuffle_seed"], workers=data["shard_workers"],
                                    max_bad_fraction=data["max_bad_fraction"], skipped=skipped, source=source,
                                    store_max_side=data["store_max_side"])
            expected = expected_count(ds, domain)
            if expected is not None and manifest["n"] != expected:
                logging.getLogger(__name__).warning(
                    "%s/%s: %d images, the official release has %d (partial download or a different version?)",
                    dataset, domain, manifest["n"], expected)
            return {"n": manifest["n"], "shards": len(manifest["shards"]), "skipped": manifest["n_skipped"],
                    "resized": manifest["n_resized"],
                    "expected": expected}

        run_stage_items(STAGE, params, items, work, label=task_label(params), on_gpu=False)
    record_run(params, STAGE)


if __name__ == "__main__":
    sys.exit(entry(STAGE, main))

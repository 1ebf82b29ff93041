"""Every benchmark end to end: fixture trees -> shard -> prompts -> features -> distill -> evaluate -> report,
through the tiny stand-in models (pretrained here for one epoch on two digits domains), in one pipeline run
with one task per format; the layout variants (Dassl Office-31 with capital class folders, DomainNet split
files) are sharded in the same run. The stage ``main()`` functions are called as ``dvc repro`` would run them.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import fixture_trees as ft
from pipeline.data.shards import read_manifest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("benchmarks")
    data = tmp / "downloads"
    datasets = {
        "office31": ft.office31(data / "office31", layout="official"),
        "office31_dassl": ft.office31(data / "office31_dassl", layout="dassl", upper=True),
        "office_home": ft.office_home(data / "OfficeHomeDataset_10072016"),
        "visda": ft.visda(data / "visda17"),
        "domainnet": ft.domainnet(data / "domainnet", split_dir="splits"),
        "mini_domainnet": ft.mini_domainnet(data / "mini"),
        "my_folders": ft.generic_folder(data / "folders"),
        "my_lists": ft.generic_image_list(data / "lists"),
    }
    datasets["domainnet_test_split"] = {**datasets["domainnet"], "split": "test"}
    datasets["office31_dassl"]["format"] = "office31"
    tasks = {
        "o31_amazon_to_webcam": ("office31", "amazon", "webcam"),
        "oh_art_to_real_world": ("office_home", "art", "real_world"),
        "visda_train_to_validation": ("visda", "train", "validation"),
        "dn_real_to_quickdraw": ("domainnet", "real", "quickdraw"),
        "mini_clipart_to_sketch": ("mini_domainnet", "clipart", "sketch"),
        "folders_studio_to_street": ("my_folders", "studio", "street"),
        "lists_synthetic_to_photos": ("my_lists", "synthetic", "photos"),
    }
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["paths"] = {k: str(tmp / "work" / k) for k in params["paths"]}
    params["data"]["max_bad_fraction"] = 0.05  # office_home/art holds 3 bad files of 133
    params["data"]["shard_maxcount"] = 50
    params["data"]["shard_workers"] = 2
    params["data"]["datasets"] = {"digits": {**params["data"]["datasets"]["digits"], "per_class": 6,
                                             "domains": ["printed", "mnistm"]}, **datasets}
    params["tasks"] = {name: {"dataset": d, "source": s, "target": t} for name, (d, s, t) in tasks.items()}
    for role in ("teacher", "student"):
        params["model"][role]["name"] = f"local-dir:{params['paths']['standins']}/{role}"
    params["standins"].update(epochs=1)
    params["prompts"].update(epochs=1, template="a photo of a {}.")
    params["features"]["templates"] = ["a photo of a {}.", "a drawing of a {}."]
    # digits stand-ins on 1-epoch object fixtures predict one class: that is the collapse guard's job in a
    # real run, but here only the plumbing is under test
    params["distill"].update(epochs=1, collapse_fraction=1.0)
    params["runtime"].update(retries=0)
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params))

    from stages import bundle, distill, evaluate, features, prepare, prompts, report, shard, standins
    for stage in (prepare, shard, standins, prompts, features, distill, evaluate, report):
        stage.main(["--params", str(path)])
    for task in tasks:
        bundle.main(["--params", str(path), "--task", task])
    results = json.loads((Path(params["paths"]["report"]) / "results.json").read_text())
    return params, results


def test_every_benchmark_runs_end_to_end(run):
    params, results = run
    assert set(results["tasks"]) == set(params["tasks"])
    for name, task in results["tasks"].items():
        for model in ("zeroshot_teacher", "source_teacher", "student"):
            for key in ("acc", "mean_class_acc"):  # both always recorded
                assert 0.0 <= task[model]["target"][key] <= 100.0, (name, model, key)
    summary = json.loads((Path(params["paths"]["report"]) / "summary.json").read_text())  # the words
    assert summary["headline_metric"]["visda_train_to_validation"] == "mean_class_acc"
    assert summary["headline_metric"]["oh_art_to_real_world"] == "acc"
    headline = json.loads((Path(params["paths"]["report"]) / "headline.json").read_text())
    assert set(headline) == {"mean", *params["tasks"]}
    for name in params["tasks"]:  # the distill stage's curves, one row per epoch (1 here)
        curves = Path(params["paths"]["curves"]) / name / "plots" / "metrics"
        assert (curves / "agreement_with_teacher.tsv").read_text().splitlines()[1].startswith("1\t")
    md = (Path(params["paths"]["report"]) / "results.md").read_text()
    assert "| visda_train_to_validation | train → validation |" in md and "mean-class |" in md
    for name in params["tasks"]:  # every benchmark's class list travels into its bundle, in label order
        config = json.loads((Path(params["paths"]["bundles"]) / name / "config.json").read_text())
        metrics = json.loads((Path(params["paths"]["evaluate"]) / name / "metrics.json").read_text())
        assert config["classes"] == metrics["classes"] and config["task"]["target"] == metrics["target"]


def test_shards_of_every_layout(run):
    params, _ = run
    shards = Path(params["paths"]["shards"])
    expect = {("office31", "amazon"): 62, ("office31_dassl", "amazon"): 62, ("office_home", "real_world"): 130,
              ("office_home", "art"): 130, ("visda", "train"): 24, ("domainnet", "quickdraw"): 12,
              ("domainnet_test_split", "painting"): 7,  # 6 test lines + t-shirt, absent from painting_train ("mini_domainnet", "sketch"): 8,
              ("my_folders", "street"): 4, ("my_lists", "photos"): 8}
    for (dataset, domain), n in expect.items():
        m = read_manifest(shards / dataset / domain)
        assert m["n"] == n, (dataset, domain, m["n"])
    art = read_manifest(shards / "office_home" / "art")
    assert {s["path"] for s in art["skipped"]} == {"Mug/broken.jpg", "Mug/half.jpg", "Pen/notes.txt"}
    assert read_manifest(shards / "visda" / "train")["formats"] == {"png": 24}
    assert len(read_manifest(shards / "domainnet" / "real")["classes"]) == 345
    assert read_manifest(shards / "mini_domainnet" / "clipart")["classes"] == ["anvil", "television", "umbrella",
                                                                                "zebra"]
    # the prompts stage took its class names from the shards (mini-DomainNet's derived list included)
    meta = Path(params["paths"]["features"]) / "tasks" / "mini_clipart_to_sketch" / "meta.json"
    assert json.loads(meta.read_text())["classes"] == ["anvil", "television", "umbrella", "zebra"]


def test_missing_root_stops_the_shard_stage_before_any_work(tmp_path):
    from stages import shard

    params = yaml.safe_load((ROOT / "configs" / "visda.yaml").read_text())
    params["paths"] = {k: str(tmp_path / k) for k in params["paths"]}
    params["data"]["datasets"]["visda"]["root"] = str(tmp_path / "not-downloaded" / "visda17")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(FileNotFoundError, match=r"data.datasets.visda.root: folder .*not-downloaded/visda17.* "
                                                r"does not exist .*DATASETS.md, section 'VisDA-2017'"):
        shard.main(["--params", str(path)])
    assert not (tmp_path / "shards").exists()

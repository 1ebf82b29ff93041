"""params validation of external dataset entries: one schema per format, errors name key, value, expectation."""
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, validate_params

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def params():
    p = yaml.safe_load((ROOT / "configs" / "office_home.yaml").read_text())
    p["data"]["datasets"]["lists"] = {"format": "image_list", "root": "/x", "domains": ["a", "b"],
                                      "classes": "visda", "lists": {"a": "a.txt", "b": "b.txt"}}
    return p


def _error(params) -> str:
    with pytest.raises(ConfigError) as info:
        validate_params(params)
    return str(info.value)


def test_valid(params):
    validate_params(params)


@pytest.mark.parametrize("change, expected", [
    (lambda d: d["office_home"].update(format="officehome"),
     "data.datasets.office_home.format: expected one of ['digits', 'office31', 'office_home'"),
    (lambda d: d["office_home"].pop("root"), "data.datasets.office_home.root: missing"),
    (lambda d: d["office_home"].update(split="train"), "data.datasets.office_home.split: unknown key"),
    (lambda d: d["office_home"].update(domains=["art", "Real World"]),
     "unknown office_home domain 'Real World'; allowed: ['art', 'clipart', 'product', 'real_world']"),
    (lambda d: d["office_home"].update(headline="top5"), "data.datasets.office_home.headline: expected one of"),
    (lambda d: d["lists"]["lists"].pop("b"), "data.datasets.lists.lists: no list file for domain(s) ['b']"),
    (lambda d: d["lists"]["lists"].update(c="c.txt"), "data.datasets.lists.lists: ['c'] are not in"),
    (lambda d: d["lists"].update(classes="imagenet"), "data.datasets.lists.classes: 'imagenet' is not a bundled"),
    (lambda d: d["lists"].update(domains=["a", "my domain"], lists={"a": "a", "my domain": "b"}),
     "'my domain' names a folder of shards"),
    (lambda d: d["lists"].pop("format"), "data.datasets.lists.format: missing"),
])
def test_dataset_entry_errors(params, change, expected):
    change(params["data"]["datasets"])
    assert expected in _error(params)


def test_data_level_keys(params):
    params["data"]["max_bad_fraction"] = 1.5
    assert "data.max_bad_fraction: expected a fraction in [0, 1), got 1.5" in _error(params)
    params["data"]["max_bad_fraction"] = 0.0
    params["data"]["shard_workers"] = -1
    assert "data.shard_workers: expected an integer >= 0" in _error(params)


def test_domainnet_split_and_task_domains(params):
    params["data"]["datasets"]["dn"] = {"format": "domainnet", "root": "/d", "domains": ["real", "sketch"],
                                        "split": "test"}
    params["tasks"]["dn_r2s"] = {"dataset": "dn", "source": "real", "target": "sketch"}
    validate_params(params)
    params["tasks"]["dn_r2s"]["target"] = "clipart"
    assert "tasks.dn_r2s.target: unknown domain 'clipart'" in _error(params)

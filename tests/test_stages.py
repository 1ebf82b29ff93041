"""Stage entry modules: params are validated and weights checked before any work; failures leave no output."""
import json
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError
from pipeline.models.factory import ModelWeightsError

ROOT = Path(__file__).resolve().parent.parent


def _params(tmp_path, change=None) -> Path:
    params = yaml.safe_load((ROOT / "configs" / "digits_clip.yaml").read_text())
    params["paths"] = {k: str(tmp_path / k) for k in params["paths"]}
    params["data"]["datasets"]["digits"]["per_class"] = 3
    params["model"]["cache_dir"] = str(tmp_path / "empty-cache")
    if change:
        change(params)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_invalid_params_stop_before_any_output(tmp_path):
    from stages import prepare

    path = _params(tmp_path, lambda p: p["tasks"]["usps_to_mnist"].update(target="svhn"))
    with pytest.raises(ConfigError, match="tasks.usps_to_mnist.target: unknown domain 'svhn'"):
        prepare.main(["--params", str(path)])
    assert not (tmp_path / "raw").exists()


def test_missing_teacher_weights_offline_fail_before_work(tmp_path):
    from stages import prompts

    path = _params(tmp_path)
    with pytest.raises(ModelWeightsError, match="teacher model 'ViT-B-16-quickgelu'.*not cached"):
        prompts.main(["--params", str(path)])
    assert not (tmp_path / "prompts").exists() and not list(tmp_path.glob(".prompts.tmp-*"))


def test_prepare_and_shard_write_atomically(tmp_path, monkeypatch):
    from stages import prepare, shard

    path = _params(tmp_path)
    prepare.main(["--params", str(path)])
    assert sorted(p.name for p in (tmp_path / "raw" / "digits").iterdir()) == ["mnist", "mnistm", "printed", "usps"]
    run_info = json.loads((tmp_path / "run_info" / "prepare.json").read_text())
    assert set(run_info["params"]) == {"data.datasets", "data.shuffle_seed", "runtime"}  # as dvc.yaml declares
    assert "torch" in run_info["environment"]["packages"]

    import pipeline.data.shards as shards_lib
    import pipeline.data.sharding as sharding_lib

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")  # ENOSPC: deterministic, not retried

    monkeypatch.setattr(shard, "write_shards", broken)
    with pytest.raises(Exception, match="No space left"):
        shard.main(["--params", str(path)])
    assert not (tmp_path / "shards").exists() and not list(tmp_path.glob(".shards.tmp-*"))
    monkeypatch.setattr(shard, "write_shards", sharding_lib.write_shards)
    shard.main(["--params", str(path)])
    assert shards_lib.read_manifest(tmp_path / "shards" / "digits" / "usps")["n"] == 30


def test_evaluate_joins_labels_by_key_and_refuses_mismatches(digits_shards):
    from pipeline.data.shards import read_labels
    from stages.evaluate import labels_in_order

    root = digits_shards["usps"].parent
    params = {"paths": {"shards": str(root.parent)}}
    keys, labels = read_labels(digits_shards["usps"])
    shuffled = keys[::-1]
    assert labels_in_order(params, "shards", "usps", shuffled).tolist() == labels[::-1].tolist()
    with pytest.raises(ValueError, match="do not match its shards"):
        labels_in_order(params, "shards", "usps", shuffled[:-1] + shuffled[:1])  # a duplicate, one missing

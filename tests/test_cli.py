"""The `uda-distill` command and the torchvision guard that lets open_clip import on CPU torch."""
from pathlib import Path

import pytest
import torch

from pipeline import _torchvision_guard
from pipeline.cli import main
from pipeline.models.factory import ModelWeightsError

ROOT = Path(__file__).resolve().parent.parent


def test_torchvision_guard_lets_open_clip_import():
    import open_clip
    import torchvision.transforms  # noqa: F401

    acted = _torchvision_guard.install()
    assert acted == (torch.version.cuda is None and "+cpu" not in __import__("torchvision").__version__)
    assert "ViT-B-32" in open_clip.list_models()


def test_fetch_weights_offline_names_the_model(tmp_path):
    params = (ROOT / "params.yaml").read_text().replace("cache_dir: null", f"cache_dir: {tmp_path}")
    (tmp_path / "params.yaml").write_text(params)
    with pytest.raises(ModelWeightsError, match="teacher model 'ViT-B-16-quickgelu'"):
        main(["fetch-weights", "--params", str(tmp_path / "params.yaml")])


def test_smoke_refuses_a_non_empty_workdir(tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not empty"):
        main(["smoke", "--workdir", str(tmp_path)])
    assert (tmp_path / "keep.txt").read_text() == "user data"

"""The `uda-distill` command and the torchvision guard that lets open_clip import on CPU torch."""
from pathlib import Path

import torch

from pipeline import _torchvision_guard
from pipeline.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_torchvision_guard_lets_open_clip_import():
    import open_clip
    import torchvision.transforms  # noqa: F401

    acted = _torchvision_guard.install()
    assert acted == (torch.version.cuda is None and "+cpu" not in __import__("torchvision").__version__)
    assert "ViT-B-32" in open_clip.list_models()


def test_fetch_weights_offline_names_the_model(tmp_path, capsys):
    params = (ROOT / "configs" / "digits_clip.yaml").read_text().replace("cache_dir: null", f"cache_dir: {tmp_path}")
    (tmp_path / "params.yaml").write_text(params)
    assert main(["fetch-weights", "--params", str(tmp_path / "params.yaml")]) == 1
    err = capsys.readouterr().err
    assert "uda-distill: error: teacher model 'ViT-B-16-quickgelu'" in err and "Traceback" not in err


def test_smoke_refuses_a_non_empty_workdir(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("user data")
    assert main(["smoke", "--workdir", str(tmp_path)]) == 1
    assert "is not empty; pass a new folder" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "user data"

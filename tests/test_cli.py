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
    assert "git checkout params.yaml" in err  # names the configuration that runs offline


def test_validate_stops_a_config_whose_weights_are_missing(tmp_path, capsys, monkeypatch):
    """The first stage of `dvc repro` checks the weights (the default's stand-ins are built later, so pass)."""
    from stages import validate

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    assert validate.main(["--params", "params.yaml"]) is None  # stand-ins: nothing to download
    clip = (ROOT / "configs" / "digits_clip.yaml").read_text().replace("cache_dir: null", f"cache_dir: {tmp_path}")
    (tmp_path / "clip.yaml").write_text(clip)
    assert validate.entry("validate", validate.main, ["--params", "clip.yaml"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "Traceback" not in err  # one message and the --debug hint
    assert "validate: error: teacher model 'ViT-B-16-quickgelu'" in err and "git checkout params.yaml" in err


def test_no_route_to_the_hub_means_the_cache_only(monkeypatch):
    """Without a route to the Hub, weights come from the cache at once (huggingface_hub would retry for ~50 s)."""
    import socket

    from huggingface_hub import constants

    from pipeline.models import factory

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: (_ for _ in ()).throw(OSError("unreachable")))
    seen = []
    monkeypatch.setattr(factory, "download_pretrained",
                        lambda cfg, cache_dir: seen.append(constants.HF_HUB_OFFLINE) or "/cached/weights.bin")
    spec = factory.ModelSpec(name="ViT-B-32", pretrained="openai", role="student")
    assert factory.check_weights_available(spec) == "/cached/weights.bin"
    assert seen == [True] and constants.HF_HUB_OFFLINE is False  # offline only during the call


def test_smoke_refuses_a_non_empty_workdir(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("user data")
    assert main(["smoke", "--workdir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "is not empty and was not made by `uda-distill smoke`" in err and "Traceback" not in err
    assert (tmp_path / "keep.txt").read_text() == "user data"


def test_version_and_a_description_for_every_command(capsys):
    import pytest

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("uda-distill ")
    commands = ("smoke", "fetch-weights", "info", "predict", "export", "server", "sweep")
    for name in commands:
        with pytest.raises(SystemExit):
            main([name, "--help"])
        usage, description = capsys.readouterr().out.split("\n\n")[:2]
        assert usage.startswith(f"usage: uda-distill {name}") and len(description.strip()) > 20, name
    with pytest.raises(SystemExit):
        main(["--help"])
    listing = capsys.readouterr().out.split("positional arguments:")[1]
    assert all(f"\n    {name}" in listing for name in commands)  # each with its summary line


def test_smoke_reruns_in_its_own_folder_and_honours_prefect_api_url(tmp_path, monkeypatch):
    from pipeline import smoke

    made = tmp_path / "earlier-smoke"
    made.mkdir()
    (made / smoke.MARKER).write_text("made by uda-distill smoke\n")
    (made / "dvc.lock").write_text("kept\n")
    assert smoke.prepare_workdir(made) == made and (made / "dvc.lock").read_text() == "kept\n"  # nothing recopied
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    env = smoke.smoke_env(made)
    assert env["PREFECT_API_URL"] == "http://127.0.0.1:4200/api"
    assert env.get("PREFECT_HOME") != str(made / ".prefect")  # the user's server, the user's Prefect home
    assert "http://127.0.0.1:4200/api" in smoke.prefect_target()
    monkeypatch.delenv("PREFECT_API_URL")
    assert smoke.smoke_env(made)["PREFECT_HOME"] == str(made / ".prefect")  # temporary servers: a home in the copy


def test_bare_pytest_imports_the_stages(tmp_path):
    """`pytest` (not `python -m pytest`) from the repository root: pyproject's pythonpath puts `stages` on the path."""
    import subprocess
    import sys

    probe = tmp_path / "test_probe.py"
    probe.write_text("import stages.validate\n\ndef test_probe():\n    assert stages.validate.STAGE == 'validate'\n")
    done = subprocess.run([str(Path(sys.executable).parent / "pytest"), "-q", "-p", "no:cacheprovider",
                           "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(ROOT), str(probe)],
                          cwd=ROOT, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stdout[-2000:]

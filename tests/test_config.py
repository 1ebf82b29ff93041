"""params.yaml validation: every problem is reported with its key, the value and what was expected."""
import copy
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, load_params, task_domains, validate_params

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def params():
    return yaml.safe_load((ROOT / "configs" / "digits_clip.yaml").read_text())


def _error(params) -> str:
    with pytest.raises(ConfigError) as info:
        validate_params(params)
    return str(info.value)


def test_shipped_params_are_valid():
    default = load_params(ROOT / "params.yaml")
    clip = load_params(ROOT / "configs" / "digits_clip.yaml")
    assert default["model"]["teacher"]["name"].startswith("local-dir:")  # the offline default: stand-ins
    assert clip["model"]["teacher"]["pretrained"] == "openai"
    assert set(clip) == set(default)  # the real-CLIP config has exactly the same keys


def test_tasks_are_a_dict_without_same_domain_pairs(params):
    assert isinstance(params["tasks"], dict) and len(params["tasks"]) >= 3
    assert all(t["source"] != t["target"] for t in params["tasks"].values())
    assert task_domains(params)["digits/mnist"] == ("digits", "mnist")


def test_unknown_key_names_the_key_and_allowed_keys(params):
    params["distill"]["epoch"] = 3
    msg = _error(params)
    assert "distill.epoch: unknown key" in msg and "'epochs'" in msg


def test_wrong_type_names_key_value_and_type(params):
    params["distill"]["epochs"] = "ten"
    assert "distill.epochs: expected an integer >= 1, got 'ten' (str)" in _error(params)
    params["distill"]["epochs"] = True  # a bool is not an integer here
    assert "distill.epochs" in _error(params)


def test_unknown_method_lists_allowed_values(params):
    params["distill"]["method"] = "magic"
    assert "distill.method: expected one of ['promptkd', 'ekda', 'dapl', 'cmkd', 'pda'], got 'magic'" in _error(params)


def test_missing_key(params):
    del params["prompts"]["lr"]
    assert "prompts.lr: missing" in _error(params)


@pytest.mark.parametrize("change, expected", [
    (lambda p: p["tasks"]["usps_to_mnist"].update(dataset="office"), "unknown dataset 'office'"),
    (lambda p: p["tasks"]["usps_to_mnist"].update(target="svhn"), "tasks.usps_to_mnist.target: unknown domain 'svhn'"),
    (lambda p: p["tasks"]["usps_to_mnist"].update(target="usps"), "source and target are both 'usps'"),
    (lambda p: p["data"]["datasets"]["digits"].update(domains=["mnist", "svhn"]), "unknown digits domain(s) ['svhn']"),
    (lambda p: p["runtime"].update(device="tpu"), "runtime.device: expected one of ['auto', 'cpu', 'cuda']"),
    (lambda p: p["data"]["datasets"]["digits"].update(format="imagenet"), "format: expected one of ['digits', 'office31'"),
    (lambda p: p["tasks"].update({"a/b": p["tasks"]["usps_to_mnist"]}), "'a/b': dataset and task names"),
    (lambda p: p["data"]["datasets"].update(toys=p["data"]["datasets"]["digits"]), "no class list"),
    (lambda p: p["features"]["templates"].append("a photo of {x}"), "exactly one '{}'"),
    (lambda p: p["prompts"].update(template="a photo"), "prompts.template: expected a prompt template"),
    (lambda p: p["prompts"]["coop"].update(n_ctx=0), "prompts.coop.n_ctx: expected an integer >= 1"),
    (lambda p: p["prompts"].update(kind="clip"), "prompts.kind: expected one of ['coop', 'cocoop', 'vpt'"),
    (lambda p: p["prompts"].update(kind="promptsrc"), "promptsrc is IVLP plus its self-regulating losses"),
    (lambda p: p["distill"].update(collapse_fraction=1.5), "distill.collapse_fraction: expected a number > 0.0 and <= 1.0"),
    (lambda p: p["distill"]["promptkd"]["loss"].update(name="mse"), "distill.promptkd.loss.name: expected one of ['kl', 'nd'"),
    (lambda p: p["distill"]["ekda"].update(lr=0.1), "distill.ekda.lr: unknown key"),
    (lambda p: p["distill"]["ekda"].update(n_tokens=0), "distill.ekda.n_tokens: expected an integer >= 1"),
    (lambda p: p["distill"]["promptkd"].update(n_tokens=0, depth=3), "distill.promptkd.depth: deep prompts need"),
])
def test_cross_checks(params, change, expected):
    change(params)
    assert expected in _error(params)


def test_standins_must_not_see_a_task_target():
    smoke = yaml.safe_load((ROOT / "params.yaml").read_text())
    target = next(iter(smoke["tasks"].values()))["target"]
    smoke["standins"]["domains"] = [target]
    assert f"standins.domains: {target!r} is the target of a task" in _error(smoke)


def test_every_problem_is_reported_at_once(params):
    bad = copy.deepcopy(params)
    bad["seed"] = -1
    bad["evaluate"]["batch_size"] = 0
    msg = _error(bad)
    assert "seed:" in msg and "evaluate.batch_size:" in msg


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("seed: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(tmp_path / "bad.yaml")


@pytest.mark.parametrize("name", ["params.yaml", "configs/digits_clip.yaml"])
def test_params_survive_dvc_exp_run_set(tmp_path, name):
    """`dvc exp run -S` rewrites params.yaml with its own YAML writer; the result must still load."""
    from dvc.utils.serialize import modify_yaml

    path = tmp_path / "params.yaml"
    path.write_text((ROOT / name).read_text())
    with modify_yaml(path) as data:
        data["distill"]["epochs"] = 2
    params = load_params(path)
    assert params["distill"]["epochs"] == 2
    assert params["model"] == load_params(ROOT / name)["model"]

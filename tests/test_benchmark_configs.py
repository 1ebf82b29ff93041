"""configs/<benchmark>.yaml: complete, valid params files declaring every standard task."""
from pathlib import Path

import pytest
import yaml

from pipeline.config import NAME, load_params
from pipeline.data.benchmark_configs import benchmark_params
from pipeline.data.benchmarks import benchmarks, standard_tasks

ROOT = Path(__file__).resolve().parent.parent
COUNTS = {"office31": 6, "office_home": 12, "visda": 1, "domainnet": 30, "mini_domainnet": 12}


@pytest.mark.parametrize("fmt", sorted(COUNTS))
def test_config_validates_and_declares_every_standard_task(fmt):
    params = load_params(ROOT / "configs" / f"{fmt}.yaml")
    assert set(params) == set(load_params(ROOT / "params.yaml"))  # a complete params file
    assert len(params["tasks"]) == COUNTS[fmt] and params["tasks"] == standard_tasks(fmt)
    pairs = {(t["source"], t["target"]) for t in params["tasks"].values()}
    domains = list(benchmarks()[fmt]["domains"])
    expected = {("train", "validation")} if fmt == "visda" else {(s, t) for s in domains for t in domains if s != t}
    assert pairs == expected
    assert all(NAME.fullmatch(name) for name in params["tasks"])  # usable as DVC / folder names
    (entry,) = params["data"]["datasets"].values()
    assert entry["format"] == fmt and entry["domains"] == domains


def test_generator_output_validates_for_the_current_params():
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    for fmt in benchmarks():
        assert benchmark_params(base, fmt)["tasks"] == standard_tasks(fmt)


@pytest.mark.parametrize("fmt, expected", [
    ("office_home", {"lr": 3e-6, "head_lr_multiplier": 1000.0, "epochs": 20, "iters_per_epoch": 500,
                     "template": "an image of a {}.", "augment": "cmkd", "lambda1": 0.25, "lambda3": 0.025,
                     "fixmatch": {"enabled": False, "threshold": 0.95, "weight": 0.5},
                     "rst": {"enabled": False, "threshold": 1e-6}}),
    ("visda", {"lr": 3e-7, "iters_per_epoch": 1000, "augment": "cmkd_visda", "template": "a photo of a {}.",
               "fixmatch": {"enabled": False, "threshold": 0.8, "weight": 2.0},
               "rst": {"enabled": False, "threshold": 1e-7}}),
    ("domainnet", {"epochs": 40, "iters_per_epoch": 1000, "lambda1": 0.025, "lambda2": 0.1, "lambda3": 0.0025,
                   "fixmatch": {"enabled": False, "threshold": 0.95, "weight": 0.1}}),
])
def test_configs_carry_the_published_settings(fmt, expected):
    params = load_params(ROOT / "configs" / f"{fmt}.yaml")
    cmkd = params["distill"]["cmkd"]
    assert {k: cmkd[k] for k in expected} == expected
    kd = {m: (params["distill"][m]["loss"]["weight"], params["distill"][m]["loss"]["reduction"])
          for m in ("promptkd", "ekda")}
    assert kd == {"promptkd": (1000.0, "numel"), "ekda": (100.0, "numel")}
    assert params["prompts"]["augment"] == params["distill"]["promptkd"]["augment"] == "dassl"


@pytest.mark.parametrize("fmt, expected", [  # confidence, warm-up, switch EPOCH, epochs
    ("office_home", (0.8, 0, 10, 10)), ("visda", (0.6, 0, 10, 10)), ("office31", (0.9, 1, 0, 20))])
def test_configs_carry_pdas_per_dataset_settings(fmt, expected):
    pda = load_params(ROOT / "configs" / f"{fmt}.yaml")["distill"]["pda"]
    assert (pda["threshold"], pda["warm_up"], pda["switch_epoch"], pda["epochs"]) == expected
    assert (pda["lr"], pda["batch_size"], pda["augment"], pda["coupled_depth"]) == (0.003, 32, "dassl", 7)

"""The method seam: registry entries, params blocks with defaults, the training shell."""
import copy

import numpy as np
import pytest
import torch

from pipeline.config import load_params, validate_params
from pipeline.methods import METHODS
from pipeline.methods.training import Prediction, Step, TrainingDiverged, fit


@pytest.fixture(scope="module")
def base():
    return load_params("configs/digits_clip.yaml")


def test_registry_names_roles_and_blocks():
    assert set(METHODS) >= {"promptkd", "ekda", "dapl"}
    for name, method in METHODS.items():
        assert method.name == name and method.summary
        assert set(method.roles) <= {"teacher", "student"} and method.roles
        assert set(method.params.defaults())  # every block has keys, each with a default


def test_a_left_out_method_block_gets_its_defaults(base):
    p = copy.deepcopy(base)
    del p["distill"]["dapl"]
    p["distill"]["ekda"] = {"n_tokens": 2}  # partial: the rest from the defaults
    validate_params(p)
    assert p["distill"]["dapl"] == METHODS["dapl"].params.defaults()
    assert p["distill"]["ekda"] == {**METHODS["ekda"].params.defaults(), "n_tokens": 2}


def test_unknown_method_key_is_an_error(base):
    p = copy.deepcopy(base)
    p["distill"]["dapl"]["n_ctxx"] = 3
    with pytest.raises(ValueError, match=r"distill.dapl.n_ctxx: unknown key; allowed keys here: \['augment', 'class_specific'"):
        validate_params(p)


def _toy(epochs, values, **kw):
    w = torch.nn.Parameter(torch.tensor([1.0]))
    opt = torch.optim.SGD([w], lr=0.25)
    calls = []

    def loss(batch, it):
        calls.append((it.epoch, it.t, batch))
        v = values(w, it)
        return v, {"loss": v.item()}

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
    out = fit(where="toy", epochs=epochs, batches=lambda e: [e * 10 + i for i in range(3)],
              steps=[Step("toy", loss, opt, sched, **kw)], predict=lambda: Prediction(["a", "b"], np.array([0, 1])),
              state=lambda: {"w": w.detach().clone()}, n_classes=2, collapse_fraction=1.0)
    return out, calls, w, opt


def test_fit_runs_steps_schedules_and_logs():
    out, calls, w, opt = _toy(2, lambda w, it: (w ** 2).sum())
    assert [c[:2] for c in calls] == [(1, 0), (1, 1), (1, 2), (2, 3), (2, 4), (2, 5)]
    assert [c[2] for c in calls] == [10, 11, 12, 20, 21, 22]
    # per-epoch scheduler: lr 0.25 during epoch 1, 0.125 during epoch 2; each update w <- w (1 - 2 lr)
    assert out["log"][0]["lr"] == 0.25 and out["log"][1]["lr"] == 0.125
    assert w.item() == pytest.approx(0.5 ** 3 * 0.75 ** 3)
    assert out["log"][0]["iterations"] == 3 and out["predictions"].shape == (2, 2)
    per_it, _, w2, opt2 = _toy(1, lambda w, it: (w ** 2).sum(), per="iteration")
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.25 / 4)  # stepped after each of the 3 updates


def test_fit_stops_on_a_non_finite_loss():
    with pytest.raises(TrainingDiverged, match="toy toy step, epoch 1: loss is nan"):
        _toy(1, lambda w, it: w.sum() * float("nan"))

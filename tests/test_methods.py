"""Source prompt pretraining (CoOp, VPT, SCL, GPA) and PromptKD distillation on tiny real digits shards."""
import csv
import logging
import subprocess

import numpy as np
import pytest
import torch
from conftest import copy_without_labels

from pipeline.data.classlists import load_classlist, prompt_name
from pipeline.data.shards import read_labels
from pipeline.features.cache import encode_images, logits
from pipeline.methods.curves import curve_values, write_curves
from pipeline.methods.training import Prediction, Step, TrainingDiverged, agreement, check_finite, fit
from pipeline.losses import LOSS_DEFAULTS, build_distill_loss
from pipeline.methods.promptkd import distill_promptkd
from pipeline.methods.shared import KeyedRows
from pipeline.methods.source_prompts import train_source_prompts
from pipeline.models.factory import ModelSpec, load_model

NAMES = [prompt_name(c) for c in load_classlist("digits")]


ARCHITECTURE = ("template", "n_ctx", "init", "class_specific", "visual_tokens", "visual_location")
PROMPTS = dict(template="a photo of the number {}.", n_ctx=4, init="word", class_specific=False, visual_tokens=0,
               visual_location="middle", text_weight=0.0, image_weight=0.0, kl_weight=0.0, gpa_mean=0.0, gpa_std=1.0)


def _coop(teacher, shards, zs_text=None, **kw):
    args = dict(teacher_model=teacher, classnames=NAMES, shard_dir=shards, zs_text=zs_text, epochs=4,
                batch_size=16, lr=0.5, momentum=0.9, weight_decay=0.0, seed=3, device="cpu")
    config = {**PROMPTS, **{k: v for k, v in kw.items() if k in PROMPTS}}
    architecture = {k: config.pop(k) for k in ARCHITECTURE}
    return train_source_prompts(architecture=architecture, config=config,
                                **{**args, **{k: v for k, v in kw.items() if k not in PROMPTS}})


def _ctx(out):
    return torch.stack([s["ctx"] for s in out["states"]])


def test_coop_learns_the_context_and_is_repeatable(teacher, digits_shards):
    out = _coop(teacher, digits_shards["usps"])
    assert _ctx(out).shape == (4, 4, 64) and out["n_source"] == 60 and out["trainable_params"] == 4 * 64
    assert set(out["reported"]) == {"ctx"} and torch.equal(out["reported"]["ctx"], _ctx(out)[-1])
    assert out["log"][-1]["loss"] < out["log"][0]["loss"]  # CE on the source goes down
    assert not torch.equal(_ctx(out)[0], _ctx(out)[-1])
    again = _coop(teacher, digits_shards["usps"])
    assert torch.equal(_ctx(out), _ctx(again))  # seeded: same result on CPU
    assert all(not p.requires_grad for p in teacher.model.parameters())


def test_promptkd_distills_from_cached_logits_without_labels(teacher, student, digits_shards, tmp_path):
    shards = digits_shards["mnist"]
    keys, feats = encode_images(teacher, shards, batch_size=32, device="cpu")
    W = np.eye(10, 64, dtype=np.float32)  # any fixed unit class vectors
    cached = KeyedRows(keys, logits(feats, W, 20.0))
    garbage = copy_without_labels(shards, tmp_path / "shards")  # a distillation that read labels would crash
    loss = build_distill_loss({**LOSS_DEFAULTS, "temperature": 2.0}, n_classes=10, feature_dim=64)
    args = dict(student_model=student, class_vectors=W, logit_scale=20.0, teacher_logits=cached,
                teacher_features=None, loss=loss, shard_dir=garbage, epochs=3, batch_size=16, lr=0.05,
                momentum=0.9, weight_decay=0.0, n_tokens=2, location="append", depth=2, seed=0, device="cpu",
                checkpoint_path=tmp_path / "ckpt.pt")
    out = distill_promptkd(**args)
    assert out.predictions.shape == (3, 60) and out.keys == keys
    assert out.log[-1]["loss"] < out.log[0]["loss"] and out.log_extra["loss"] == "kl"  # train_log names the loss
    teacher_pred = cached(keys).argmax(1).numpy()
    assert (out.predictions[-1] == teacher_pred).mean() > (out.predictions[0] == teacher_pred).mean() - 0.05
    # the logged agreement is with the cached teacher's arg-max, over every target image
    assert [e["agreement_with_teacher"] for e in out.log] == \
        [round(100 * float((p == teacher_pred).mean()), 2) for p in out.predictions]
    # trainable: prompts 2x2x32 + projector 32->64 (linear, BN, linear)
    assert out.trainable_params == 2 * 2 * 32 + (32 * 64 + 64) + 2 * 64 + (64 * 64 + 64)
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["epoch"] == 3
    again = distill_promptkd(**{**args, "checkpoint_path": None})  # the same path would resume the finished run
    assert np.array_equal(out.predictions, again.predictions)


def test_missing_teacher_logits_name_the_key():
    cached = KeyedRows(["a/1", "b/2"], np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(KeyError, match="no cached teacher logits for sample 'c/3'"):
        cached(["a/1", "c/3"])
    with pytest.raises(ValueError, match="2 keys but 1 rows"):
        KeyedRows(["a", "b"], np.zeros((1, 3)))


def test_nan_guard_names_where_and_checkpoint():
    with pytest.raises(TrainingDiverged, match="distill epoch 2: loss is nan .* kept at ckpt.pt"):
        check_finite(torch.tensor(float("nan")), where="distill epoch 2", checkpoint="ckpt.pt")


def test_class_specific_context_has_one_context_per_class(teacher, digits_shards):
    out = _coop(teacher, digits_shards["usps"], class_specific=True, epochs=2)
    assert _ctx(out).shape == (2, 10, 4, 64)
    assert not torch.equal(_ctx(out)[-1, 0], _ctx(out)[-1, 1])  # classes moved apart


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_student_trains_under_autocast_precision_and_records_it(digits_shards, precision):
    torch.manual_seed(1)
    student = load_model(ModelSpec(name="digits-vit-student", pretrained="random", precision=precision))
    assert student.identity["precision"] == precision  # travels into every checkpoint with the identity
    shard_keys, _ = read_labels(digits_shards["mnist"])  # keys only: the test sets its own teacher logits
    W = np.eye(10, 64, dtype=np.float32)
    z_t = np.random.default_rng(0).normal(size=(60, 10)).astype(np.float32) * 5
    out = distill_promptkd(student_model=student, class_vectors=W, logit_scale=20.0,
                           teacher_logits=KeyedRows(shard_keys, z_t), teacher_features=None,
                           loss=build_distill_loss(LOSS_DEFAULTS, n_classes=10, feature_dim=64),
                           shard_dir=digits_shards["mnist"], epochs=1, batch_size=16, lr=0.05, momentum=0.9,
                           weight_decay=0.0, n_tokens=2, location="middle", depth=0, seed=0, device="cpu")
    assert np.isfinite(out.log[0]["loss"]) and out.predictions.shape == (1, 60)
    assert out.state["student"]["encoder.prompts"].shape == (2, 2, 32)  # depth 0: every layer (2 here)


def test_promptkd_student_trains_on_seeded_train_views(student, digits_shards):
    shard_keys, _ = read_labels(digits_shards["mnist"])
    z_t = np.random.default_rng(0).normal(size=(60, 10)).astype(np.float32) * 5
    args = dict(student_model=student, class_vectors=np.eye(10, 64, dtype=np.float32), logit_scale=20.0,
                teacher_logits=KeyedRows(shard_keys, z_t), teacher_features=None,
                loss=build_distill_loss(LOSS_DEFAULTS, n_classes=10, feature_dim=64), shard_dir=digits_shards["mnist"],
                epochs=1, batch_size=16, lr=0.05, momentum=0.9, weight_decay=0.0, n_tokens=2, location="append",
                depth=1, seed=0, device="cpu")
    a, b, plain = (distill_promptkd(**args, augment=x) for x in ("dassl", "dassl", "none"))
    prompts = lambda r: r.state["student"]["encoder.prompts"]  # noqa: E731
    assert torch.equal(prompts(a), prompts(b)) and not torch.equal(prompts(a), prompts(plain))


# --- the per-epoch record: agreement with the teacher, the log line, the DVCLive curves ----------------------

def _toy_fit(checkpoint_path=None, epochs=2):
    """fit() on one parameter; every epoch predicts [0, 1, 1, 0] where the teacher says [0, 1, 0, 0]."""
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)

    def step(_batch, _it):
        value = (weight ** 2).sum()
        return value, {"loss": value.item()}

    def predict():
        return Prediction(["a", "b", "c", "d"], np.array([0, 1, 1, 0]), reference=np.array([0, 1, 0, 0]))

    return fit(where="toy", epochs=epochs, batches=lambda _e: range(3), steps=[Step("toy", step, optimizer, scheduler)],
               predict=predict, state=lambda: {"w": weight.detach().clone()}, n_classes=2,
               checkpoint_path=checkpoint_path)


def test_agreement_with_the_teacher_by_hand():
    assert agreement(np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0])) == 75.0
    assert agreement(np.array([2, 2, 2]), np.array([1, 2, 0])) == 33.33
    with pytest.raises(ValueError, match=r"toy: predictions of shape \(3,\) but a teacher reference of shape \(2,\)"):
        agreement(np.zeros(3), np.zeros(2), where="toy")


def test_the_epoch_log_line_has_loss_lr_agreement_and_top_class_fraction(caplog):
    with caplog.at_level(logging.INFO, logger="pipeline.methods.training"):
        out = _toy_fit()
    assert [e["agreement_with_teacher"] for e in out["log"]] == [75.0, 75.0]
    assert [e["top_class_fraction"] for e in out["log"]] == [0.5, 0.5]
    lines = [r.getMessage() for r in caplog.records if r.name == "pipeline.methods.training"]
    assert len(lines) == 2 and lines[1].startswith("toy: epoch 2/2 done in ")
    for value in (f"loss {out['log'][1]['loss']:.4g}", "lr 0.05", "agreement_with_teacher 75",
                  "top_class_fraction 0.5"):
        assert value in lines[1], (value, lines[1])


def test_curves_are_dvclive_tsvs_with_one_row_per_epoch(tmp_path, monkeypatch):
    """From a recorded log, in a git repository without commits (DVCLive's repository hooks would fail there)."""
    monkeypatch.chdir(tmp_path)
    subprocess.run(["git", "init", "-q"], check=True)
    log = _toy_fit(epochs=3)["log"]
    names = write_curves(log, tmp_path / "curves" / "a_to_b")
    assert names == ["loss", "lr", "top_class_fraction", "agreement_with_teacher"]
    folder = tmp_path / "curves" / "a_to_b"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == \
        sorted(f"plots/metrics/{n}.tsv" for n in names)  # no dvc.yaml, report or summary metrics.json
    with open(folder / "plots" / "metrics" / "lr.tsv", newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t"))
    assert rows[0] == ["step", "lr"]
    assert [(int(s), float(v)) for s, v in rows[1:]] == [(1, 0.1), (2, 0.05), (3, 0.025)]  # step = epoch
    assert not (tmp_path / ".dvc").exists()


def test_curves_skip_bookkeeping_and_keep_every_loss_and_learning_rate():
    entry = {"epoch": 1, "teacher_loss": 2.0, "source_acc": 90.0, "student_loss": 1.0, "agreement": 80.0,
             "lr_teacher": 0.01, "lr_student": 0.1, "iterations": 4, "seconds": 1.5, "top_class_fraction": 0.2,
             "agreement_with_teacher": 70.0}
    assert list(curve_values(entry)) == ["teacher_loss", "student_loss", "lr_teacher", "lr_student",
                                         "top_class_fraction", "agreement_with_teacher"]
    assert list(curve_values({"epoch": 1, "total": 3.0, "lr": 0.1, "gini": 0.4})) == ["total", "lr"]  # CMKD

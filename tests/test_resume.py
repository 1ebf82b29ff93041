"""Resuming interrupted training exactly, the keyed resume area of a stage item, and checkpoint loading.

Each method trains E epochs uninterrupted; then a run is stopped before the snapshot of epoch k+1 (as a
kill would) and run again: it must train only epochs k+1..E and end with the uninterrupted run's
predictions, extra predictions, log (but ``seconds``) and state, bit for bit.
"""
import copy
import logging

import numpy as np
import pytest
import torch

from pipeline.artifacts import Artifacts, keys_digest
from pipeline.data.classlists import load_classlist, prompt_name
from pipeline.data.shards import read_labels, shard_keys
from pipeline.features.cache import encode_images, logits, zero_shot_vectors
from pipeline.io import CheckpointError, atomic_write_json, load_checkpoint
from pipeline.losses import LOSS_DEFAULTS, build_distill_loss
from pipeline.methods import METHODS
from pipeline.methods.base import TaskJob
from pipeline.methods.dapl import naive_probabilities, train_dapl
from pipeline.methods.ekda import train_ekda
from pipeline.methods.promptkd import distill_promptkd
from pipeline.methods.refine import KnnRefiner
from pipeline.methods.shared import KeyedRows
from pipeline.methods.source_prompts import train_source_prompts
from pipeline.methods.training import EpochRecorder, Prediction, Step, fit
from pipeline.resume import ItemResume, clear_stage, item_resume, resume_key

NAMES = [prompt_name(c) for c in load_classlist("digits")]
TEMPLATE = "a photo of the number {}."
EPOCHS, STOP_AFTER = 3, 1


class Killed(Exception):
    """Stands for a kill between the end of an epoch's training and its snapshot."""


@pytest.fixture(scope="module")
def cached(teacher, digits_shards):
    out = {d: encode_images(teacher, digits_shards[d], batch_size=32, device="cpu") for d in ("usps", "mnist")}
    out["zs"] = zero_shot_vectors(teacher, NAMES, [TEMPLATE], device="cpu")
    return out


def _interrupt_then_resume(run, path, monkeypatch, caplog):
    """Run ``run(path)`` killed before the snapshot of epoch k+1, then again; return the resumed result."""
    real = EpochRecorder.add

    def killed(self, epoch, *args, **kw):
        if epoch == STOP_AFTER + 1:
            raise Killed
        return real(self, epoch, *args, **kw)

    monkeypatch.setattr(EpochRecorder, "add", killed)
    with pytest.raises(Killed):
        run(path)
    assert torch.load(path, weights_only=True)["epoch"] == STOP_AFTER
    trained = []

    def counted(self, epoch, *args, **kw):
        trained.append(epoch)
        return real(self, epoch, *args, **kw)

    monkeypatch.setattr(EpochRecorder, "add", counted)
    with caplog.at_level(logging.INFO, logger="pipeline.resume"):
        resumed = run(path)
    assert trained == list(range(STOP_AFTER + 1, EPOCHS + 1))  # only the epochs after the snapshot
    assert f"resuming from {path} after epoch {STOP_AFTER} of {EPOCHS}" in caplog.text
    return resumed


def _without_seconds(log):
    return [{k: v for k, v in entry.items() if k != "seconds"} for entry in log]


def _same_tensors(a, b):
    if isinstance(a, dict):
        assert set(a) == set(b)
        for k in a:
            _same_tensors(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same_tensors(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


def _assert_same_result(full, resumed):
    assert resumed.keys == full.keys and np.array_equal(resumed.predictions, full.predictions)
    assert set(resumed.extra_predictions) == set(full.extra_predictions)
    for name, preds in full.extra_predictions.items():
        assert np.array_equal(resumed.extra_predictions[name], preds)
    assert _without_seconds(resumed.log) == _without_seconds(full.log)
    _same_tensors(resumed.state, full.state)
    if full.class_vectors is not None:
        assert np.array_equal(resumed.class_vectors, full.class_vectors)


def _check_method(run, tmp_path, monkeypatch, caplog):
    full = run(None)
    resumed = _interrupt_then_resume(run, tmp_path / "resume.pt", monkeypatch, caplog)
    _assert_same_result(full, resumed)  # the logs too: agreement_with_teacher survives a resume
    assert all(0 <= e["agreement_with_teacher"] <= 100 for e in full.log)  # every method names its teacher
    return full


def test_promptkd_resumes_exactly(student, teacher, digits_shards, cached, tmp_path, monkeypatch, caplog):
    keys, feats = cached["mnist"]
    W = np.eye(10, 64, dtype=np.float32)

    def run(path):
        return distill_promptkd(
            student_model=student, class_vectors=W, logit_scale=20.0,
            teacher_logits=KeyedRows(keys, logits(feats, W, 20.0)),
            teacher_features=None, loss=build_distill_loss(LOSS_DEFAULTS, n_classes=10, feature_dim=64),
            shard_dir=digits_shards["mnist"], epochs=EPOCHS, batch_size=16, lr=0.05, momentum=0.9, weight_decay=0.0,
            n_tokens=2, location="append", depth=2, seed=0, device="cpu", checkpoint_path=path, augment="dassl")

    _check_method(run, tmp_path, monkeypatch, caplog)


def test_ekda_with_a_refiner_resumes_exactly(teacher, student, digits_shards, cached, tmp_path, monkeypatch, caplog):
    s_keys, s_feats = cached["usps"]
    t_keys, t_feats = cached["mnist"]
    ekda = dict(template=TEMPLATE, n_ctx=2, init="random", visual_tokens=2, teacher_lr=0.01, text_weight=25.0,
                image_weight=10.0, kl_weight=1.0, ce_weight=1.0, align_weight=1.0)

    def run(path):  # the refiner's bank changes with every batch: it is resume state
        refiner = KnnRefiner(t_keys, t_feats, np.full((60, 10), 0.1, dtype=np.float32), k=5)
        return train_ekda(
            teacher_model=teacher, student_model=student, classnames=NAMES, source_dir=digits_shards["usps"],
            target_dir=digits_shards["mnist"], zs_text=cached["zs"], source_zs_features=KeyedRows(s_keys, s_feats),
            ekda=ekda, loss=build_distill_loss(LOSS_DEFAULTS, n_classes=10, feature_dim=64), epochs=EPOCHS,
            batch_size=24, lr=0.05, momentum=0.9, weight_decay=0.0, n_tokens=2, location="middle", depth=2, seed=0,
            device="cpu", refiner=refiner, checkpoint_path=path)

    _check_method(run, tmp_path, monkeypatch, caplog)


@pytest.mark.parametrize("augment", ["none", "dassl"])
def test_dapl_resumes_exactly(teacher, digits_shards, cached, augment, tmp_path, monkeypatch, caplog):
    s_keys, s_feats = cached["usps"]
    by_key = dict(zip(*read_labels(digits_shards["usps"])))
    t_keys, t_feats = cached["mnist"]
    dapl = dict(n_ctx=2, n_domain_ctx=2, class_specific=False, naive_template=TEMPLATE, threshold=0.0,
                temperature=1.0, target_weight=1.0)
    augmented = None if augment == "none" else {"source_dir": digits_shards["usps"],
                                                "target_dir": digits_shards["mnist"], "augment": augment,
                                                "num_workers": 0}

    def run(path):  # batch 24: the target stream restarts mid-epoch (60 target rows, 60 source rows per epoch)
        return train_dapl(
            model=teacher, classnames=NAMES, domains=("usps", "mnist"), source_features=s_feats,
            source_labels=np.array([int(by_key[k]) for k in s_keys]), target_keys=t_keys, target_features=t_feats,
            naive_probs=naive_probabilities(t_feats, cached["zs"], scale=teacher.logit_scale, temperature=1.0),
            dapl=dapl, epochs=EPOCHS, batch_size=24, lr=0.5, momentum=0.9, weight_decay=0.0, seed=0, device="cpu",
            checkpoint_path=path, augmented=augmented)

    full = _check_method(run, tmp_path, monkeypatch, caplog)
    naive = naive_probabilities(t_feats, cached["zs"], scale=teacher.logit_scale, temperature=1.0).argmax(1)
    assert [e["agreement_with_teacher"] for e in full.log] == \
        [round(100 * float((p == naive).mean()), 2) for p in full.predictions]  # the naive prompt's pseudo-labels


def _cmkd_job(student, digits_shards, tmp_path, block, path):
    """A distill TaskJob for CMKD on usps -> mnist, with the features-stage metadata it reads."""
    shards = tmp_path / "shards" / "digits"
    if not shards.exists():
        shards.mkdir(parents=True)
        for domain in ("usps", "mnist"):
            (shards / domain).symlink_to(digits_shards[domain])
    artifacts = Artifacts({"shards": str(tmp_path / "shards"), "features": str(tmp_path / "features")})
    keys = {side: shard_keys(digits_shards[domain]) for side, domain in (("source", "usps"), ("target", "mnist"))}
    atomic_write_json(artifacts.features.task("t").meta_path,
                      {"classes": load_classlist("digits"), "logit_scale": 20.0,
                       "keys": {side: keys_digest(k) for side, k in keys.items()}})
    params = {"seed": 0, "runtime": {"deterministic": True, "num_workers": 0}, "evaluate": {"batch_size": 32},
              "distill": {"method": "cmkd", "collapse_fraction": 1.0, "cmkd": block}}
    return TaskJob(name="t", task={"dataset": "digits", "source": "usps", "target": "mnist"}, params=params,
                   models={"student": student}, device="cpu", artifacts=artifacts, checkpoint_path=path)


@pytest.mark.parametrize("rst", [False, True])
def test_cmkd_resumes_exactly_mid_pass(student, digits_shards, tmp_path, rst, monkeypatch, caplog):
    block = copy.deepcopy(METHODS["cmkd"].params.defaults())
    # 3 iterations of 8 per epoch and 7 full batches per pass: epochs end in the middle of a pass
    block.update(lr=1e-3, head_lr_multiplier=10.0, batch_size=8, epochs=EPOCHS, iters_per_epoch=3)
    block["rst"]["enabled"] = rst
    block["fixmatch"]["enabled"] = rst  # the strong view's stream too, once

    def run(path):
        return METHODS["cmkd"].run(_cmkd_job(student, digits_shards, tmp_path, block, path))

    full = _check_method(run, tmp_path, monkeypatch, caplog)
    assert set(full.extra_predictions) == {"clip_adapted", "head_plus_clip", "clip_zeroshot"}
    clip = full.extra_predictions["clip_adapted"]  # the CLIP head g: the teacher of the task head h
    assert [e["agreement_with_teacher"] for e in full.log] == \
        [round(100 * float((h == g).mean()), 2) for h, g in zip(full.predictions, clip)]


def test_source_prompts_with_gpa_resume_exactly(teacher, digits_shards, tmp_path, monkeypatch, caplog):
    config = dict(text_weight=0.0, image_weight=0.0, kl_weight=0.0, gpa_mean=2.0, gpa_std=1.0)

    def run(path):  # cached features: batches come from a seeded generator that spans the epochs
        return train_source_prompts(teacher_model=teacher, classnames=NAMES, shard_dir=digits_shards["usps"],
                                    architecture=dict(template=TEMPLATE, n_ctx=2), config=config, zs_text=None, epochs=EPOCHS, batch_size=16, lr=0.5, momentum=0.9,
                                    weight_decay=0.0, seed=0, device="cpu", checkpoint_path=path)

    full = run(None)
    resumed = _interrupt_then_resume(run, tmp_path / "resume.pt", monkeypatch, caplog)
    _same_tensors(resumed["states"], full["states"])  # every epoch's prompts, so GPA aggregates the same
    _same_tensors(resumed["reported"], full["reported"])
    assert _without_seconds(resumed["log"]) == _without_seconds(full["log"])
    assert resumed["n_source"] == full["n_source"] == 60


def _toy_fit(path, epochs=2):
    w = torch.nn.Parameter(torch.tensor([1.0]))
    opt = torch.optim.SGD([w], lr=0.25)
    module = torch.nn.Module()
    module.w = w
    return fit(where="toy", epochs=epochs, batches=lambda e: [0, 1], checkpoint_path=path, modules={"m": module},
               steps=[Step("toy", lambda b, it: ((w ** 2).sum(), {}), opt)], state=lambda: {"m": {"w": w.detach()}},
               predict=lambda: Prediction(["a", "b"], np.array([0, 1])), n_classes=2)


def test_a_corrupt_snapshot_is_ignored_and_training_starts_fresh(tmp_path, caplog):
    path = tmp_path / "resume-0123456789ab.pt"
    full = _toy_fit(path)
    path.write_bytes(path.read_bytes()[:100])  # truncated, as a full disk would leave it
    with caplog.at_level(logging.WARNING, logger="pipeline.resume"):
        again = _toy_fit(path)
    assert f"toy: {path}: cannot be read as a training snapshot" in caplog.text
    assert "it is ignored and training starts from epoch 1" in caplog.text
    assert [e["epoch"] for e in again["log"]] == [1, 2] and torch.load(path, weights_only=True)["epoch"] == 2
    assert _without_seconds(again["log"]) == _without_seconds(full["log"])


def test_load_checkpoint_names_the_file_and_never_suggests_unsafe_loading(tmp_path):
    truncated, pickled = tmp_path / "student.pt", tmp_path / "prompt.pt"
    torch.save({"w": torch.ones(3)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    torch.save({"classes": np.arange(3)}, pickled)  # a numpy array: refused by the weights-only unpickler
    for path in (truncated, pickled, tmp_path / "missing.pt"):
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path, what="the prompts stage's prompt.pt", fix="re-run `dvc repro prompts`")
        message = str(info.value)
        assert str(path) in message and "prompt.pt" in message and "dvc repro prompts" in message
        assert "weights_only" not in message  # neither torch's advice to load unsafely nor any hint of it
        assert info.value.__cause__ is None and info.value.__suppress_context__  # torch's advice is not printed
    torch.save({"w": torch.ones(1)}, tmp_path / "ok.pt")
    assert torch.equal(load_checkpoint(tmp_path / "ok.pt", what="x", fix="y")["w"], torch.ones(1))


# ------------------------------------------------------------------------------------ the resume area

def _params(tmp_path, **distill):
    return {"paths": {"checkpoints": str(tmp_path / "ckpt"), "shards": str(tmp_path / "shards"),
                      "standins": str(tmp_path / "standins"), "features": str(tmp_path / "features")},
            "tasks": {"a": {"dataset": "digits", "source": "usps", "target": "mnist"}},
            "distill": {"method": "promptkd", "lr": 0.1, **distill}, "model": {"teacher": {}, "student": {}},
            "seed": 0, "seeds": None, "evaluate": {"batch_size": 8}, "runtime": {"deterministic": True, "num_workers": 0}}


def test_the_key_follows_declared_params_of_the_item_and_its_inputs(tmp_path):
    inputs = [tmp_path / "manifest.json"]
    inputs[0].write_text("{}")
    key = lambda p: resume_key(stage="distill", item="a", params=p, inputs=inputs)  # noqa: E731
    base = key(_params(tmp_path))
    assert key(_params(tmp_path)) == base and len(base) == 64
    assert key(_params(tmp_path, lr=0.2)) != base  # a param the stage declares
    more = _params(tmp_path)
    more["tasks"]["b"] = {"dataset": "digits", "source": "mnist", "target": "usps"}
    assert key(more) == base  # another task's entry is not this item's business
    inputs[0].write_text('{"shards": []}')
    assert key(_params(tmp_path)) != base  # an input changed


def test_byte_code_and_temporaries_do_not_change_the_key(tmp_path):
    (tmp_path / "m.py").write_text("x = 1\n")
    key = lambda: resume_key(stage="distill", item="a", params=_params(tmp_path), inputs=[tmp_path])  # noqa: E731
    base = key()
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "m.cpython-311.pyc").write_bytes(b"written by the first run")
    (tmp_path / ".features.npy.tmp-1").write_bytes(b"left by a kill")
    assert key() == base
    (tmp_path / "m.py").write_text("x = 2\n")
    assert key() != base


def test_finished_items_are_reused_and_other_keys_dropped(tmp_path, caplog):
    params = _params(tmp_path)
    area = item_resume(params, "distill", "a", inputs=[], label="task a")
    stale = ItemResume(area.dir, "f" * 64, "task a")
    stale.dir.mkdir(parents=True)
    stale.snapshot.write_bytes(b"old run")

    def work(out):
        def write():
            out.mkdir(parents=True)
            (out / "student.pt").write_bytes(b"weights")
            area.snapshot.write_bytes(b"snapshot")  # what fit would have left
            return {"acc": 1.5}
        return write

    with caplog.at_level(logging.INFO, logger="pipeline.resume"):
        assert area.run(tmp_path / "run1" / "a", work(tmp_path / "run1" / "a")) == {"acc": 1.5}
    assert f"task a: resume state at {stale.snapshot} was made with other params/inputs; starting from epoch 1" \
        in caplog.text
    assert not stale.snapshot.exists() and not area.snapshot.exists()  # the finished item needs no snapshot
    failing = lambda: pytest.fail("a finished item must not train again")  # noqa: E731
    with caplog.at_level(logging.INFO, logger="pipeline.resume"):
        assert area.run(tmp_path / "run2" / "a", failing) == {"acc": 1.5}
    assert f"task a: reusing finished outputs from {area.finished}" in caplog.text
    assert (tmp_path / "run2" / "a" / "student.pt").read_bytes() == b"weights"
    clear_stage(params, "distill", params["tasks"])
    assert not (tmp_path / "ckpt" / "distill").exists()


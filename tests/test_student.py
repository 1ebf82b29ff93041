"""Student bundles: write/read, base checks, the model card, predict and the exports, on tiny models (CPU, seconds).

The same paths run on real pipeline outputs for every method in tests/test_smoke.py.
"""
import copy
import csv
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from pipeline.config import load_params
from pipeline.methods.classifiers import CosineClassifier
from pipeline.methods.cmkd import TaskHead
from pipeline.methods.shared import make_student
from pipeline.models.factory import ModelSpec, ModelWeightsError, load_model, model_config, save_local_dir
from pipeline.models.residual import residual_tensors
from pipeline.student import export as export_module
from pipeline.student.bundle import (Bundle, BundleError, bundle_config, bundle_state, flatten, unflatten,
                                     write_bundle)
from pipeline.student.card import model_card
from pipeline.student.export import ParityError, export_bundle
from pipeline.student.predict import predict, render, write_rows

CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
EVALUATION = {"models": {"student": {"target": {
    "per_epoch": [40.0, 52.5, 50.0], "last": {"acc": 50.0, "mean_class_acc": 49.5, "n": 200},
    "best": {"acc": 52.5, "mean_class_acc": 52.0, "n": 200}, "best_epoch": 2}}},
    "headline": "acc", "protocol": "transductive UDA"}


def _local_dir(model, folder):
    save_local_dir(model.model, model_config(model.spec), folder)
    return load_model(ModelSpec(name=f"local-dir:{folder}", role="student"))


@pytest.fixture(scope="module")
def base(student, tmp_path_factory):
    """The tiny student architecture (random weights) as a local-dir model, as the stand-ins are."""
    return _local_dir(student, tmp_path_factory.mktemp("base") / "student")


def _params(method, **block):
    params = load_params("params.yaml")
    params["distill"]["method"] = method
    params["distill"][method].update(block)
    return params


def _checkpoint(method, state, params, base, class_vectors, **extra):
    return {"method": method, "state": state, "classes": CLASSES, "logit_scale": 20.0,
            "class_vectors": class_vectors, "models": {"student": base.identity}, "cached_teacher": {},
            "distill": params["distill"], "task": {"dataset": "digits", "source": "usps", "target": "mnist"},
            **extra}


def _write(folder, checkpoint, params, base):
    config = bundle_config(name="usps_to_mnist", checkpoint=checkpoint, base=base, params=params,
                           evaluation=EVALUATION)
    write_bundle(folder, config=config, state=bundle_state(checkpoint), card=model_card(config))
    return folder


@pytest.fixture(scope="module")
def promptkd_bundle(base, tmp_path_factory):
    """A promptkd bundle with non-trivial trained parts (prompts, projector incl. BN statistics)."""
    torch.manual_seed(3)
    params = _params("promptkd", n_tokens=2, depth=2)
    W = F.normalize(torch.randn(10, 24), dim=-1)
    s = make_student(base.model.visual, teacher_dim=24, n_tokens=2, location="append", depth=2)
    s.train()
    s(torch.randn(8, 3, 32, 32))  # moves the projector's BatchNorm statistics away from their init
    s.eval()
    eager = CosineClassifier(s, W, 20.0).eval()
    checkpoint = _checkpoint("promptkd", {"student": s.trainable_state(), "loss": {}}, params, base, W)
    folder = _write(tmp_path_factory.mktemp("bundles") / "promptkd", checkpoint, params, base)
    return folder, eager


@pytest.fixture()
def images(tmp_path):
    """A folder of 5 new images (varied sizes) and one corrupt file."""
    folder = tmp_path / "new"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(5):
        size = 20 + 7 * i
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
            folder / ("sub" if i % 2 else "") / f"img{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    return folder


def test_flatten_round_trip():
    nested = {"student": {"encoder.prompts": torch.ones(2, 3)}, "class_vectors": torch.zeros(4, 2)}
    flat = flatten(nested)
    assert sorted(flat) == ["class_vectors", "student/encoder.prompts"]
    assert torch.equal(unflatten(flat)["student"]["encoder.prompts"], torch.ones(2, 3))


def test_bundle_holds_only_trained_parts_and_reproduces_the_student(promptkd_bundle, base):
    folder, eager = promptkd_bundle
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "model.safetensors"))  # no pickle anywhere
    assert "class_vectors" in tensors and "student/encoder.prompts" in tensors
    assert not any("transformer" in k for k in tensors)  # the frozen backbone is not copied
    config = json.loads((folder / "config.json").read_text())
    assert config["base"]["weights_sha256"] and config["base"]["preprocess"]["size"] == [32, 32]
    assert config["classes"] == CLASSES and config["metrics"]["last"] == {"epoch": 3, "acc": 50.0,
                                                                          "mean_class_acc": 49.5, "n": 200}
    x = torch.randn(5, 3, 32, 32)
    student = Bundle.read(folder).load()
    with torch.no_grad():
        assert torch.equal(student.model(x), eager(x))


def test_model_card_metadata(promptkd_bundle):
    from huggingface_hub import ModelCard

    folder, _ = promptkd_bundle
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "open_clip" and card.data.license == "mit"
    assert {"uda-distill", "promptkd"} <= set(card.data.tags)
    values = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert values == {"accuracy (last epoch, reported)": 50.0, "mean class accuracy (last epoch)": 49.5,
                      "accuracy (best epoch, oracle)": 52.5}
    assert "oracle" in card.text and "Transductive" in card.text and "mnist" in card.text


def test_another_base_is_refused_naming_both(promptkd_bundle, student, tmp_path):
    folder, _ = promptkd_bundle
    other = copy.deepcopy(student)
    with torch.no_grad():
        next(other.model.visual.parameters()).add_(1e-3)
    other_dir = tmp_path / "other"
    _local_dir(other, other_dir)
    with pytest.raises(BundleError) as err:
        Bundle.read(folder).load(base=f"local-dir:{other_dir}")
    message = str(err.value)
    config = json.loads((folder / "config.json").read_text())
    assert config["base"]["weights_sha256"][:12] in message and str(other_dir) in message and "--base" in message


def test_missing_base_weights_name_the_folder_and_the_option(promptkd_bundle, tmp_path):
    folder, _ = promptkd_bundle
    with pytest.raises(ModelWeightsError, match=r"nowhere.*--base"):
        Bundle.read(folder).load(base=f"local-dir:{tmp_path / 'nowhere'}")


def test_damaged_or_missing_bundle_files(promptkd_bundle, tmp_path):
    folder, _ = promptkd_bundle
    with pytest.raises(BundleError, match="no such folder"):
        Bundle.read(tmp_path / "nothing")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((folder / "config.json").read_text())
    (broken / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:100])
    with pytest.raises(BundleError, match="damaged file"):
        Bundle.read(broken)


def test_predict_skips_unreadable_images_and_lists_them(promptkd_bundle, images, tmp_path):
    folder, eager = promptkd_bundle
    rows = predict(folder, [str(images)], top_k=3, batch_size=2, device="cpu")
    assert len(rows) == 6
    failed = [r for r in rows if r["error"]]
    assert [r["input"] for r in failed] == [str(images / "broken.png")] and failed[0]["predictions"] == []
    student = Bundle.read(folder).load()
    first = next(r for r in rows if r["input"].endswith("img0.png"))
    with torch.no_grad():
        probs = eager(student.preprocess(Image.open(images / "img0.png").convert("RGB"))[None]).softmax(-1)[0]
    top = probs.topk(3)
    assert [p["class"] for p in first["predictions"]] == [CLASSES[i] for i in top.indices.tolist()]
    assert np.allclose([p["probability"] for p in first["predictions"]], top.values.numpy(), atol=1e-6)
    table = list(csv.DictReader(io.StringIO(render(rows, ".csv", 3))))
    assert table[0].keys() >= {"input", "class1", "probability3", "error"}
    write_rows(rows, tmp_path / "out" / "preds.json", 3)
    assert json.loads((tmp_path / "out" / "preds.json").read_text()) == rows
    with pytest.raises(ValueError, match="--out"):
        write_rows(rows, tmp_path / "preds.txt", 3)


@pytest.mark.parametrize("fmt", ["pt2", "merged", "onnx"])
def test_exports_match_the_eager_student(promptkd_bundle, images, tmp_path, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    folder, eager = promptkd_bundle
    out = tmp_path / ("merged" if fmt == "merged" else f"student.{fmt}")
    report = export_bundle(folder, format=fmt, out=out, images=[str(images)])
    assert report.n_images == 5 and report.max_abs_diff <= 1e-4 and f"{report.max_abs_diff:.2e}" in report.summary()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = eager(x)
        if fmt == "pt2":
            program = torch.export.load(out).module()
            assert (program(x) - expected).abs().max() <= 1e-4
            assert program(x[:1]).shape == (1, 10)  # dynamic batch, down to one image
        elif fmt == "onnx":
            import onnxruntime

            found = onnxruntime.InferenceSession(str(out)).run(None, {"images": x.numpy()})[0]
            assert np.abs(found - expected.numpy()).max() <= 1e-4
        else:
            import open_clip

            clip, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")  # plain open_clip loads it
            assert isinstance(clip, torch.nn.Module)
            assert torch.equal(Bundle.read(out).load().model(x), expected)  # needs no other weights
    if fmt != "merged":
        assert json.loads(out.with_name(out.name + ".json").read_text())["classes"] == CLASSES


def test_a_failed_parity_check_writes_nothing(promptkd_bundle, tmp_path, monkeypatch):
    folder, _ = promptkd_bundle
    monkeypatch.setattr(export_module, "PARITY_BOUND", -1.0)
    with pytest.raises(ParityError, match="nothing was written"):
        export_bundle(folder, format="pt2", out=tmp_path / "s.pt2")
    assert list(tmp_path.iterdir()) == []


def test_cmkd_rst_bundle_stores_the_residual_and_merges_it(base, tmp_path):
    """CMKD + RST: only the sparse residual and the head are stored; the merged export is the dense tower."""
    torch.manual_seed(4)
    params = _params("cmkd", rst={"enabled": True, "threshold": 1e-6})
    before = {k: v.clone() for k, v in base.model.visual.state_dict().items()}
    trained = {k: v.clone() for k, v in base.model.visual.named_parameters()}
    trained["proj"].view(-1)[:7] += 0.5
    head = TaskHead(32, 10)
    head[2].weight.data.normal_()
    W = F.normalize(torch.randn(10, 32), dim=-1)
    base_params = {k: v.clone() for k, v in base.model.visual.named_parameters()}
    state = {"head": head.state_dict(), "residual": residual_tensors(trained, base_params)}
    folder = _write(tmp_path / "cmkd", _checkpoint("cmkd", state, params, base, W, rst=params["distill"]["cmkd"]["rst"]),
                    params, base)
    tensors = json.dumps(sorted(flatten(Bundle.read(folder).state)))
    assert "residual/proj.values" in tensors and "visual/" not in tensors
    visual = copy.deepcopy(base.model.visual)
    visual.load_state_dict({**before, **trained})
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = head.eval()(visual(x))
        assert torch.equal(Bundle.read(folder).load().model(x), expected)
        export_bundle(folder, format="merged", out=tmp_path / "merged")
        from safetensors.torch import load_file

        dense = load_file(str(tmp_path / "merged" / "open_clip_model.safetensors"))
        assert torch.equal(dense["visual.proj"], trained["proj"])
        assert torch.equal(Bundle.read(tmp_path / "merged").load().model(x), expected)
    assert torch.equal(base.model.visual.proj, before["proj"])  # the shared fixture's model is untouched


def test_dapl_bundle_is_the_frozen_encoder_against_the_target_class_vectors(base, tmp_path):
    torch.manual_seed(5)
    params = _params("dapl")
    W = F.normalize(torch.randn(10, 32), dim=-1)
    folder = _write(tmp_path / "dapl", _checkpoint("dapl", {"prompts": {"ctx": torch.randn(4, 8)}}, params, base, W),
                    params, base)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = 20.0 * F.normalize(base.model.encode_image(x), dim=-1) @ W.t()
        assert torch.allclose(Bundle.read(folder).load().model(x), expected, atol=1e-5)


def test_cli_errors_are_one_line(promptkd_bundle, tmp_path, capsys):
    from pipeline.cli import main

    assert main(["predict", str(tmp_path / "no-bundle"), str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "no-bundle" in err[0] and "no such" in err[0] and "--debug" in err[1]  # no traceback
    folder, _ = promptkd_bundle
    assert main(["predict", str(folder), str(tmp_path / "missing.png")]) == 1
    assert "missing.png" in capsys.readouterr().err


def test_the_bundle_stage_runs_one_named_task():
    from pipeline.orchestration.stage import start

    with pytest.raises(ValueError, match=r"--task 'nope' is not a task of .*params.yaml.*usps_to_mnist"):
        start("bundle", ["--params", "params.yaml", "--task", "nope"], "", per_task=True)


def test_bad_predict_arguments_are_named(promptkd_bundle, images):
    folder, _ = promptkd_bundle
    with pytest.raises(ValueError, match="--top-k and --batch-size"):
        predict(folder, [str(images)], top_k=0, device="cpu")
    with pytest.raises(ValueError, match="--device 'gpu0'"):
        predict(folder, [str(images)], device="gpu0")
    with pytest.raises(BundleError, match="local-dir:"):  # a tag cannot stand in for a local-dir: base
        Bundle.read(folder).base_spec("openai")


def test_the_foreach_bundle_stage_declares_its_params_and_model_configs_resolve():
    from pipeline.config import stage_declaration

    declared = stage_declaration("bundle")  # under `do:` in dvc.yaml
    assert {"distill", "model", "tasks"} <= set(declared["params"]) and "stages/bundle.py" in declared["deps"]
    assert model_config(ModelSpec(name="digits-vit-student"))["vision_cfg"]["image_size"] == 32

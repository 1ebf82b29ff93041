"""Model loading by spec, identity, local-dir checkpoints, and prompt injection on open_clip."""
import time

import open_clip
import pytest
import torch
from torch.nn import functional as F

from pipeline.models.factory import (ModelSpec, ModelWeightsError, assert_same_identity, check_weights_available,
                                     load_model, save_local_dir)
from pipeline.models.prompted import PromptedStudent, PromptedVisionEncoder, Projector
from pipeline.models.teacher_prompts import PromptedTeacher

NAMES = ["zero", "one", "two"]
TEMPLATE = "a photo of the number {}."


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_model(ModelSpec(name="digits-vit-teacher", pretrained="random", role="teacher"))


def test_repo_configs_are_registered_as_model_names():
    assert {"digits-vit-teacher", "digits-vit-student"} <= set(open_clip.list_models())


def test_identity_records_architecture_weights_and_preprocess(tiny):
    ident = tiny.identity
    assert ident["name"] == "digits-vit-teacher" and ident["pretrained"] == "random"
    assert ident["quick_gelu"] is False and ident["embed_dim"] == 64
    assert ident["preprocess"]["size"] == [32, 32]
    assert_same_identity(ident, dict(ident), what="x")
    with pytest.raises(ValueError, match="quick_gelu: expected False, found True"):
        assert_same_identity(ident, {**ident, "quick_gelu": True}, what="cache")


def test_missing_tag_offline_fails_fast_naming_model_and_fix(tmp_path):
    spec = ModelSpec(name="ViT-B-32", pretrained="openai", cache_dir=str(tmp_path), role="teacher")
    start = time.perf_counter()
    with pytest.raises(ModelWeightsError) as info:
        check_weights_available(spec)
    assert time.perf_counter() - start < 10  # HF_HUB_OFFLINE: no network retries
    msg = str(info.value)
    assert "teacher model 'ViT-B-32'" in msg and "'openai'" in msg and "HF_HUB_OFFLINE" in msg
    assert "model.teacher.pretrained" in msg and "local-dir:" in msg


@pytest.mark.parametrize("spec, expected", [
    (ModelSpec(name="ViT-B-32", pretrained=None, role="student"), "refusing to use random weights silently"),
    (ModelSpec(name="ViT-B-32", pretrained="no/such/file.pt", role="student"), "neither a pretrained tag"),
    (ModelSpec(name="ViT-Q-99", pretrained="openai", role="student"), "unknown architecture"),
    (ModelSpec(name="local-dir:/no/such/dir", role="student"), "lacks open_clip_config.json"),
])
def test_bad_specs_are_refused(spec, expected):
    with pytest.raises(ModelWeightsError, match=expected):
        check_weights_available(spec)


def test_local_dir_roundtrip_and_checkpoint_file(tiny, tmp_path):
    save_local_dir(tiny.model, open_clip.get_model_config("digits-vit-teacher"), tmp_path / "m")
    loaded = load_model(ModelSpec(name=f"local-dir:{tmp_path / 'm'}"))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded.model.encode_image(x), tiny.model.encode_image(x))
    assert loaded.identity["pretrained"] is None and loaded.identity["name"].startswith("local-dir:")
    torch.save(tiny.model.state_dict(), tmp_path / "w.pt")  # a plain checkpoint file works too
    from_file = load_model(ModelSpec(name="digits-vit-teacher", pretrained=str(tmp_path / "w.pt")))
    assert torch.equal(from_file.model.encode_image(x), tiny.model.encode_image(x))


def test_text_prompts_reproduce_open_clip_and_learn(tiny):
    ref = F.normalize(tiny.model.encode_text(tiny.tokenizer([TEMPLATE.format(n) for n in NAMES])), dim=-1)
    for n_ctx in (0, 4):  # word init: the learnable context starts as the template's own words
        enc = PromptedTeacher(tiny.model, tiny.tokenizer, NAMES, template=TEMPLATE, n_ctx=n_ctx)
        assert torch.allclose(enc.class_vectors(), ref, atol=1e-6)
    enc = PromptedTeacher(tiny.model, tiny.tokenizer, NAMES, template=TEMPLATE, n_ctx=2, init="random")
    assert not torch.allclose(enc.class_vectors(), ref, atol=1e-3)
    enc.class_vectors().sum().backward()
    assert enc.ctx.grad is not None and enc.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny.model.parameters())  # the CLIP stays frozen


def test_text_prompt_errors(tiny):
    with pytest.raises(ValueError, match="only 5 tokens before the class name"):
        PromptedTeacher(tiny.model, tiny.tokenizer, NAMES, template=TEMPLATE, n_ctx=6)
    with pytest.raises(ValueError, match="must contain"):
        PromptedTeacher(tiny.model, tiny.tokenizer, NAMES, template="a photo", n_ctx=1)


@pytest.mark.parametrize("location", ["middle", "append"])
def test_visual_prompts_reproduce_open_clip_without_tokens(tiny, location):
    x = torch.randn(3, 3, 32, 32)
    enc = PromptedVisionEncoder(tiny.model.visual, n_tokens=0, location=location)
    assert torch.equal(enc(x), tiny.model.encode_image(x))


@pytest.mark.parametrize("location", ["middle", "append"])
def test_deep_visual_prompts_change_features_and_get_gradients(tiny, location):
    x = torch.randn(2, 3, 32, 32)
    enc = PromptedVisionEncoder(tiny.model.visual, n_tokens=3, location=location, depth=2)
    out = enc(x)
    assert out.shape == (2, 64) and not torch.allclose(out, tiny.model.encode_image(x))
    out.sum().backward()
    assert enc.prompts.grad[0].abs().sum() > 0 and enc.prompts.grad[1].abs().sum() > 0  # both layers used
    with pytest.raises(ValueError, match="between 1 and the model's 2 layers"):
        PromptedVisionEncoder(tiny.model.visual, n_tokens=1, depth=3)


def test_projector_matches_promptkd_size_for_vit_b16():
    assert sum(p.numel() for p in Projector(512, 768).parameters()) == 986_112


def test_student_outputs_normalised_teacher_space_features(tiny):
    student = PromptedStudent(tiny.model.visual, teacher_dim=96, n_tokens=2, location="append", depth=2)
    feats = student(torch.randn(4, 3, 32, 32))
    assert feats.shape == (4, 96) and torch.allclose(feats.norm(dim=-1), torch.ones(4), atol=1e-5)
    state = student.trainable_state()
    assert "encoder.prompts" in state and not any(k.startswith("encoder.visual.") for k in state)


@pytest.fixture(scope="module")
def vit_b32():
    torch.manual_seed(0)
    return load_model(ModelSpec(name="ViT-B-32-quickgelu", pretrained="random"))


def test_prompt_wrappers_reproduce_a_real_vit_b32_exactly(vit_b32):
    m = vit_b32.model
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        for location in ("middle", "append"):
            assert torch.equal(PromptedVisionEncoder(m.visual, n_tokens=0, location=location)(x), m.encode_image(x))
        names = ["dog", "clip art"]
        ref = F.normalize(m.encode_text(vit_b32.tokenizer([f"a photo of a {n}." for n in names])), dim=-1)
        enc = PromptedTeacher(m, vit_b32.tokenizer, names, template="a photo of a {}.", n_ctx=4)
        assert torch.allclose(enc.class_vectors(), ref, atol=1e-6)


@pytest.mark.parametrize("location", ["middle", "append"])
def test_deep_prompts_replace_tokens_and_keep_the_sequence_length(vit_b32, location):
    visual = vit_b32.model.visual
    enc = PromptedVisionEncoder(visual, n_tokens=2, location=location, depth=3)
    lengths = []
    hooks = [b.register_forward_pre_hook(lambda _m, a, kw=None: lengths.append(a[0].shape[1]))
             for b in visual.transformer.resblocks]
    with torch.no_grad():
        enc(torch.randn(1, 3, 224, 224))
    for h in hooks:
        h.remove()
    assert lengths == [1 + 49 + 2] * 12  # CLS + 7x7 patches + 2 prompts at every one of the 12 layers


def test_vit_l14_widths_and_depth_on_the_meta_device():
    from pipeline.methods.param_counts import meta_model

    clip = meta_model("ViT-L-14-quickgelu")
    enc = PromptedVisionEncoder(clip.visual, n_tokens=2, location="middle", depth=24)
    assert tuple(enc.prompts.shape) == (24, 2, 1024)  # every layer of ViT-L/14, visual width 1024
    assert clip.token_embedding.weight.shape[1] == 768 and clip.text_projection.shape == (768, 768)
    with pytest.raises(ValueError, match="between 1 and the model's 24 layers"):
        PromptedVisionEncoder(clip.visual, n_tokens=2, depth=25)

"""The teacher's source-prompt kinds: CoOp, CoCoOp, VPT, IVLP, MaPLe, PromptSRC on a tiny open_clip ViT."""
import copy

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from pipeline.config import load_params
from pipeline.features.cache import conditional_logits, mean_conditioned_vectors
from pipeline.methods.prompt_kinds import KINDS, teacher_architecture, training_settings
from pipeline.methods.source_prompts import train_source_prompts
from pipeline.models.teacher_prompts import PromptedTeacher

NAMES = ["zero", "one", "two"]
TEMPLATE = "a photo of the number {}."
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _build(model, **kw):
    torch.manual_seed(0)
    return PromptedTeacher(model.model, model.tokenizer, NAMES, **{"template": TEMPLATE, "n_ctx": 2, **kw})


def _layer_inputs(blocks):
    """Record the input of every block of ``blocks`` (batch first) during the next forward pass."""
    seen = []
    hooks = [b.register_forward_pre_hook(lambda _m, args, kw=None: seen.append(args[0].detach().clone()))
             for b in blocks]
    return seen, hooks


def test_zero_prompts_reproduce_open_clip(teacher):
    clip = teacher.model
    plain = _build(teacher, n_ctx=0, text_depth=2)  # nothing to inject at any depth
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref_text = F.normalize(clip.encode_text(teacher.tokenizer([TEMPLATE.format(n) for n in NAMES])), dim=-1)
        assert torch.allclose(plain.class_vectors(), ref_text, atol=1e-6)
        assert torch.equal(plain.image_features(images), F.normalize(clip.encode_image(images).float(), dim=-1))
        assert not plain.prompted_vision and not plain.conditional and plain.trainable_parameters()[0].numel() == 0


def test_cocoop_batched_equals_the_per_image_loop(teacher):
    cocoop = _build(teacher, meta_net=True)
    feats = F.normalize(torch.randn(5, 64), dim=-1)
    batched = cocoop.class_vectors(feats)
    assert batched.shape == (5, 3, 64)
    loop = torch.stack([cocoop.class_vectors(feats[i:i + 1])[0] for i in range(5)])  # the original: batch 1
    assert torch.allclose(batched, loop, atol=1e-6)
    assert not torch.allclose(batched[0], batched[1], atol=1e-4)  # the classifier depends on the image
    logits = cocoop.logits(feats, 10.0)
    assert torch.allclose(logits, 10.0 * torch.einsum("bd,bcd->bc", feats, loop), atol=1e-5)
    logits.sum().backward()
    assert cocoop.meta_net[0].weight.grad.abs().sum() > 0 and cocoop.ctx.grad.abs().sum() > 0
    # the features stage scores in chunks of images: the same logits, whatever the chunk size
    with torch.no_grad():
        whole = conditional_logits(cocoop, feats.numpy(), 10.0, precision="fp32", device="cpu", batch_size=5)
        chunked = conditional_logits(cocoop, feats.numpy(), 10.0, precision="fp32", device="cpu", batch_size=2)
    assert np.allclose(whole, chunked, atol=1e-5) and np.allclose(whole, logits.detach().numpy(), atol=1e-5)
    assert mean_conditioned_vectors(cocoop, feats.numpy(), device="cpu").shape == (3, 64)


def test_cocoop_with_a_silent_meta_net_is_the_plain_prompt(teacher):
    cocoop = _build(teacher, meta_net=True)  # word init: the context starts as "a photo"
    with torch.no_grad():
        cocoop.meta_net[2].weight.zero_()
        cocoop.meta_net[2].bias.zero_()
        plain = F.normalize(teacher.model.encode_text(teacher.tokenizer([TEMPLATE.format(n) for n in NAMES])), dim=-1)
        out = cocoop.class_vectors(F.normalize(torch.randn(2, 64), dim=-1))
    assert torch.allclose(out[0], plain, atol=1e-6) and torch.allclose(out[1], plain, atol=1e-6)


def test_deep_text_prompts_replace_the_context_at_each_layer(teacher):
    ivlp = _build(teacher, text_depth=2, visual_tokens=2, visual_location="append", visual_depth=2)
    seen, hooks = _layer_inputs(teacher.model.transformer.resblocks)
    with torch.no_grad():
        ivlp.class_vectors()
    for h in hooks:
        h.remove()
    assert torch.allclose(seen[0][:, 1:3], ivlp.ctx.expand(3, -1, -1) + teacher.model.positional_embedding[1:3])
    assert torch.equal(seen[1][:, 1:3], ivlp.deep_text[0].expand(3, -1, -1))  # layer 2 input: the deep prompt


def test_maple_visual_prompts_are_projections_of_the_text_prompts(teacher):
    maple = _build(teacher, text_depth=2, visual_depth=2, coupled_depth=2, visual_location="append")
    assert maple.visual_prompts is None and len(maple.visual_projections) == 2
    prompts = maple.layer_visual_prompts()
    text = [maple.ctx, maple.deep_text[0]]
    for layer in range(2):  # visual prompt of layer i = Linear_i(text prompt of layer i)
        assert torch.allclose(prompts[layer], maple.visual_projections[layer](text[layer]), atol=1e-6)
    seen, hooks = _layer_inputs(teacher.model.visual.transformer.resblocks)
    with torch.no_grad():
        maple.image_features(torch.randn(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert torch.allclose(seen[1][:, -2:], prompts[1].expand(2, -1, -1), atol=1e-6)  # appended after the patches
    with torch.no_grad():
        maple.deep_text[0].add_(1.0)  # the coupling: moving a text prompt moves its visual prompt
    assert not torch.allclose(maple.layer_visual_prompts()[1], prompts[1])
    assert torch.allclose(maple.layer_visual_prompts()[0], prompts[0])
    with pytest.raises(ValueError, match="coupled depth 3 must be between 1"):
        _build(teacher, text_depth=2, visual_depth=2, coupled_depth=3)


def test_every_kind_builds_from_params_and_trains_on_the_source(teacher, digits_shards):
    params = load_params("params.yaml")
    for kind in KINDS:
        prompts = copy.deepcopy(params["prompts"])
        prompts.update(kind=kind, text_weight=25.0 if kind == "promptsrc" else 0.0)
        architecture = teacher_architecture(prompts)
        out = train_source_prompts(teacher_model=teacher, classnames=DIGITS, shard_dir=digits_shards["usps"],
                                   architecture=architecture, config=prompts, epochs=2, batch_size=16, lr=0.1,
                                   momentum=0.9, weight_decay=0.0, seed=0, device="cpu",
                                   zs_text=torch.randn(10, 64).div(8) if kind == "promptsrc" else None)
        logs = out["log"]
        assert len(logs) == 2 and all(np.isfinite(e["loss"]) for e in logs), kind
        assert out["trainable_params"] == sum(v.numel() for v in out["reported"].values()), kind
        rebuilt = PromptedTeacher(teacher.model, teacher.tokenizer, DIGITS, **architecture)
        rebuilt.load_trainable_state(out["reported"])  # the features stage rebuilds it from the stored keywords


def test_a_kind_may_carry_its_own_training_settings():
    office31 = load_params("configs/office31.yaml")["prompts"]  # the PDA repository's per-method values
    assert training_settings({**office31, "kind": "maple"}) == {"lr": 0.0035, "epochs": 20, "batch_size": 32}
    assert training_settings({**office31, "kind": "cocoop"}) == {"lr": 0.001, "epochs": 20, "batch_size": 32}
    assert training_settings({**office31, "kind": "promptsrc"}) == {"lr": 0.0025, "epochs": 20, "batch_size": 4}
    smoke = load_params("params.yaml")["prompts"]  # no overrides: the shared prompts.lr / epochs / batch_size
    assert training_settings({**smoke, "kind": "maple"}) == {k: smoke[k] for k in ("lr", "epochs", "batch_size")}


@pytest.mark.parametrize("name, width, visual_width", [("ViT-B-16-quickgelu", 512, 768), ("ViT-L-14-quickgelu", 768, 1024)])
def test_every_kind_fits_vit_b16_and_l14_widths(name, width, visual_width):
    """Built with the originals' defaults on the meta device (no weights): shapes through both towers."""
    from pipeline.methods.param_counts import meta_model, meta_tokenizer

    clip, tokenizer = meta_model(name), meta_tokenizer(name)
    for kind, spec in KINDS.items():
        prompts = {"kind": kind, "template": "X " * 16 + "{}.", "init": "random", kind: spec.params.defaults()}
        with torch.device("meta"):
            model = PromptedTeacher(clip, tokenizer, DIGITS, **teacher_architecture(prompts))
            feats = model.image_features(torch.empty(2, 3, 224, 224))
            vectors = model.class_vectors(feats if model.conditional else None)
        assert tuple(feats.shape) == (2, width), kind
        assert tuple(vectors.shape) == ((2, 10, width) if kind == "cocoop" else (10, width)), kind
        if kind == "maple":
            assert tuple(model.layer_visual_prompts().shape) == (9, 2, visual_width)


def test_validate_builds_the_prompts_on_the_meta_device_before_any_work():
    from pipeline.orchestration.stage import check_architectures
    from pipeline.schema import ConfigError

    params = load_params("params.yaml")  # stand-ins not built yet: their architectures are used
    check_architectures(params)
    params["prompts"]["kind"] = "maple"
    params["prompts"]["maple"]["depth"] = 9
    with pytest.raises(ConfigError, match="prompts.maple or distill.promptkd does not fit the models .*"
                                          "text prompt depth 9 must be between 1 and the model's 2 layers"):
        check_architectures(params)

"""`uda-distill info`: parameter counts built on the meta device must equal the figures computed from the original code's tensor shapes."""
import copy

import pytest

from pipeline.cli import main
from pipeline.config import load_params
from pipeline.methods.param_counts import method_parameter_counts
from pipeline.methods.prompt_kinds import KINDS

B16, L14 = "ViT-B-16-quickgelu", "ViT-L-14-quickgelu"


@pytest.fixture(scope="module")
def base():
    return load_params("configs/digits_clip.yaml")


def _counts(base, method, teacher, student=B16, **overrides):
    """Counts for ``method``; ``overrides`` are ``<block>__<key>`` with block prompts, a prompt kind (e.g. coop), ekda,
    dapl or promptkd."""
    p = copy.deepcopy(base)
    p["distill"]["method"] = method
    p["model"]["teacher"]["name"], p["model"]["student"]["name"] = teacher, student
    for key, value in overrides.items():
        block, name = key.split("__")
        target = p["prompts"] if block == "prompts" else p["prompts"][block] if block in KINDS else p["distill"][block]
        target[name] = value
    return {r["part"].split(" ")[0]: r for r in method_parameter_counts(p)}


def test_ekda_with_two_tokens_matches_the_spec(base):
    rows = _counts(base, "ekda", L14, ekda__n_tokens=2, ekda__n_ctx=2, ekda__visual_tokens=2)  # defaults: middle, all
    assert rows["student"]["trainable"] == 1_004_544  # 1,536 + 16,896 + 986,112
    assert rows["student"]["stored"] == 1_004_544 + 2 * 768 + 1  # + BatchNorm running mean/var and counter
    assert rows["teacher"]["trainable"] == 3_584  # 2x768 text + 2x1024 visual


def test_ekda_default_four_tokens_matches_the_spec(base):
    rows = _counts(base, "ekda", L14)
    assert rows["student"]["trainable"] == 1_022_976


def test_promptkd_student_and_coop_teacher_match_the_spec(base):
    rows = _counts(base, "promptkd", L14)  # defaults: 4 tokens, append, depth 9
    assert rows["student"]["trainable"] == 1_013_760  # 4x768x9 + 986,112


@pytest.mark.parametrize("kind, overrides, expected", [
    ("coop", {"coop__n_ctx": 16, "coop__class_specific": False}, 8_192),  # M = 16 x 512
    ("cocoop", {}, 35_360),       # n = 4: 2,048 context + 33,312 meta-net 512 -> 32 -> 512
    ("maple", {}, 3_555_072),     # 1,024 + 8 x 2 x 512 deep text + 9 x Linear(512 -> 768)
    ("promptsrc", {"prompts__text_weight": 25.0}, 46_080),  # IVLP 4 + 4, depth 9: 9 x 4 x (512 + 768)
])
def test_teacher_prompt_kinds_match_the_spec_on_vit_b16(base, kind, overrides, expected):
    rows = _counts(base, "promptkd", B16, prompts__kind=kind, **overrides)  # the kinds' defaults are the originals'
    assert rows["teacher"]["trainable"] == rows["teacher"]["stored"] == expected
    assert f"({kind}," in rows["teacher"]["part"]


def test_dapl_matches_the_spec(base):
    rows = _counts(base, "dapl", B16, dapl__n_ctx=16, dapl__n_domain_ctx=16)
    assert rows["domain-agnostic"]["trainable"] == 24_576
    csc = _counts(base, "dapl", B16, dapl__class_specific=True)
    assert csc["domain-agnostic"]["trainable"] == 10 * 16 * 512 + 2 * 16 * 512


def test_info_command_prints_the_table(capsys):
    assert main(["info", "--params", "configs/digits_clip.yaml", "--method", "dapl", "--teacher", B16,
                 "-S", "distill.dapl.n_ctx=16"]) == 0
    out = capsys.readouterr().out
    assert "method dapl" in out and "24,576" in out
    assert main(["info", "-S", "distill.ekda.n_tokens"]) == 1
    assert "expected key=value" in capsys.readouterr().err
    assert main(["info", "--params", "configs/digits_clip.yaml", "--teacher", B16, "-S", "prompts.kind=maple"]) == 0
    out = capsys.readouterr().out
    assert "teacher source prompts (maple, prompts stage)" in out and "3,555,072" in out
    assert main(["info", "-S", "distill.ekda.n_tokens=many"]) == 1
    assert "distill.ekda.n_tokens: expected an integer" in capsys.readouterr().err


def test_cmkd_trains_the_whole_visual_tower_and_the_head(base, capsys):
    p = copy.deepcopy(base)
    p["distill"]["method"], p["model"]["student"]["name"] = "cmkd", "ViT-B-16"
    rows = method_parameter_counts(p, n_classes=65)
    assert sum(r["trainable"] for r in rows) == 86_227_456  # 86,192,640 visual + 35,328 head - 512 frozen BN bias
    assert main(["info", "--method", "cmkd", "--student", "ViT-B-16", "--classes", "65",
                 "-S", "distill.cmkd.rst.enabled=true"]) == 0
    out = capsys.readouterr().out
    assert "86,227,456" in out and "RST" in out and "33,280 (paper)" in out and "35,328 (code)" in out


def test_info_on_the_default_params_before_the_standins_exist(tmp_path, monkeypatch, capsys):
    """The offline default names `local-dir:` stand-ins that the standins stage writes later: their architecture
    is known from `standins.models`, so the counts need no trained folder."""
    from pathlib import Path

    params = Path(__file__).resolve().parent.parent / "params.yaml"
    monkeypatch.chdir(tmp_path)  # no models/standins here
    assert main(["info", "--params", str(params)]) == 0
    out = capsys.readouterr().out
    assert "digits-vit-teacher" in out and "digits-vit-student" in out


def test_pda_matches_the_spec_on_vit_b16(base):
    rows = _counts(base, "pda", B16)  # the PDA repository's defaults: n_ctx 2, every layer, coupled 1..7
    row = rows["multimodal"]
    assert row["trainable"] == 3_179_136  # prompts + 7 projections + 6 independent visual prompts + IFT 399,744
    assert row["stored"] == 3_179_136 + 2 * (2 * 64 + 1)  # + the IFT's BatchNorm statistics; banks excluded

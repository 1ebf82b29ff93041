"""The whole real pipeline: `dvc repro` of the smoke configuration in a scratch copy (a few CPU minutes).

Margins come from smoke runs with seeds 1, 2 and 3 (2 tasks each): the zero-shot stand-in teacher scored
51.3-70.8 % on the target (chance: 10 %); source prompting added 2.9-3.5 points on an mnist source and
19.6-22.2 on a usps source (mean over the two tasks 11.5-12.7); the student ended 1.9 points below to 7.4
points above the source-prompted teacher on the target.

Every method then runs through `dvc exp run` on the same stand-ins. Seed 1, 5 epochs, mean target accuracy:
promptkd 45.8, ekda 57.4, dapl 47.4, zero-shot teacher 48.4 (the EKDA student also beat the zero-shot
teacher on both tasks); the tests use 2 epochs and check each method against chance and the zero-shot teacher.
"""
import importlib.util
import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import copy_project
from pipeline.smoke import _project_files, dvc

pytestmark = pytest.mark.slow
CHANCE = 10.0
TASKS = ("usps_to_mnist", "mnist_to_usps")
HEADLINE = "results/report/headline.json"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def smoke(smoke_project, tmp_path_factory):
    workdir = copy_project(smoke_project, tmp_path_factory.mktemp("smoke") / "project")  # these tests change it
    return workdir, json.loads((workdir / "results" / "report" / "results.json").read_text())


def _strings(obj) -> list:
    """Every string value inside a (metrics) JSON object."""
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return [obj] if isinstance(obj, str) else []


def _summary(workdir) -> dict:
    """The report's words (method, headline metric, domains): kept out of the metrics files."""
    return json.loads((workdir / "results" / "report" / "summary.json").read_text())


def _stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([\w@.-]+)'", output)


def _ran(output: str, stages: list[str]) -> bool:
    """``stages`` ran (validate first), and so did the bundle stage of every task; DVC orders independent stages."""
    ran = _stages_run(output)
    return ran[:1] == ["validate"] and sorted(ran) == sorted([*stages, *(f"bundle@{t}" for t in TASKS)])


def _check_bundles(workdir, tmp_path, monkeypatch, label: str, exports: bool = True) -> None:
    """Every task's bundle predicts on a folder of new images (one of them unreadable); the first task's exports
    to merged, pt2 and onnx (when its extra is installed) are within the parity bound, and its merged student
    reproduces the evaluate stage's last-epoch target accuracy from the shards through `uda-distill predict`'s
    code (one task is enough for the exports: the code path is the same, the suite's time is not). Without
    ``exports`` (a shipped model class another test exports) the bundle itself reproduces that accuracy."""
    from pipeline.data.shards import read_labels
    from pipeline.student.export import PARITY_BOUND, export_bundle
    from pipeline.student.predict import predict

    monkeypatch.chdir(workdir)  # the stand-ins' local-dir: paths are relative to the project
    new = tmp_path / f"new-{label}"
    for c in ("three", "seven"):
        for src in sorted((workdir / "data" / "raw" / "digits" / "printed" / c).iterdir())[:2]:
            (new / c).mkdir(parents=True, exist_ok=True)
            (new / c / src.name).write_bytes(src.read_bytes())
    (new / "unreadable.png").write_bytes(b"not an image")
    formats = (["merged", "pt2"] + (["onnx"] if importlib.util.find_spec("onnxruntime") else [])) if exports else []
    for task in TASKS:
        bundle = workdir / "models" / "bundles" / task
        rows = predict(bundle, [str(new)], top_k=2, device="cpu")
        assert [r["input"] for r in rows if r["error"]] == [str(new / "unreadable.png")]
        assert len(rows) == 5 and all(len(r["predictions"]) == 2 for r in rows if not r["error"])
        if task != TASKS[0]:
            continue
        for fmt in formats:
            out = tmp_path / f"{label}-{task}-{fmt}"
            report = export_bundle(bundle, format=fmt, out=out, images=[str(new)])
            assert report.n_images == 4 and report.max_abs_diff <= PARITY_BOUND, report.summary()
            print(f"bundle {label} {task}: {(bundle / 'model.safetensors').stat().st_size} B; {report.summary()}")
        metrics = json.loads((workdir / "results" / "evaluate" / task / "metrics.json").read_text())
        target = workdir / "data" / "shards" / "digits" / metrics["target"]
        shipped = tmp_path / f"{label}-{task}-merged" if exports else bundle
        rows = predict(shipped, [str(target)], batch_size=128, device="cpu")
        keys, labels = read_labels(target)
        classes = metrics["classes"]
        assert [r["input"] for r in rows] == [f"{target}::{k}" for k in keys]
        predicted = np.array([classes.index(r["predictions"][0]["class"]) for r in rows])
        last = metrics["models"]["student"]["target"]["last"]
        assert abs(100 * (predicted == labels).mean() - last["acc"]) <= 100 / len(labels) + 1e-9, (label, task)


def test_the_readme_main_command_runs_offline_in_a_fresh_clone(smoke_project):
    """The smoke project is the README's first command (`pip install ... && dvc repro`, default params.yaml) run
    offline on the files a fresh clone holds; it leaves a results table and commits dvc.lock and the metrics."""
    first_block = re.search(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S).group(1)
    assert first_block.strip().endswith("&& dvc repro")
    assert all((smoke_project / name).is_file() for name in _project_files(ROOT))
    table = (smoke_project / "results" / "report" / "results.md").read_text()
    assert all(f"| {task} |" in table for task in TASKS)
    git = lambda *args: subprocess.run(["git", *args], cwd=smoke_project, capture_output=True, text=True).stdout
    assert git("status", "--porcelain") == ""  # everything DVC left for git is committed
    assert {"dvc.lock", HEADLINE, "results/report/results.json"} <= set(git("ls-files").split())


def test_outputs_follow_the_umask(smoke_project):
    """Outputs are readable by the group and others when the umask allows it (they were 0700/0600)."""
    umask = os.umask(0)
    os.umask(umask)
    wanted = 0o055 & ~umask  # group/other read (+ search on folders)
    for root in ("data", "models", "results"):
        for path in [smoke_project / root, *(smoke_project / root).rglob("*")]:
            bits = wanted if path.is_dir() else wanted & 0o044
            assert path.stat().st_mode & bits == bits, f"{path}: mode {path.stat().st_mode & 0o777:o}"


def test_results_table_keys_and_ranges(smoke):
    workdir, results = smoke
    assert set(results["tasks"]) == {"usps_to_mnist", "mnist_to_usps"}
    for task in results["tasks"].values():
        for model in ("zeroshot_teacher", "source_teacher", "student"):
            for key in ("acc", "mean_class_acc"):
                assert 0.0 <= task[model]["target"][key] <= 100.0
        assert 1 <= task["student"]["target"]["best_epoch"] <= 5
    md = (workdir / "results" / "report" / "results.md").read_text()
    assert "usps_to_mnist" in md and "oracle" in md
    figures = workdir / "results" / "report" / "figures"
    assert (figures / "accuracy_per_epoch.png").stat().st_size > 10_000


def test_models_carry_knowledge_and_the_pipeline_adapts(smoke):
    _, results = smoke
    gains = []
    for name, task in results["tasks"].items():
        zs, prompted, student = task["zeroshot_teacher"], task["source_teacher"], task["student"]
        assert zs["target"]["acc"] > CHANCE + 20, f"{name}: zero-shot target accuracy near chance"
        gains.append(prompted["source"]["acc"] - zs["source"]["acc"])
        assert gains[-1] > 1.0, f"{name}: the source-prompted teacher is not above zero-shot on its source"
        gap = student["target"]["acc"] - prompted["target"]["acc"]
        assert -7 < gap < 12, f"{name}: student {student['target']['acc']} far from teacher"
    assert sum(gains) / len(gains) > 5.0


def test_second_repro_runs_nothing(smoke):
    workdir, _ = smoke
    out = dvc(["repro"], workdir=workdir)
    assert _stages_run(out) == [] and "up to date" in out


def test_shards_are_byte_identical_when_rebuilt(smoke):
    workdir, _ = smoke
    lock = (workdir / "dvc.lock").read_text()
    dvc(["repro", "--force", "--single-item", "shard"], workdir=workdir)
    assert (workdir / "dvc.lock").read_text() == lock  # same hashes for every shard, manifest and sizes file


def test_metrics_and_plots_are_declared(smoke):
    workdir, _ = smoke
    metrics = json.loads(dvc(["metrics", "show", "--json"], workdir=workdir))
    assert "results/report/results.json" in json.dumps(metrics)
    plots = json.loads(dvc(["plots", "show", "--json"], workdir=workdir))["data"]
    for task in TASKS:  # each task's plots are told apart by their id and title (the file path, naming the task)
        for kind in ("plots/accuracy/", "plots/confusion/", f"curves/{task}/plots/metrics/agreement_with_teacher"):
            ids = [plot_id for plot_id in plots if kind in plot_id and task in plot_id]
            assert len(ids) == 1, (task, kind, list(plots))
            if not ids[0].endswith(".png"):
                assert task in plots[ids[0]][0]["content"]["title"]["text"]


def test_exp_run_reruns_only_distill_and_what_follows(smoke):
    """Two experiments; `dvc exp show` lists both beside the committed baseline, headline metrics first."""
    workdir, _ = smoke
    for epochs in (2, 1):
        out = dvc(["exp", "run", "-S", f"distill.epochs={epochs}"], workdir=workdir)
        assert _ran(out, ["validate", "distill", "evaluate", "report"])
    results = json.loads((workdir / "results" / "report" / "results.json").read_text())
    assert all(t["student"]["target"]["best_epoch"] == 1 for t in results["tasks"].values())
    baseline = next(r for r in json.loads(dvc(["exp", "show", "--json"], workdir=workdir)) if r["rev"] != "workspace")
    rows = [baseline] + [rev for exp in baseline["experiments"] for rev in exp["revs"]][-2:]
    epochs = [row["data"]["params"]["params.yaml"]["data"]["distill"]["epochs"] for row in rows]
    assert epochs == [5, 1, 2] or epochs == [5, 2, 1]  # the baseline, then the two runs (newest first or last)
    for row in rows:
        metrics = row["data"]["metrics"]
        assert list(metrics)[0] == HEADLINE, list(metrics)  # shown first
        headline = metrics[HEADLINE]["data"]
        assert set(headline) >= {"mean", *TASKS} and 0 < headline["mean"]["student"]["acc"] <= 100
        assert not _strings(metrics), "a metrics file holds strings"


def test_promptkd_bundles_predict_export_and_reproduce_the_evaluation(smoke, tmp_path, monkeypatch):
    workdir, _ = smoke
    _check_bundles(workdir, tmp_path, monkeypatch, "promptkd")


@pytest.mark.parametrize("method, kind", [
    ("dapl", None),      # first, on the smoke's CoOp teacher: DAPL trains on the frozen CLIP's own features
    ("pda", None),       # PDA trains its own coupled (MaPLe-style) prompts, banks and IFT on the teacher CLIP
    ("ekda", "cocoop"),  # last of these: a CoCoOp teacher's rows in evaluate, class vectors per image
])
def test_every_method_runs_through_dvc(smoke, method, kind, tmp_path, monkeypatch):
    """Each method; ekda with a CoCoOp teacher (re-run from the prompts stage on). IVLP runs in the PromptSRC
    test; VPT and MaPLe teachers through `dvc exp run` in `bench/method_table.py` (PDA's own prompts are MaPLe's)."""
    workdir, baseline = smoke
    kinds = ["-S", f"prompts.kind={kind}", "-S", "prompts.epochs=2"] if kind else []
    out = dvc(["exp", "run", "-S", f"distill.method={method}", "-S", "distill.epochs=2", "-S", "distill.pda.epochs=2",
               *kinds], workdir=workdir)
    assert _ran(out, ["validate", *(["prompts", "features"] if kind else []), "distill", "evaluate", "report"])
    meta = json.loads((workdir / "data" / "features" / "tasks" / "usps_to_mnist" / "meta.json").read_text())
    # a fixed-classifier, text-only teacher is scored at every prompt epoch; CoCoOp and visual prompts at the last
    assert (meta["prompt_kind"], meta["teacher_rows"]) == (kind or "coop", 1 if kind else meta["prompt_epochs"])
    assert meta["visual_prompts"] is False
    results = json.loads((workdir / "results" / "report" / "results.json").read_text())
    assert _summary(workdir)["method"] == method
    assert results["mean"]["source_teacher"]["target"]["acc"] > CHANCE  # the kind's teacher rows, scored
    zero_shot = baseline["mean"]["zeroshot_teacher"]["target"]["acc"]
    adapted = results["mean"]["student"]["target"]["acc"]
    assert adapted > CHANCE + 20, f"{method}: mean target accuracy {adapted} near chance"
    # 2 epochs: with one torch thread DAPL ends 12.7 points below the zero-shot teacher (47.4 after 5 epochs)
    assert adapted > zero_shot - 15, f"{method}: {adapted} far below the zero-shot teacher's {zero_shot}"
    log = json.loads((workdir / "models" / "students" / "usps_to_mnist" / "train_log.json").read_text())
    assert log["method"] == method and len(log["epochs"]) == 2
    _check_bundles(workdir, tmp_path, monkeypatch, method, exports=method == "pda")  # ekda ships promptkd's class


@pytest.mark.parametrize("variant", ["fixmatch", "rst"])
def test_cmkd_variants_run_through_dvc(smoke, variant, tmp_path, monkeypatch):
    """CMKD + FixMatch and CMKD + RST: the stand-in student's visual tower fine-tuned (3 x 40 iterations). Plain
    CMKD is their common path (the RST run has no FixMatch term; the FixMatch run ships the dense tower)."""
    workdir, _ = smoke
    # `dvc exp run` leaves its params in the workspace: set both switches every time
    switches = [f"distill.cmkd.fixmatch.enabled={str(variant == 'fixmatch').lower()}",
                f"distill.cmkd.rst.enabled={str(variant == 'rst').lower()}"]
    out = dvc(["exp", "run", "-S", "distill.method=cmkd", *[a for s in switches for a in ("-S", s)]],
              workdir=workdir)
    assert _ran(out, ["validate", "distill", "evaluate", "report"])
    results = json.loads((workdir / "results" / "report" / "results.json").read_text())
    assert _summary(workdir)["method"] == "cmkd"
    assert results["mean"]["student"]["target"]["acc"] > CHANCE + 20
    assert results["mean"]["extra:clip_zeroshot"]["target"]["acc"] > CHANCE + 20  # the paper's CLIP rows
    students = workdir / "models" / "students" / "usps_to_mnist"
    log = json.loads((students / "train_log.json").read_text())
    assert len(log["epochs"]) == 3 and all(e["iterations"] == 40 for e in log["epochs"])
    assert ("fm_h" in log["epochs"][0]) == (variant == "fixmatch")
    total = results["parameters_total"]
    assert total["dsp_paper"] == total["changed"] + 2 * 10 * 32  # d x C per task, 2 tasks (student embed_dim 32)
    assert (students / "residual.safetensors").is_file() == (variant == "rst")
    if variant == "rst":  # tau 1e-5: a sparse residual (about 0.4 % of the tower on these stand-ins)
        assert 0 < log["dsp"]["changed"] < 0.05 * log["trainable_params"] and 0 < total["bytes"] < 20_000
        bundle = (workdir / "models" / "bundles" / "usps_to_mnist" / "model.safetensors").stat().st_size
        assert bundle < 40_000  # the residual and the head, not the tower
    _check_bundles(workdir, tmp_path, monkeypatch, f"cmkd-{variant}")


def test_promptsrc_teacher_runs_through_dvc(smoke):
    """PromptSRC (IVLP + SCL + GPA) re-runs the prompts stage and everything after it; ND loss, kNN refinement."""
    workdir, _ = smoke
    out = dvc(["exp", "run", "-S", "distill.method=promptkd", "-S", "distill.epochs=2", "-S", "prompts.epochs=2",
               "-S", "prompts.kind=promptsrc", "-S", "prompts.text_weight=25", "-S", "prompts.kl_weight=1",
               "-S", "prompts.gpa_mean=2", "-S", "distill.promptkd.loss.name=nd", "-S", "distill.refine_knn=5"],
              workdir=workdir)  # ND reads the prompted features
    assert _ran(out, ["validate", "prompts", "features", "distill", "evaluate", "report"])
    log = json.loads((workdir / "models" / "students" / "usps_to_mnist" / "train_log.json").read_text())
    assert (log["loss"], log["refine_knn"], len(log["epochs"])) == ("nd", 5, 2)
    meta = json.loads((workdir / "data" / "features" / "tasks" / "usps_to_mnist" / "meta.json").read_text())
    assert meta["visual_prompts"] and meta["gpa"] and meta["teacher_rows"] == 1
    assert (workdir / "data" / "features" / "tasks" / "usps_to_mnist" / "target_features.npy").is_file()

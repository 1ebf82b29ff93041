"""Metrics (hand-computed cases, validation, epoch selection) and the cross-task report."""
from __future__ import annotations

import copy
import csv
import json

import numpy as np
import pytest

from pipeline.evaluation.metrics import SELECTION_NOTE, classification_metrics, epoch_summary
from pipeline.evaluation.report import build_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --- classification_metrics -------------------------------------------------------------------------------

def test_hand_computed_metrics_with_an_empty_class():
    # class 0: 3/4 right, class 1: 1/2, class 2: 1/1, class 3: no sample.
    labels = [0, 0, 0, 0, 1, 1, 2]
    preds = [0, 0, 0, 1, 1, 0, 2]
    m = classification_metrics(labels, preds, num_classes=4)
    assert m["n"] == 7
    assert m["acc"] == pytest.approx(100 * 5 / 7)
    assert m["mean_class_acc"] == pytest.approx((75 + 50 + 100) / 3)  # the empty class is left out
    assert m["per_class"] == [75.0, 50.0, 100.0, None]
    assert m["confusion"] == [[3, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    json.dumps(m)  # plain Python types only


def test_metrics_accept_arrays_and_integral_floats():
    m = classification_metrics(np.array([1, 0], dtype=np.uint8), np.array([1.0, 1.0]), 2)
    assert m["acc"] == 50.0 and m["per_class"] == [0.0, 100.0]


@pytest.mark.parametrize("labels, preds, match", [
    ([0, 1], [0], "length"),
    ([0, 5], [0, 1], "5"),
    ([0, 1], [-1, 1], "-1"),
    ([0, 1], [0, 1.5], "1.5"),
    ([[0, 1]], [[0, 1]], "1-D"),
    ([], [], "empty"),
])
def test_metrics_validation(labels, preds, match):
    with pytest.raises(ValueError, match=match):
        classification_metrics(labels, preds, num_classes=3)


def test_metrics_reject_bad_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        classification_metrics([0], [0], num_classes=0)


# --- epoch_summary ----------------------------------------------------------------------------------------

def test_epoch_summary_best_last_and_ties():
    labels = [0, 0, 1, 1]
    preds = np.array([
        [0, 0, 0, 0],  # 50
        [0, 0, 1, 1],  # 100  <- best: earliest of the tie
        [0, 0, 1, 1],  # 100
        [1, 1, 1, 0],  # 25   <- last
    ])
    s = epoch_summary(labels, preds, num_classes=2)
    assert s["per_epoch"] == [50.0, 100.0, 100.0, 25.0]
    assert s["per_epoch_mean_class"] == [50.0, 100.0, 100.0, 25.0]
    assert s["best_epoch"] == 2
    assert s["best"]["acc"] == 100.0
    assert s["last"]["acc"] == 25.0 and s["last"]["confusion"] == [[0, 2], [1, 1]]
    assert s["selection"] == SELECTION_NOTE and "oracle" in s["selection"]


def test_epoch_summary_validation():
    with pytest.raises(ValueError, match="shape"):
        epoch_summary([0, 1], np.array([0, 1]), 2)  # 1-D, not [epochs, samples]
    with pytest.raises(ValueError, match="length"):
        epoch_summary([0, 1], np.zeros((2, 3), dtype=int), 2)


# --- build_report -----------------------------------------------------------------------------------------

def _task(name, source, target, seed, student_epochs, teacher_epochs, n=40, k=3):
    """A metrics.json as the evaluate stage writes it, from random predictions that improve per epoch."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)

    def epochs(count, start):
        out = []
        for e in range(count):
            keep = rng.random(n) < start + 0.1 * e
            out.append(np.where(keep, labels, rng.integers(0, k, n)))
        return np.stack(out)

    return {
        "task": name, "dataset": "digits", "source": source, "target": target,
        "classes": ["zero", "one", "two"], "protocol": "transductive: adapt and evaluate on the target split",
        "models": {
            "zeroshot_teacher": {"target": classification_metrics(labels, epochs(1, 0.3)[0], k),
                                 "source": classification_metrics(labels, epochs(1, 0.4)[0], k)},
            "source_teacher": {"target": epoch_summary(labels, epochs(teacher_epochs, 0.4), k),
                               "source": epoch_summary(labels, epochs(teacher_epochs, 0.6), k)},
            "student": {"target": epoch_summary(labels, epochs(student_epochs, 0.5), k)},
        },
    }


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tasks = {"usps_to_mnist": _task("usps_to_mnist", "usps", "mnist", 0, 3, 3),
             "mnist_to_usps": _task("mnist_to_usps", "mnist", "usps", 1, 4, 2, n=30)}
    out = tmp_path_factory.mktemp("report")
    results = build_report(copy.deepcopy(tasks), out)
    return tasks, out, results


def test_results_json_keys_and_values(report):
    tasks, out, results = report
    assert json.loads((out / "results.json").read_text()) == results
    assert list(results["tasks"]) == ["mnist_to_usps", "usps_to_mnist"]  # sorted: stable across reruns
    for name, m in tasks.items():
        r = results["tasks"][name]
        assert set(r) == {"zeroshot_teacher", "source_teacher", "student"}
        assert set(r["zeroshot_teacher"]) == {"target", "source"} and set(r["student"]) == {"target"}
        zs = m["models"]["zeroshot_teacher"]["target"]
        assert r["zeroshot_teacher"]["target"] == {"acc": round(zs["acc"], 2),
                                                   "mean_class_acc": round(zs["mean_class_acc"], 2)}
        st = m["models"]["student"]["target"]
        assert r["student"]["target"]["acc"] == round(st["last"]["acc"], 2)  # headline = last epoch
        assert r["student"]["target"]["mean_class_acc"] == round(st["last"]["mean_class_acc"], 2)
        assert r["student"]["target"]["best_acc"] == round(max(st["per_epoch"]), 2)
        assert r["student"]["target"]["best_epoch"] == st["best_epoch"]
        assert {"best_acc", "best_epoch"} <= set(r["source_teacher"]["source"])


def test_mean_over_tasks(report):
    _, out, results = report
    for model in ("zeroshot_teacher", "source_teacher", "student"):
        for key in ("acc", "mean_class_acc"):
            per_task = [results["tasks"][t][model]["target"][key] for t in results["tasks"]]
            assert results["mean"][model]["target"][key] == pytest.approx(np.mean(per_task), abs=0.0051)  # rounding
    md = (out / "results.md").read_text()
    mean_row = next(line for line in md.splitlines() if line.startswith("| **mean"))
    student = results["mean"]["student"]["target"]
    assert f"{student['acc']:.2f} / {student['mean_class_acc']:.2f}" in mean_row


def test_markdown_table(report):
    tasks, out, _ = report
    md = (out / "results.md").read_text()
    for name, m in tasks.items():
        assert f"| {name} | {m['source']} → {m['target']} |" in md
    assert "student (best, oracle)" in md and "mean-class" in md and "VisDA" in md


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def test_plot_csvs(report):
    tasks, out, _ = report
    acc = _rows(out / "plots" / "accuracy" / "mnist_to_usps.csv")
    assert acc[0] == ["epoch", "student", "teacher"]
    assert [r[0] for r in acc[1:]] == ["1", "2", "3", "4"]
    # x is the student's epoch; the teacher (2 prompt epochs of its own) is its final accuracy on every row
    final = round(tasks["mnist_to_usps"]["models"]["source_teacher"]["target"]["last"]["acc"], 2)
    assert {float(r[2]) for r in acc[1:]} == {final}
    assert all(r[1] != "" for r in acc[1:])
    for name, m in tasks.items():
        conf = _rows(out / "plots" / "confusion" / f"{name}.csv")
        assert conf[0] == ["actual", "predicted"]
        assert len(conf) - 1 == m["models"]["student"]["target"]["last"]["n"]
        correct = sum(a == p for a, p in conf[1:])
        assert 100 * correct / (len(conf) - 1) == pytest.approx(m["models"]["student"]["target"]["last"]["acc"])
        assert {a for a, _ in conf[1:]} <= set(m["classes"])


def test_pngs_and_no_temp_files(report):
    tasks, out, _ = report
    for name in ["accuracy_per_epoch.png", *(f"confusion_{t}.png" for t in tasks)]:
        assert (out / "figures" / name).read_bytes()[:8] == PNG_SIGNATURE
    assert not [p for p in out.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]


@pytest.mark.parametrize("path, missing", [
    (("models", "student"), "models.student"),
    (("models", "source_teacher", "source", "best"), "models.source_teacher.source.best"),
    (("classes",), "classes"),
])
def test_report_names_task_and_missing_key(tmp_path, path, missing):
    m = _task("a_to_b", "a", "b", 2, 2, 2)
    parent = m
    for key in path[:-1]:
        parent = parent[key]
    del parent[path[-1]]
    with pytest.raises(ValueError, match=rf"'a_to_b'.*{missing}"):
        build_report({"a_to_b": m}, tmp_path)
    assert not any(tmp_path.iterdir())  # validation happens before anything is written


def test_extra_inference_rules_and_parameter_sums(tmp_path):
    """CMKD-style extras (other inference rules, with notes) and DSP counts summed over the tasks."""
    tasks = {}
    for i, name in enumerate(("a_to_b", "b_to_a")):
        m = _task(name, "a", "b", i, 2, 2)
        labels = np.array(m["models"]["student"]["target"]["last"]["confusion"]).sum(1)  # class sizes only
        y = np.repeat(np.arange(3), labels)
        m["extras"] = {"clip_zeroshot": {"target": epoch_summary(y, y[None], 3), "note": "the paper's CLIP rows"}}
        m["parameters"] = {"trainable": 100, "changed": 10 + i, "dsp_paper": 40 + i, "dsp_code": 52 + i}
        tasks[name] = m
    results = build_report(tasks, tmp_path)
    assert results["tasks"]["a_to_b"]["extras"]["clip_zeroshot"]["acc"] == 100.0
    assert results["mean"]["extra:clip_zeroshot"]["target"]["acc"] == 100.0
    assert results["parameters_total"] == {"changed": 21, "dsp_code": 105, "dsp_paper": 81, "trainable": 200}
    md = (tmp_path / "results.md").read_text()
    assert "| **sum** | 21 | 105 | 81 | 200 |" in md and "`clip_zeroshot`: the paper's CLIP rows" in md

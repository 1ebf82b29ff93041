"""Metrics (hand-computed cases, validation, epoch selection) and the cross-task report."""
from __future__ import annotations

import copy
import csv
import json

from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.evaluation.metrics import SELECTION_NOTE, classification_metrics, epoch_summary
from pipeline.evaluation.report import build_report, class_labels

ROOT = Path(__file__).resolve().parent.parent

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

def _task(name, source, target, seed, student_epochs, teacher_epochs, n=40, classes=("zero", "one", "two")):
    """A metrics.json as the evaluate stage writes it, from random predictions that improve per epoch."""
    k = len(classes)
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
        "classes": list(classes), "protocol": "transductive: adapt and evaluate on the target split",
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
        assert {a for a, _ in conf[1:]} <= {"0 zero", "1 one", "2 two"}


def test_confusion_csv_sorts_in_class_order_with_true_classes_where_the_png_has_them(tmp_path):
    """11 classes named against the alphabet: DVC's template sorts labels as text, so the zero-padded index
    must give class order ("02" before "10"); y is the true class (the PNG's rows), x the predicted one."""
    names = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
    m = _task("a_to_b", "a", "b", 0, 2, 2, n=200, classes=names)
    build_report({"a_to_b": m}, tmp_path)
    labels = class_labels(list(names))
    assert labels[2] == "02 two" and labels[10] == "10 ten" and sorted(labels) == labels
    rows = _rows(tmp_path / "plots" / "confusion" / "a_to_b.csv")[1:]
    confusion = m["models"]["student"]["target"]["last"]["confusion"]  # [true][predicted], as the PNG draws it
    counted = np.zeros((11, 11), dtype=int)
    for actual, predicted in rows:
        counted[labels.index(actual), labels.index(predicted)] += 1
    assert counted.tolist() == confusion
    plots = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    definition = next(p for entry in plots if isinstance(entry, dict) for path, p in entry.items()
                      if path.endswith("/plots/confusion"))
    assert (definition["x"], definition["y"]) == ("predicted", "actual")  # PNG: x predicted, y true
    assert definition["y_label"] == "true class" and definition["x_label"] == "predicted class"


def _leaves(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, f"{path}.{k}" if path else k)
    else:
        yield path, obj


def _declared_metrics(out):
    """The report stage's metrics files as dvc.yaml declares them, in order, found in ``out``."""
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["report"]
    names = [next(iter(e)) if isinstance(e, dict) else e for e in stage["metrics"]]
    assert all(n.startswith("${paths.report}/") for n in names)
    return [out / n.removeprefix("${paths.report}/") for n in names]


def test_headline_is_the_first_metrics_file_with_student_and_teacher_per_task_and_mean(report):
    tasks, out, results = report
    files = _declared_metrics(out)
    assert [f.name for f in files] == ["headline.json", "results.json"]  # `dvc exp show` lists headline first
    headline = json.loads(files[0].read_text())
    assert list(headline) == ["mean", "mnist_to_usps", "usps_to_mnist"]  # columns: mean.student.acc, ...
    for name, m in tasks.items():
        row = headline[name]
        for model in ("student", "source_teacher"):
            last = m["models"][model]["target"]["last"]  # the reported (last) epoch, never the oracle's best
            assert row[model] == {"acc": round(last["acc"], 2), "mean_class_acc": round(last["mean_class_acc"], 2)}
    for model in ("student", "source_teacher"):
        for key in ("acc", "mean_class_acc"):
            assert headline["mean"][model][key] == results["mean"][model]["target"][key]


def test_metrics_files_hold_numbers_only_and_the_words_go_to_the_summary(tmp_path):
    tasks = {}
    for i, name in enumerate(("a_to_b", "b_to_a")):  # CMKD-style: method, extras with notes, parameter counts
        m = _task(name, "a", "b", i, 2, 2)
        m.update(method="cmkd", headline="mean_class_acc" if i else "acc")
        m["extras"] = {"clip_zeroshot": {"target": m["models"]["student"]["target"], "note": "the CLIP rows"}}
        m["parameters"] = {"trainable": 100, "changed": 10}
        tasks[name] = m
    build_report(tasks, tmp_path)
    for path in _declared_metrics(tmp_path):
        words = [(k, v) for k, v in _leaves(json.loads(path.read_text()))
                 if isinstance(v, bool) or not isinstance(v, (int, float))]
        assert not words, f"{path.name} holds non-numbers: {words}"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["method"] == "cmkd"
    assert summary["headline_metric"] == {"a_to_b": "acc", "b_to_a": "mean_class_acc"}
    assert summary["tasks"]["a_to_b"] == {"dataset": "digits", "source": "a", "target": "b"}
    assert summary["protocol"] == ["transductive: adapt and evaluate on the target split"]
    assert summary["extra_rules"] == {"clip_zeroshot": "the CLIP rows"}
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["report"]
    assert {"${paths.report}/summary.json": {"cache": False}} in stage["outs"]  # a DVC output, not metrics


def test_pngs_and_no_temp_files(report):
    tasks, out, _ = report
    for name in ["accuracy_per_epoch.png", *(f"confusion_{t}.png" for t in tasks)]:
        assert (out / "figures" / name).read_bytes()[:8] == PNG_SIGNATURE
    assert not [p for p in out.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]


def test_a_task_named_mean_is_refused(tmp_path):
    with pytest.raises(ValueError, match="task name 'mean' is taken"):
        build_report({"mean": _task("mean", "a", "b", 0, 2, 2)}, tmp_path)


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


def test_per_task_plots_are_titled_by_their_files_which_name_the_task():
    """dvc.yaml cannot list the tasks of params: per-task plots are folders of one file per task, and DVC titles
    each file's plot with its path (``.../accuracy/<task>.csv``) unless the definition sets a title."""
    plots = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    folders = {path: p for entry in plots if isinstance(entry, dict) for path, p in entry.items() if p}
    assert set(folders) == {"${paths.report}/plots/accuracy", "${paths.report}/plots/confusion", "${paths.curves}"}
    assert not [path for path, p in folders.items() if "title" in p]


def _with_seeds(m, runs):
    """``m`` with the student scored over seeds: ``runs`` = {seed: (acc, mean_class_acc, per_epoch)}."""
    m = copy.deepcopy(m)
    m["models"]["student"]["seeds"] = {
        str(seed): {"acc": acc, "mean_class_acc": mca, "best_acc": max(curve), "best_mean_class_acc": mca + 1,
                    "per_epoch": curve} for seed, (acc, mca, curve) in runs.items()}
    return m


def test_several_seeds_give_mean_and_sample_std_per_task_and_for_the_benchmark_mean(tmp_path):
    a = _with_seeds(_task("a", "usps", "mnist", 0, 3, 3),
                    {1: (60.0, 50.0, [40.0, 50.0, 60.0]), 2: (70.0, 52.0, [45.0, 55.0, 70.0]),
                     3: (80.0, 57.0, [50.0, 60.0, 80.0])})
    b = _with_seeds(_task("b", "mnist", "usps", 1, 3, 3),
                    {1: (30.0, 20.0, [10.0, 20.0, 30.0]), 2: (34.0, 26.0, [12.0, 22.0, 34.0]),
                     3: (32.0, 20.0, [11.0, 21.0, 32.0])})
    results = build_report({"a": a, "b": b}, tmp_path)
    sa, sb = results["tasks"]["a"]["student"]["target"], results["tasks"]["b"]["student"]["target"]
    # by hand: a = 70 ± 10 (sample std of 60, 70, 80); mean-class 53 ± sqrt(((-3)² + (-1)² + 4²) / 2) = 3.61
    assert (sa["acc"], sa["acc_std"], sa["mean_class_acc"], sa["mean_class_acc_std"]) == (70.0, 10.0, 53.0, 3.61)
    assert (sb["acc"], sb["acc_std"], sa["n_seeds"]) == (32.0, 2.0, 3)
    assert sa["best_acc"] == 70.0  # mean of each seed's best epoch (60, 70, 80)
    # benchmark mean per seed: (60+30)/2 = 45, (70+34)/2 = 52, (80+32)/2 = 56 -> 51 ± 5.57
    mean = results["mean"]["student"]["target"]
    assert (mean["acc"], mean["acc_std"], mean["n_seeds"]) == (51.0, 5.57, 3)
    headline = json.loads((tmp_path / "headline.json").read_text())
    assert headline["mean"]["student"] == {"acc": 51.0, "mean_class_acc": mean["mean_class_acc"], "acc_std": 5.57,
                                           "mean_class_acc_std": mean["mean_class_acc_std"]}
    assert "acc_std" not in headline["a"]["source_teacher"]  # the teacher is trained once
    md = (tmp_path / "results.md").read_text()
    assert "70.00 ± 10.00 / 53.00 ± 3.61" in md and "51.00 ± 5.57" in md and "over 3 seeds (1, 2, 3)" in md
    # the accuracy plot: mean and std per epoch over seeds (epoch 3 of task a: 70 ± 10)
    header, *rows = _rows(tmp_path / "plots" / "accuracy" / "a.csv")
    assert header == ["epoch", "student", "teacher", "student_std"]
    assert (rows[2][1], rows[2][3], rows[0][1]) == ("70.0", "10.0", "45.0")


def test_one_seed_keeps_the_table_without_std_and_seeds_must_match_across_tasks(tmp_path):
    one = _with_seeds(_task("a", "usps", "mnist", 0, 3, 3), {1: (60.0, 50.0, [40.0, 50.0, 60.0])})
    results = build_report({"a": one}, tmp_path / "one")
    assert "acc_std" not in results["tasks"]["a"]["student"]["target"] and "±" not in (
        tmp_path / "one" / "results.md").read_text()
    three = _with_seeds(_task("b", "mnist", "usps", 1, 3, 3),
                        {s: (30.0, 20.0, [10.0, 20.0, 30.0]) for s in (1, 2, 3)})
    with pytest.raises(ValueError, match="different seeds"):
        build_report({"a": one, "b": three}, tmp_path / "mixed")

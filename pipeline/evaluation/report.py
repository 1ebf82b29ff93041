"""Cross-task report: metrics for ``dvc metrics`` / ``dvc exp show``, results.md, CSVs for ``dvc plots``, PNGs.

Files (in ``paths.report``): ``headline.json`` (metrics, shown first: for the mean and each task, the student's
last-epoch target accuracy and mean-class accuracy and the source-prompted teacher's), ``results.json``
(metrics: the full table), ``summary.json`` (the words: method, headline metric per task, domains, protocol,
notes; not metrics, whose every value `dvc exp show` makes a column), ``results.md``, ``plots/accuracy/<task>.csv``
(student and teacher target accuracy per epoch), ``plots/confusion/<task>.csv`` (one row per target sample,
classes labelled ``"03 three"``, see :func:`class_labels`) and ``figures/*.png``.

Input is one ``results/evaluate/<task>/metrics.json`` per task::

    {"task", "dataset", "source", "target", "classes", "protocol", "headline" (optional: acc | mean_class_acc),
     "models": {"zeroshot_teacher": {"target": METRICS, "source": METRICS},
                "source_teacher":   {"target": EPOCH_SUMMARY, "source": EPOCH_SUMMARY},
                "student":          {"target": EPOCH_SUMMARY,
                                     "seeds" (optional): {seed: {acc, mean_class_acc, best_acc,
                                                                 best_mean_class_acc, per_epoch}}}},
     "extras" (optional): {rule: {"target": EPOCH_SUMMARY, "note"}},   other inference rules of the student
     "parameters" (optional): {"trainable", and for CMKD "changed", "dsp_paper", "dsp_code", "bytes" ...}}

where METRICS comes from ``metrics.classification_metrics`` and EPOCH_SUMMARY from ``metrics.epoch_summary``.
For EPOCH_SUMMARY models the headline numbers are the LAST epoch; the best epoch is picked with target labels
(an oracle) and is reported beside it, never instead of it. With more than one distill seed the student's numbers
are means over the seeds with ``*_std`` beside them (sample standard deviation, n - 1); the mean row's std is
taken over the seeds' benchmark means, as the originals report it; ``best_epoch`` and the confusion matrix are
the first seed's run (the shipped student).
"""
from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless stages: never try to open a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from pipeline.io import atomic_dir, atomic_write_bytes, atomic_write_json, atomic_write_text  # noqa: E402

# model -> (splits, whether the split holds an EPOCH_SUMMARY rather than plain METRICS)
MODELS: dict[str, tuple[tuple[str, ...], bool]] = {
    "zeroshot_teacher": (("target", "source"), False),
    "source_teacher": (("target", "source"), True),
    "student": (("target",), True),
}
_METRIC_KEYS = ("acc", "mean_class_acc")
_SEED_KEYS = ("acc", "mean_class_acc", "best_acc", "best_mean_class_acc")  # averaged over seeds
HEADLINE_MODELS = ("student", "source_teacher")  # headline.json: the reported model and its teacher
_EPOCH_KEYS = ("per_epoch", "last", "best", "best_epoch")
# The report's files (dvc.yaml declares headline.json and results.json as metrics: numbers only)
HEADLINE, RESULTS, SUMMARY = "headline.json", "results.json", "summary.json"
_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # task names become file names

NOTE = (
    "Each cell: target-domain accuracy / mean-class accuracy (%, mean over classes with at least one sample).\n\n"
    "**Student (last)** is the reported model: the final epoch, chosen without target labels. "
    "**Student (best, oracle)** is the epoch with the highest target accuracy, picked by looking at the "
    "target labels; it is an upper bound, not an achievable unsupervised result. "
    "The source-prompted teacher is shown at its last epoch.\n\n"
    "VisDA-style benchmarks (class-imbalanced targets) headline mean-class accuracy; the other benchmarks "
    "headline overall accuracy. The *headline* column names the metric each task's benchmark reports."
)


def _r(x: float) -> float:
    return round(float(x), 2)


def _get(task: str, obj: dict[str, Any], path: str) -> Any:
    """``obj[a][b]...`` for ``path='a.b...'``, or a ValueError naming the task and the missing key."""
    cur: Any = obj
    for i, key in enumerate(path.split(".")):
        if not isinstance(cur, dict) or key not in cur:
            where = ".".join(path.split(".")[:i]) or "top level"
            raise ValueError(f"task {task!r}: metrics.json lacks key {path!r} (no {key!r} under {where})")
        cur = cur[key]
    return cur


def _check(task: str, m: dict[str, Any]) -> None:
    """Fail before anything is written if ``m`` lacks a key the report reads."""
    if not _TASK_NAME.match(task):
        raise ValueError(f"task name {task!r} is not usable as a file name")
    if task == "mean":
        raise ValueError("task name 'mean' is taken: headline.json holds the mean over tasks under that key")
    for key in ("source", "target", "classes"):
        _get(task, m, key)
    for model, (splits, epochs) in MODELS.items():
        for split in splits:
            base = f"models.{model}.{split}"
            if epochs:
                for key in _EPOCH_KEYS:
                    _get(task, m, f"{base}.{key}")
                for which in ("last", "best"):
                    for key in _METRIC_KEYS:
                        _get(task, m, f"{base}.{which}.{key}")
            else:
                for key in _METRIC_KEYS:
                    _get(task, m, f"{base}.{key}")
    confusion = _get(task, m, "models.student.target.last.confusion")
    if len(confusion) != len(m["classes"]):
        raise ValueError(f"task {task!r}: student confusion is {len(confusion)}x{len(confusion)} "
                         f"but there are {len(m['classes'])} classes")
    if not m["models"]["student"]["target"]["per_epoch"]:
        raise ValueError(f"task {task!r}: models.student.target.per_epoch is empty")


def _split_entry(split: dict[str, Any], epochs: bool) -> dict[str, Any]:
    if not epochs:
        return {k: _r(split[k]) for k in _METRIC_KEYS}
    return {"acc": _r(split["last"]["acc"]), "mean_class_acc": _r(split["last"]["mean_class_acc"]),
            "best_acc": _r(split["best"]["acc"]), "best_mean_class_acc": _r(split["best"]["mean_class_acc"]),
            "best_epoch": int(split["best_epoch"])}


def _seeds(m: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The student's runs per seed (one entry, or none in an older metrics.json, for a single seed)."""
    return m["models"]["student"].get("seeds") or {}


def _std(values: list[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _over_seeds(entry: dict[str, Any], seeds: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A task's student entry as means over its seeds, with the std of the two headline metrics."""
    runs = list(seeds.values())
    out = dict(entry, **{k: _r(np.mean([r[k] for r in runs])) for k in _SEED_KEYS})
    out.update({f"{k}_std": _r(_std([r[k] for r in runs])) for k in _METRIC_KEYS})
    return {**out, "n_seeds": len(runs)}


def _results(task_metrics: dict[str, dict[str, Any]]) -> dict[str, Any]:
    tasks = {task: {model: {split: _split_entry(m["models"][model][split], epochs) for split in splits}
                    for model, (splits, epochs) in MODELS.items()}
             for task, m in task_metrics.items()}
    seeded = {task: _seeds(m) for task, m in task_metrics.items() if len(_seeds(m)) > 1}
    if seeded and (len(seeded) != len(tasks) or len({tuple(v) for v in seeded.values()}) != 1):
        found = {task: list(_seeds(m)) for task, m in task_metrics.items()}
        raise ValueError(f"tasks were evaluated over different seeds ({found}); re-run the distill and evaluate "
                         "stages")
    for task, seeds in seeded.items():
        tasks[task]["student"]["target"] = _over_seeds(tasks[task]["student"]["target"], seeds)
    # Means are taken over the rounded per-task values so the mean row can be re-derived from the table.
    mean = {}
    for model, (_, epochs) in MODELS.items():
        keys = ("acc", "mean_class_acc") + (("best_acc", "best_mean_class_acc") if epochs else ())
        mean[model] = {"target": {k: _r(np.mean([tasks[t][model]["target"][k] for t in tasks])) for k in keys}}
    if seeded:  # the spread of the benchmark mean: over the seeds' own means over tasks
        seeds = next(iter(seeded.values()))
        for k in _METRIC_KEYS:
            per_seed = [np.mean([seeded[t][s][k] for t in tasks]) for s in seeds]
            mean["student"]["target"][f"{k}_std"] = _r(_std(per_seed))
        mean["student"]["target"]["n_seeds"] = len(seeds)
    for task, m in task_metrics.items():
        if m.get("extras"):
            tasks[task]["extras"] = {rule: _split_entry(e["target"], True) for rule, e in m["extras"].items()}
        if m.get("parameters"):
            tasks[task]["parameters"] = {k: int(v) for k, v in m["parameters"].items()}
    extra_rules = sorted({rule for t in tasks.values() for rule in t.get("extras", {})})
    for rule in extra_rules:
        rows = [t["extras"][rule] for t in tasks.values() if rule in t.get("extras", {})]
        mean[f"extra:{rule}"] = {"target": {k: _r(np.mean([r[k] for r in rows])) for k in ("acc", "mean_class_acc")}}
    counted = [t["parameters"] for t in tasks.values() if "parameters" in t]
    # CMKD reports downstream parameters summed over a benchmark's tasks (its DSP); so is every count here
    totals = {k: sum(p[k] for p in counted) for k in sorted(set.intersection(*map(set, counted)))} if counted else {}
    return {"tasks": tasks, "mean": mean, **({"parameters_total": totals} if totals else {})}


def _headline(results: dict[str, Any]) -> dict[str, Any]:
    """The few numbers ``dvc exp show`` leads with, ``{"mean" | <task>: {student | source_teacher: {acc,
    mean_class_acc}}}`` (the student's with ``acc_std`` and ``mean_class_acc_std`` over several seeds): the reported student (last epoch) beside the source-prompted teacher it learned from,
    on the target; the mean first, tasks at the top level so the columns stay short (``mean.student.acc``)."""
    def pick(row: dict[str, Any]) -> dict[str, Any]:
        keys = _METRIC_KEYS + tuple(f"{k}_std" for k in _METRIC_KEYS)  # the stds only with several seeds
        return {model: {k: row[model]["target"][k] for k in keys if k in row[model]["target"]}
                for model in HEADLINE_MODELS}

    return {"mean": pick(results["mean"]), **{task: pick(row) for task, row in results["tasks"].items()}}


def _summary(task_metrics: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What the report says in words (metrics files hold numbers only: `dvc exp show` makes every value a column)."""
    methods = sorted({str(m["method"]) for m in task_metrics.values() if "method" in m})
    protocols = sorted({str(m["protocol"]) for m in task_metrics.values() if "protocol" in m})
    notes = {rule: e["note"] for m in task_metrics.values() for rule, e in m.get("extras", {}).items()}
    summary: dict[str, Any] = {"method": ", ".join(methods)} if methods else {}
    # Both metrics are always recorded; the headline says which one a benchmark reports (VisDA: mean-class).
    summary["headline_metric"] = {task: m.get("headline", "acc") for task, m in task_metrics.items()}
    summary["tasks"] = {task: {k: m[k] for k in ("dataset", "source", "target") if k in m}
                        for task, m in task_metrics.items()}
    if protocols:
        summary["protocol"] = protocols
    if notes:
        summary["extra_rules"] = notes  # what each other inference rule of results.json's extras is
    return summary


def _markdown(task_metrics: dict[str, dict[str, Any]], results: dict[str, Any], summary: dict[str, Any]) -> str:
    def cell(entry: dict[str, Any], prefix: str = "") -> str:
        def value(key: str) -> str:
            std = entry.get(f"{key}_std") if not prefix else None
            return f"{entry[prefix + key]:.2f}" + (f" ± {std:.2f}" if std is not None else "")
        return f"{value('acc')} / {value('mean_class_acc')}"

    def row(name: str, pair: str, r: dict[str, Any], headline: str) -> str:
        cells = [cell(r["zeroshot_teacher"]["target"]), cell(r["source_teacher"]["target"]),
                 cell(r["student"]["target"]), cell(r["student"]["target"], "best_")]
        return "| " + " | ".join([name, pair, *cells, headline]) + " |"

    names = {"acc": "accuracy", "mean_class_acc": "mean-class"}
    lines = ["# Target-domain accuracy", "",
             "| task | source → target | zero-shot teacher | source-prompted teacher | student (last) "
             "| student (best, oracle) | headline |",
             "|---|---|---:|---:|---:|---:|---|"]
    for task, m in task_metrics.items():
        lines.append(row(task, f"{m['source']} → {m['target']}", results["tasks"][task],
                         names[summary["headline_metric"][task]]))
    lines.append(row(f"**mean ({len(task_metrics)} tasks)**", "", results["mean"], ""))
    lines += ["", NOTE]
    seeded = next((m for m in task_metrics.values() if len(_seeds(m)) > 1), None)
    if seeded is not None:
        seeds = ", ".join(_seeds(seeded))
        lines += ["", f"Student columns: mean ± standard deviation (sample, n - 1) over {len(_seeds(seeded))} seeds "
                      f"({seeds}); the mean row's deviation is over the seeds' means over tasks. The shipped "
                      "bundle, the confusion matrices and the oracle epochs are the first seed's run."]
    best_epochs = ", ".join(f"{t}: {results['tasks'][t]['student']['target']['best_epoch']}" for t in task_metrics)
    lines += ["", f"Student best (oracle) epoch per task: {best_epochs}."]
    methods = sorted({str(m["method"]) for m in task_metrics.values() if "method" in m})
    if methods:
        lines += ["", f"Adaptation method (`distill.method`): {', '.join(methods)}. The student columns are the "
                      "adapted model (for dapl: the teacher CLIP with its learned domain prompts)."]
    lines += _extras_markdown(task_metrics, results)
    protocols = sorted({str(m["protocol"]) for m in task_metrics.values() if "protocol" in m})
    if protocols:
        lines += ["", "Protocol: " + "; ".join(protocols)]
    return "\n".join(lines) + "\n"


def _extras_markdown(task_metrics: dict[str, dict[str, Any]], results: dict[str, Any]) -> list[str]:
    """Other inference rules of the student and the parameter counts, when the method reports them."""
    lines = []
    rules = sorted({rule for t in results["tasks"].values() for rule in t.get("extras", {})})
    if rules:
        notes = {rule: m["extras"][rule]["note"] for m in task_metrics.values() for rule in m.get("extras", {})}
        lines += ["", "## Other inference rules of the adapted model (target accuracy / mean-class, last epoch)", "",
                  "| task | " + " | ".join(rules) + " |", "|---|" + "---:|" * len(rules)]
        for task, t in results["tasks"].items():
            cells = [f"{t['extras'][r]['acc']:.2f} / {t['extras'][r]['mean_class_acc']:.2f}" if r in t.get("extras", {})
                     else "" for r in rules]
            lines.append(f"| {task} | " + " | ".join(cells) + " |")
        means = [results["mean"][f"extra:{r}"]["target"] for r in rules]
        lines.append("| **mean** | " + " | ".join(f"{m['acc']:.2f} / {m['mean_class_acc']:.2f}" for m in means) + " |")
        lines += [""] + [f"- `{rule}`: {notes[rule]}" for rule in rules]
    totals = results.get("parameters_total")
    if totals:
        keys = list(totals)
        lines += ["", "## Parameters per task (summed over the benchmark in the last row)", "",
                  "| task | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
        for task, t in results["tasks"].items():
            lines.append(f"| {task} | " + " | ".join(f"{t['parameters'].get(k, 0):,}" for k in keys) + " |")
        lines.append("| **sum** | " + " | ".join(f"{totals[k]:,}" for k in keys) + " |")
        if "dsp_paper" in totals:
            lines += ["", "DSP (downstream parameters, CMKD): changed visual weights plus the head; `dsp_paper` counts "
                          "the head as one d x C layer, `dsp_code` as the original code does (+ BN and LN, 4d); "
                          "`bytes` is the residual file (RST) on disk."]
    return lines


def _csv(header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def _accuracy_csv(m: dict[str, Any]) -> str:
    # x is the distillation epoch; the teacher (its final prompt) is a constant reference on that axis,
    # since its prompt-training epochs are a different clock.
    teacher = _r(m["models"]["source_teacher"]["target"]["last"]["acc"])
    mean, std = _student_curve(m)
    if std is None:
        return _csv(["epoch", "student", "teacher"], [[e + 1, _r(acc), teacher] for e, acc in enumerate(mean)])
    return _csv(["epoch", "student", "teacher", "student_std"],
                [[e + 1, _r(acc), teacher, _r(sd)] for e, (acc, sd) in enumerate(zip(mean, std))])


def _student_curve(m: dict[str, Any]) -> tuple[list[float], list[float] | None]:
    """The student's target accuracy per epoch: over several seeds their mean and std per epoch, else the one run."""
    seeds = _seeds(m)
    if len(seeds) < 2:
        return m["models"]["student"]["target"]["per_epoch"], None
    curves = np.array([run["per_epoch"] for run in seeds.values()], dtype=float)
    return curves.mean(axis=0).tolist(), curves.std(axis=0, ddof=1).tolist()


def class_labels(classes: list[str]) -> list[str]:
    """``"03 three"``: DVC's confusion template sorts labels as text, so a zero-padded class index in front
    keeps the class order of the PNG and of the model's outputs."""
    width = len(str(len(classes) - 1))
    return [f"{i:0{width}d} {name}" for i, name in enumerate(classes)]


def _confusion_csv(m: dict[str, Any]) -> str:
    # DVC's confusion template counts rows, so each target sample becomes one (actual, predicted) row.
    labels = class_labels(m["classes"])
    confusion = m["models"]["student"]["target"]["last"]["confusion"]
    rows = [[labels[a], labels[p]]
            for a, counts in enumerate(confusion) for p, count in enumerate(counts) for _ in range(int(count))]
    return _csv(["actual", "predicted"], rows)


def _png(fig: plt.Figure) -> bytes:
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return buf.getvalue()


def _accuracy_png(task_metrics: dict[str, dict[str, Any]]) -> bytes:
    n = len(task_metrics)
    ncols = min(n, 3)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.8 * ncols, 3.6 * nrows), squeeze=False)
    for ax, (task, m) in zip(axes.flat, task_metrics.items()):
        models = m["models"]
        accs, std = _student_curve(m)
        epochs = np.arange(1, len(accs) + 1)
        ax.plot(epochs, accs, "o-", markersize=3,
                label="student" if std is None else f"student (mean ± std, {len(_seeds(m))} seeds)")
        if std is not None:
            ax.fill_between(epochs, np.subtract(accs, std), np.add(accs, std), alpha=0.25)
        ax.axhline(models["source_teacher"]["target"]["last"]["acc"], color="tab:orange", linestyle=":",
                   label="source-prompted teacher (final)")
        ax.axhline(models["zeroshot_teacher"]["target"]["acc"], color="grey", linestyle="--",
                   label="zero-shot teacher")
        ax.set_title(f"{task} ({m['source']} → {m['target']})", fontsize=10)
        ax.set_xlabel("distillation epoch")
        ax.set_ylabel("target accuracy (%)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    fig.tight_layout()
    return _png(fig)


def _confusion_png(task: str, m: dict[str, Any]) -> bytes:
    classes = m["classes"]
    last = m["models"]["student"]["target"]["last"]
    counts = np.asarray(last["confusion"], dtype=np.int64)
    k = len(classes)
    support = counts.sum(axis=1, keepdims=True)
    # Row-normalised colour so rare classes are as visible as common ones; empty rows stay at 0.
    norm = np.divide(counts, support, out=np.zeros(counts.shape, dtype=float), where=support > 0)
    side = min(max(4.5, 0.5 * k + 2.5), 24.0)  # DomainNet's 345 classes would otherwise make a 20k-px PNG
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if k <= 30:  # beyond that the digits overlap; colour alone still shows the structure
        fontsize = 9 if k <= 12 else 6
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=fontsize,
                        color="white" if norm[i, j] > 0.5 else "black")
    if k <= 100:
        ax.set_xticks(range(k), classes, rotation=45, ha="right", rotation_mode="anchor")
        ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"{task}: student, last epoch\nacc {last['acc']:.2f}% / mean-class {last['mean_class_acc']:.2f}%",
                 fontsize=10)
    fig.tight_layout()
    return _png(fig)


def build_report(task_metrics: dict[str, dict[str, Any]], out_dir: Path) -> dict[str, Any]:
    """Write the report for ``task_metrics`` (task name -> loaded metrics.json) into ``out_dir``.

    Returns the dict written to ``results.json`` (numbers only; the words are in ``summary.json``). Tasks
    appear in sorted order so reruns give identical files.
    """
    if not task_metrics:
        raise ValueError("build_report needs at least one task")
    task_metrics = {t: task_metrics[t] for t in sorted(task_metrics)}
    for task, m in task_metrics.items():
        _check(task, m)
    results = _results(task_metrics)
    out_dir = Path(out_dir)

    # plots/ belongs to the report alone: replacing it as a whole drops CSVs of tasks no longer evaluated.
    with atomic_dir(out_dir / "plots") as plots:
        for task, m in task_metrics.items():
            atomic_write_text(plots / "accuracy" / f"{task}.csv", _accuracy_csv(m))
            atomic_write_text(plots / "confusion" / f"{task}.csv", _confusion_csv(m))
    with atomic_dir(out_dir / "figures") as figures:  # PNGs for people (and `dvc plots` as images)
        atomic_write_bytes(figures / "accuracy_per_epoch.png", _accuracy_png(task_metrics))
        for task, m in task_metrics.items():
            atomic_write_bytes(figures / f"confusion_{task}.png", _confusion_png(task, m))
    summary = _summary(task_metrics)
    atomic_write_text(out_dir / "results.md", _markdown(task_metrics, results, summary))
    atomic_write_json(out_dir / SUMMARY, summary)
    atomic_write_json(out_dir / HEADLINE, _headline(results))
    # Written last: a results.json on disk means the rest of the report is complete.
    atomic_write_json(out_dir / RESULTS, results)
    return results

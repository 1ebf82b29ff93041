"""Every teacher kind and every method of the project side by side on the smoke configuration, with wall times.

One ``dvc exp run`` per row in a copy of a finished smoke project (``uda-distill smoke --workdir DIR``), one
after another, each row changing one thing from the default (CoOp teacher, promptkd student):

* a teacher row (``prompts.kind=...``) re-runs prompts, features, distill (promptkd), evaluate, bundle, report;
* a method row (``distill.method=...``) re-runs distill and what follows.

Per row: mean target accuracy over the tasks (last epoch) of the zero-shot teacher, the source-prompted
teacher and the adapted model; the training seconds of the row's own stage (prompts or distill, summed over
tasks and epochs from the train logs) and the wall time of the whole ``dvc exp run``. Writes Markdown and JSON.

    OMP_NUM_THREADS=1 python -m bench.method_table --project /work/smoke --out bench/results/method_table
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from pipeline.smoke import dvc

SCL = ["prompts.text_weight=25", "prompts.image_weight=10", "prompts.kl_weight=1", "prompts.gpa_mean=15"]
ROWS: list[tuple[str, str, list[str]]] = [  # (row, stage whose training is timed, -S settings)
    ("teacher coop (default; student promptkd)", "prompts", []),
    ("teacher cocoop", "prompts", ["prompts.kind=cocoop"]),
    ("teacher vpt", "prompts", ["prompts.kind=vpt"]),
    ("teacher ivlp", "prompts", ["prompts.kind=ivlp"]),
    ("teacher maple", "prompts", ["prompts.kind=maple"]),
    ("teacher promptsrc", "prompts", ["prompts.kind=promptsrc", *SCL]),
    ("method promptkd (default)", "distill", []),
    ("method ekda", "distill", ["distill.method=ekda"]),
    ("method dapl", "distill", ["distill.method=dapl"]),
    ("method cmkd", "distill", ["distill.method=cmkd"]),
    ("method pda", "distill", ["distill.method=pda"]),
]
LOGS = {"prompts": "models/prompts", "distill": "models/students"}


def _mean(results: dict, model: str) -> float:
    return results["mean"][model]["target"]["acc"]


def _train_seconds(workdir: Path, stage: str) -> float:
    logs = sorted((workdir / LOGS[stage]).glob("*/train_log.json"))
    return round(sum(e["seconds"] for p in logs for e in json.loads(p.read_text())["epochs"]), 1)


def _back_to_baseline(workdir: Path) -> None:
    """Undo the previous row: `dvc exp run -S` leaves its params and outputs in the workspace."""
    subprocess.run(["git", "checkout", "--", "."], cwd=workdir, check=True)  # params, dvc.lock, metrics
    dvc(["checkout", "--force"], workdir=workdir)


def run_row(workdir: Path, stage: str, settings: list[str]) -> dict:
    _back_to_baseline(workdir)
    start = time.perf_counter()
    if settings:
        dvc(["exp", "run", *[a for s in settings for a in ("-S", s)]], workdir=workdir)
    wall = round(time.perf_counter() - start, 1)
    results = json.loads((workdir / "results" / "report" / "results.json").read_text())
    return {"zero_shot": _mean(results, "zeroshot_teacher"), "source_teacher": _mean(results, "source_teacher"),
            "adapted": _mean(results, "student"), "train_s": _train_seconds(workdir, stage),
            "exp_run_wall_s": wall if settings else None}


def markdown(rows: list[dict]) -> str:
    lines = ["| row | zero-shot | source teacher | adapted (last) | training s | `dvc exp run` s |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        wall = "(baseline)" if r["exp_run_wall_s"] is None else f"{r['exp_run_wall_s']:.0f}"
        lines.append(f"| {r['row']} | {r['zero_shot']:.2f} | {r['source_teacher']:.2f} | {r['adapted']:.2f} | "
                     f"{r['train_s']:.1f} | {wall} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, required=True, help="a finished smoke project (left unchanged)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/method_table"),
                        help="writes OUT.md and OUT.json")
    parser.add_argument("--only", nargs="*", help="rows whose name contains one of these words")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="method-table-") as tmp:
        workdir = Path(tmp) / "project"
        shutil.copytree(args.project, workdir, symlinks=True)
        for name, stage, settings in ROWS:
            if args.only and not any(word in name for word in args.only):
                continue
            rows.append({"row": name, "settings": settings, **run_row(workdir, stage, settings)})
            print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``uda-distill``: helper commands around the DVC pipeline.

* ``uda-distill smoke [--workdir DIR]``: the whole pipeline offline in minutes (tiny stand-in VLMs) in a
  scratch copy; prints the results table.
* ``uda-distill fetch-weights [--params params.yaml]``: download the teacher and student weights named in
  the params into the open_clip cache, so later runs work offline (``HF_HUB_OFFLINE=1``).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def _smoke(args: argparse.Namespace) -> int:
    from pipeline.smoke import run_smoke

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="uda-distill-smoke-"))
    start = time.perf_counter()
    results = run_smoke(workdir, echo=True)
    print((results / "results.md").read_text())
    print(f"smoke pipeline finished in {time.perf_counter() - start:.0f} s; project copy: {workdir}")
    return 0


def _fetch_weights(args: argparse.Namespace) -> int:
    from pipeline.config import load_params
    from pipeline.models.factory import check_weights_available
    from pipeline.orchestration.stage import checked_model_spec

    params = load_params(args.params)
    for role in ("teacher", "student"):
        spec = checked_model_spec(params, role)  # downloads a tag into the cache when the network allows
        print(f"{spec.describe()}: {check_weights_available(spec) or 'random init (tests only)'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="uda-distill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    smoke = sub.add_parser("smoke", help="run the offline smoke pipeline (dvc repro) in a scratch copy")
    smoke.add_argument("--workdir", help="empty folder for the project copy (default: a new temp folder)")
    smoke.set_defaults(func=_smoke)
    fetch = sub.add_parser("fetch-weights", help="cache the weights named in params.yaml (needs internet)")
    fetch.add_argument("--params", default="params.yaml", type=Path)
    fetch.set_defaults(func=_fetch_weights)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

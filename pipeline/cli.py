"""``uda-distill``: helper commands around the DVC pipeline.

* ``uda-distill smoke [--workdir DIR]``: the README's first command (``dvc repro`` on the offline default
  params, tiny stand-in VLMs) in a scratch copy of the project, about 10 CPU minutes; prints the results table.
  Run again on the same folder, it re-runs ``dvc repro`` there.
* ``uda-distill fetch-weights [--params params.yaml]``: download the teacher and student weights named in
  the params into the open_clip cache, so later runs work offline (``HF_HUB_OFFLINE=1``).
* ``uda-distill info [--params params.yaml] [--method M] [--teacher NAME] [--student NAME] [--classes C]
  [-S key=value ...]``: trainable and stored parameter counts of a method's learnable parts, built from the
  architectures alone (no weights are downloaded or loaded).
* ``uda-distill predict BUNDLE INPUT... [--out preds.csv|.json] [--top-k K] [--batch-size B] [--device D]
  [--base SPEC] [--cache-dir DIR]``: run a task's bundle (``paths.bundles/<task>``) on image files, folders,
  list files or shard folders; one row per image with its top-k classes (unreadable images are listed, not fatal).
* ``uda-distill server [--port 4200]``: a Prefect server on 127.0.0.1 (telemetry off) until Ctrl-C; it prints
  the ``export PREFECT_API_URL=...`` that makes stage runs report to it, and its UI's address.
* ``uda-distill sweep -S 'distill.method=promptkd,ekda' -S 'seed=1,2,3' --pool NAME [--git-remote origin]
  [--dvc-remote NAME] [--no-wait] [--timeout S]``: one ``dvc exp run`` per combination, each a Prefect flow run
  on a process work pool (a worker per GPU, on any machine); the runs push their experiments to the git remote
  and their outputs to the DVC remote, so ``dvc exp pull`` + ``dvc exp show`` list them anywhere. Needs
  ``PREFECT_API_URL`` (``uda-distill server``).
* ``uda-distill export BUNDLE --format merged|pt2|onnx --out PATH [--images INPUT...]``: a standalone
  open_clip ``local-dir:`` student, a ``torch.export`` program or an ONNX graph, each checked against the
  eager student (max logit difference at most 1e-4).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from pipeline.command import entry


def _smoke(args: argparse.Namespace) -> int:
    from pipeline.smoke import prefect_target, run_smoke

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="uda-distill-smoke-"))
    print(f"smoke: dvc repro in {workdir}; Prefect runs go to {prefect_target()}", flush=True)
    start = time.perf_counter()
    results = run_smoke(workdir, echo=True)
    print((results / "results.md").read_text())
    print(f"smoke pipeline finished in {time.perf_counter() - start:.0f} s; project copy: {workdir} "
          f"(next: cd there and `dvc exp run -S distill.epochs=2`, `dvc exp show`)")
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


def _info(args: argparse.Namespace) -> int:
    import yaml

    from pipeline.config import load_params, validate_params
    from pipeline.methods.param_counts import method_parameter_counts

    params = load_params(args.params)
    overrides = list(args.set)
    for key, value in (("distill.method", args.method), ("model.teacher.name", args.teacher),
                       ("model.student.name", args.student)):
        if value:
            overrides.append(f"{key}={value}")
    for item in overrides:  # same spelling as `dvc exp run -S key=value`
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"-S {item!r}: expected key=value, e.g. distill.ekda.n_tokens=2")
        node, *path = key.split(".")
        parent = params
        for part in [node, *path][:-1]:
            if not isinstance(parent.get(part), dict):
                raise ValueError(f"-S {item!r}: {part!r} is not a section of {args.params}")
            parent = parent[part]
        parent[key.split(".")[-1]] = yaml.safe_load(value)
    validate_params(params, source=f"{args.params} with {overrides}")
    from pipeline.orchestration.stage import architecture_params

    params = architecture_params(params)  # the stand-ins' architectures, whether trained yet or not
    rows = method_parameter_counts(params, n_classes=args.classes)
    width = max(len(r["part"]) for r in rows)
    print(f"method {params['distill']['method']}, {args.classes} classes")
    print(f"{'part':<{width}}  {'model':<26} {'trainable':>12} {'stored':>12}")
    for r in rows:
        print(f"{r['part']:<{width}}  {r['model']:<26} {r['trainable']:>12,} {r['stored']:>12,}")
    print(f"{'total':<{width}}  {'':<26} {sum(r['trainable'] for r in rows):>12,} "
          f"{sum(r['stored'] for r in rows):>12,}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from pipeline.student.predict import predict, summary, write_rows

    rows = predict(args.bundle, args.inputs, top_k=args.top_k, batch_size=args.batch_size, device=args.device,
                   base=args.base, cache_dir=args.cache_dir, num_workers=args.num_workers)
    write_rows(rows, args.out, args.top_k)
    print(summary(rows, args.out), file=sys.stderr)
    return 0


def _export(args: argparse.Namespace) -> int:
    from pipeline.student.export import export_bundle

    report = export_bundle(args.bundle, format=args.format, out=args.out, base=args.base, cache_dir=args.cache_dir,
                           images=args.images)
    print(report.summary())
    return 0


def _server(args: argparse.Namespace) -> int:
    from pipeline.orchestration.local_server import serve

    return serve(args.port)


def _sweep(args: argparse.Namespace) -> int:
    from pipeline.orchestration.sweep import sweep

    return sweep(args.set, pool=args.pool, git_remote=args.git_remote, dvc_remote_name=args.dvc_remote,
                 wait=args.wait, timeout=args.timeout)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("uda-distill")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "(not installed)"


def _base_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", help="where the base model's weights are, when not where the bundle was trained: "
                        "local-dir:<folder>, a .pt/.safetensors file, or a pretrained tag")
    parser.add_argument("--cache-dir", help="open_clip / Hugging Face cache folder of the base weights (as model.cache_dir)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="uda-distill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        # the one-line summary is both the line in `uda-distill --help` and the description of `<name> --help`
        return sub.add_parser(name, help=summary, description=summary)

    smoke = command("smoke", "run the README's first command (dvc repro on the offline default params.yaml) in a "
                    "scratch copy of the project; Prefect runs go to $PREFECT_API_URL when set, else to a "
                    "temporary server per stage")
    smoke.add_argument("--workdir", help="folder for the project copy: new, empty, or an earlier smoke folder to "
                       "run again (default: a new temporary folder)")
    smoke.set_defaults(func=_smoke)
    fetch = command("fetch-weights", "cache the weights named in params.yaml (needs internet)")
    fetch.add_argument("--params", default="params.yaml", type=Path)
    fetch.set_defaults(func=_fetch_weights)
    info = command("info", "trainable/stored parameter counts of a method (no weights needed)")
    info.add_argument("--params", default="params.yaml", type=Path)
    info.add_argument("--method", help="override distill.method")
    info.add_argument("--teacher", help="override model.teacher.name (an open_clip architecture)")
    info.add_argument("--student", help="override model.student.name")
    info.add_argument("--classes", type=int, default=10, help="number of classes (matters for class-specific contexts)")
    info.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a params key, e.g. -S distill.ekda.n_tokens=2 (repeatable)")
    info.set_defaults(func=_info)
    pred = command("predict", "classify images with a task's bundle")
    pred.add_argument("bundle", help="a bundle folder (paths.bundles/<task>, or a merged export)")
    pred.add_argument("inputs", nargs="+", metavar="INPUT",
                      help="image files, folders, list files (.txt/.lst/.csv) or shard folders")
    pred.add_argument("--out", help="output .csv or .json (default: CSV on standard output)")
    pred.add_argument("--top-k", type=int, default=1, help="classes per image, best first (default 1)")
    pred.add_argument("--batch-size", type=int, default=64)
    pred.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda:<index>")
    pred.add_argument("--num-workers", type=int, default=0, help="image-reading processes (0: in this process)")
    _base_options(pred)
    pred.set_defaults(func=_predict)
    export = command("export", "export a bundle: merged (open_clip local-dir), pt2 (torch.export), onnx")
    export.add_argument("bundle", help="a bundle folder (paths.bundles/<task>)")
    export.add_argument("--format", required=True, choices=("merged", "pt2", "onnx"))
    export.add_argument("--out", required=True, help="output folder (merged) or file (pt2, onnx)")
    export.add_argument("--images", nargs="+", metavar="INPUT",
                        help="images for the parity check (default: 8 seeded synthetic images)")
    _base_options(export)
    export.set_defaults(func=_export)
    server = command("server", "run a Prefect server (UI and API) on 127.0.0.1 until Ctrl-C")
    server.add_argument("--port", type=int, default=4200, help="port on 127.0.0.1 (default 4200)")
    server.set_defaults(func=_server)
    sweep = command("sweep", "run one dvc experiment per combination of -S values, each a Prefect flow run on "
                    "a process work pool (a worker per GPU, on any machine); needs PREFECT_API_URL")
    sweep.add_argument("-S", "--set", action="append", default=[], metavar="KEY=V1,V2",
                       help="a params key and its values, as `dvc exp run -S` takes them (repeatable; the runs are "
                       "every combination), e.g. -S 'distill.method=promptkd,ekda' -S 'seed=1,2,3'")
    sweep.add_argument("--pool", required=True, help="the Prefect process work pool (created if missing)")
    sweep.add_argument("--git-remote", default="origin", help="git remote (name or URL) every machine reaches: "
                       "the runs check out this commit there and push their experiments to it (default: origin)")
    sweep.add_argument("--dvc-remote", help="DVC remote the runs pull outputs from and push theirs to "
                       "(default: the default DVC remote)")
    sweep.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True,
                       help="follow the runs until they end (default); --no-wait returns once they are submitted")
    sweep.add_argument("--timeout", type=float, help="seconds to follow the runs (default: until they end); "
                       "runs still going then go on")
    sweep.set_defaults(func=_sweep)
    parser.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    args = parser.parse_args(argv)
    return entry("uda-distill", lambda _argv: args.func(args), ["--debug"] if args.debug else [],
                 kept="nothing of this command's output is used until it completes")


if __name__ == "__main__":
    sys.exit(main())

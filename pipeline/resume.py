"""Resuming an interrupted training stage: the key of an item's run and its resume area.

A stage item (one task of ``prompts`` or ``distill``) keeps two things under
``paths.checkpoints/<stage>/<item>/`` (neither deleted nor tracked by DVC), both named by the first 12 hex
digits of its key:

* ``resume-<key12>.pt``: the training snapshot :func:`pipeline.methods.training.fit` writes after every
  epoch and continues from (also the last good checkpoint the collapse/divergence guards name);
* ``finished-<key12>/``: a finished item's outputs (``outputs/``) and its summary, copied back by a re-run
  of a stage that failed or was interrupted in another item, instead of training again.

The key is a sha256 over the stage, the item, the params the stage declares in ``dvc.yaml`` (with
``tasks`` narrowed to the item's own task, so adding a task restarts nothing), the content of the stage's
code deps, and the identities of the item's input files. A changed param, input or code gives a new key: the
old files of the item are removed, with a log line, and training starts from epoch 1. When the whole stage
completes, :func:`clear_stage` removes the areas of its items.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable


from pipeline.artifacts import SIDES, Artifacts
from pipeline.config import resolve_keys, stage_declaration
from pipeline.io import atomic_write_json, read_json
from pipeline.methods.training import resume_log as log

SMALL_FILE = 1 << 20  # files up to 1 MiB (manifests, keys, metadata, code) are hashed by content


def item_params(params: dict[str, Any], stage: str, task: str, dvc_yaml: str | os.PathLike = "dvc.yaml"
                ) -> dict[str, Any]:
    """The params the stage declares (all params without a ``dvc.yaml``), ``tasks`` narrowed to ``task``."""
    declared = [k for k in stage_declaration(stage, dvc_yaml).get("params", []) if isinstance(k, str)]
    resolved = resolve_keys(params, declared) if declared else dict(params)
    if "tasks" in resolved:
        resolved["tasks"] = {task: params["tasks"][task]}
    return resolved


def code_deps(stage: str, dvc_yaml: str | os.PathLike = "dvc.yaml") -> list[Path]:
    """The stage's deps in ``dvc.yaml`` that are code (not ``${paths...}`` data)."""
    return [Path(d) for d in stage_declaration(stage, dvc_yaml).get("deps", []) if "${" not in str(d)]


def file_identities(paths: Iterable[str | os.PathLike]) -> list[list[Any]]:
    """``[path, size, digest]`` of every file under ``paths`` (missing paths: ``[path, None, None]``).

    Cheap on purpose: a file up to :data:`SMALL_FILE` is hashed (manifests, key lists, metadata, code);
    a larger one (shards, feature arrays, weights) is identified by size and modification time, which a
    rewrite by an upstream stage or a ``dvc checkout`` changes. Only stats and a few small reads, whatever
    the dataset size.
    """
    out = []
    for root in paths:
        root = Path(root)
        files = sorted(p for p in root.rglob("*") if p.is_file() and not _ignored(p.relative_to(root))) \
            if root.is_dir() else [root]
        for f in files:
            if not f.is_file():
                out.append([str(f), None, None])
                continue
            st = f.stat()
            digest = (hashlib.sha256(f.read_bytes()).hexdigest() if st.st_size <= SMALL_FILE
                      else f"mtime_ns={st.st_mtime_ns}")
            out.append([str(f), st.st_size, digest])
    return out


def _ignored(relative: Path) -> bool:
    """Byte code and hidden files (temporaries of atomic writes): Python writes ``__pycache__`` on the first
    run, which must not change the key of the re-run."""
    return any(part == "__pycache__" or part.startswith(".") for part in relative.parts)


def resume_key(*, stage: str, item: str, params: dict[str, Any], inputs: Iterable[str | os.PathLike],
               dvc_yaml: str | os.PathLike = "dvc.yaml", task: str | None = None) -> str:
    """sha256 (hex) over the stage, the item, :func:`item_params` of the item's task (`task`, default the item
    itself), the code deps and the inputs' identities."""
    record = {"stage": stage, "item": item, "params": item_params(params, stage, task or item, dvc_yaml),
              "code": file_identities(code_deps(stage, dvc_yaml)), "inputs": file_identities(inputs)}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class ItemResume:
    """The resume area of one stage item: ``dir`` = ``paths.checkpoints/<stage>/<item>``, ``key`` its run's key."""

    dir: Path
    key: str
    label: str = "item"  # how log lines name the item, e.g. "task usps_to_mnist"

    @property
    def tag(self) -> str:
        return self.key[:12]

    @property
    def snapshot(self) -> Path:
        """The training snapshot (:func:`pipeline.methods.training.fit`'s ``checkpoint_path``)."""
        return self.dir / f"resume-{self.tag}.pt"

    @property
    def finished(self) -> Path:
        return self.dir / f"finished-{self.tag}"

    def run(self, out_dir: Path, work: Callable[[], Any]) -> Any:
        """``work()`` writes the item's outputs into ``out_dir`` and returns its summary; a finished earlier
        run with the same key is copied instead. After ``work`` the outputs are kept here until the stage
        completes (:func:`clear_stage`) and the snapshot is removed."""
        if (self.finished / "summary.json").is_file():
            log.info("%s: reusing finished outputs from %s", self.label, self.finished)
            shutil.copytree(self.finished / "outputs", out_dir, dirs_exist_ok=True, copy_function=_link_or_copy)
            return read_json(self.finished / "summary.json")["summary"]
        self.drop_others()
        summary = work()
        self._keep(out_dir, summary)
        self.snapshot.unlink(missing_ok=True)
        return summary

    def drop_others(self) -> None:
        """Remove what other keys left here (runs with other params, inputs or code) and half-written copies."""
        if not self.dir.is_dir():
            return
        for path in sorted(self.dir.iterdir()):
            if path in (self.snapshot, self.finished):
                continue
            if path.name.startswith("resume-"):
                log.info("%s: resume state at %s was made with other params/inputs; starting from epoch 1",
                         self.label, path)
            _remove(path)

    def _keep(self, out_dir: Path, summary: Any) -> None:
        """Copy the outputs and the summary into ``finished`` (a complete folder or none: renamed into place)."""
        tmp = self.dir / f".{self.finished.name}.tmp-{os.getpid()}"
        _remove(tmp)
        shutil.copytree(out_dir, tmp / "outputs", copy_function=_link_or_copy)
        atomic_write_json(tmp / "summary.json", {"summary": summary})  # written last: marks a complete copy
        _remove(self.finished)
        os.replace(tmp, self.finished)


def task_inputs(params: dict[str, Any], task: str, *, features: bool) -> list[Path]:
    """What training a task reads: its source and target shards, the model stand-ins and, with ``features``
    (the distill stage), the features stage's caches of its domains and of the task."""
    artifacts, spec = Artifacts(params["paths"]), params["tasks"][task]
    paths = [artifacts.shards(spec["dataset"], spec[side]) for side in SIDES] + [Path(params["paths"]["standins"])]
    if features:
        paths += [artifacts.features.domain(spec["dataset"], spec[side]).dir for side in SIDES]
        paths.append(artifacts.features.task(task).dir)
    return paths


def item_resume(params: dict[str, Any], stage: str, item: str, *, inputs: Iterable[str | os.PathLike],
                label: str | None = None, dvc_yaml: str | os.PathLike = "dvc.yaml", task: str | None = None
                ) -> ItemResume:
    """The resume area of ``item`` of ``stage`` (an item of task `task`, default the item itself: a distill
    run of a later seed is ``<task>.seed<s>``), keyed by :func:`resume_key`."""
    key = resume_key(stage=stage, item=item, params=params, inputs=inputs, dvc_yaml=dvc_yaml, task=task)
    return ItemResume(Artifacts(params["paths"]).checkpoints(stage, item), key, label or f"{stage} item {item}")


def clear_stage(params: dict[str, Any], stage: str, items: Iterable[str]) -> None:
    """After the whole stage completed: remove its items' resume areas (and the stage folder if then empty)."""
    artifacts = Artifacts(params["paths"])
    for item in items:
        _remove(artifacts.checkpoints(stage, item))
    root = artifacts.checkpoints(stage, "")
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link (no time or space for large checkpoints; every writer here replaces files, never edits
    them in place), or a copy across file systems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)

"""The stage-to-stage contract: where every stage output lives, its file names and what each file holds.

Stages write through these classes and read what earlier stages wrote through them, so a file name is
spelled once. Each class wraps one output folder; build it on the final path (readers) or on the stage's
temporary folder (writers, see :func:`pipeline.io.atomic_dir`)::

    paths.shards/<dataset>/<domain>/            shards, manifest.json, sizes.json (pipeline.data.sharding)
    paths.prompts/<task>/                       PromptOutput: prompt.pt, train_log.json
    paths.features/domains/<dataset>/<domain>/  DomainFeatures: features.npy, keys.json, index.faiss, index.json
    paths.features/tasks/<task>/                TaskFeatures: class vectors, target logits, teacher predictions
    paths.distill/<run>/                        StudentOutput: student.pt, predictions.npy, keys.json, ...
    paths.curves/<run>/plots/metrics/           the distill stage's training curves, one TSV per value
                                                (pipeline.methods.curves; DVCLive's layout)
    paths.evaluate/<task>/metrics.json          EvaluateOutput
    paths.bundles/<task>/                       the shipped student (pipeline.student.bundle)
    paths.checkpoints/<stage>/<task>/           resume area: snapshot, finished outputs (pipeline.resume;
                                                not a DVC output)

A distill *run* is a task trained with one of the seeds (:func:`distill_seeds`): ``<run>`` is the task's name
for the first seed (the shipped student) and ``<task>.seed<s>`` for the others (:func:`run_name`).

Cached rows (features, logits, predictions) are only meaningful in the key order they were computed in,
so the features stage records those keys (``keys.json`` per domain, a digest per side in the task's
``meta.json``) and readers compare them with the keys the shards hold now: a re-sharded domain under an
old cache stops with :class:`StaleCacheError` instead of pairing images with another image's features.
"""
from __future__ import annotations

import dataclasses
import hashlib
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.io import DamagedFileError, atomic_save_npy, atomic_savez, atomic_write_json, load_array, read_json

SIDES = ("source", "target")
REBUILD = "re-run the features stage: `dvc repro -f -s features`"
REDISTILL = "restore it with `dvc checkout` or re-run the distill stage: `dvc repro -f -s distill`"


def distill_seeds(params: dict[str, Any]) -> list[int]:
    """The distill stage's seeds: ``seeds`` when set, else ``[seed]``. Every task trains once per seed; the
    first seed's run is the task's student (the one the bundle stage ships), the others measure the spread."""
    return list(params.get("seeds") or [params["seed"]])


def run_name(task: str, seed: int, seeds: list[int]) -> str:
    """The folder and work-item name of a task's run with ``seed``: the task's own name for the first seed,
    ``<task>.seed<s>`` for the others ('.' is not allowed in task names, so no run takes another task's name)."""
    return task if seed == seeds[0] else f"{task}.seed{seed}"


class StaleCacheError(ValueError):
    """A cached file was computed for other samples (keys) than the shards now hold."""


def keys_digest(keys: list[str]) -> dict[str, Any]:
    """The count and sha256 of a key list in order: what the task meta records per side."""
    return {"n": len(keys), "sha256": hashlib.sha256("\n".join(keys).encode("utf-8")).hexdigest()}


def _first_difference(found: list[str], expected: list[str]) -> str:
    i = next((i for i, (a, b) in enumerate(zip(found, expected)) if a != b), min(len(found), len(expected)))
    if i < min(len(found), len(expected)):
        return f"; row {i} is {found[i]!r}, the shards have {expected[i]!r} there"
    return ""


def check_keys(path: Path, found: list[str], expected: list[str]) -> None:
    """Raise :class:`StaleCacheError` naming ``path`` unless ``found`` is ``expected`` (same keys, same order)."""
    if found != expected:
        raise StaleCacheError(f"{path} was computed for {len(found)} samples, the shards hold {len(expected)}"
                              f"{_first_difference(found, expected)}; {REBUILD}")


@dataclasses.dataclass(frozen=True)
class PromptOutput:
    """The prompts stage's output for one task.

    ``prompt.pt`` (torch, weights only): ``states`` (trainable state per epoch), ``reported`` (the state the
    teacher uses: GPA aggregate or last epoch), ``gpa``, ``kind`` (``prompts.kind``), ``config`` (the
    teacher's :class:`pipeline.models.teacher_prompts.PromptedTeacher` keywords), ``classes``, ``identity`` (teacher model identity), ``logit_scale``, ``task``.
    """

    dir: Path

    @property
    def prompt(self) -> Path:
        return self.dir / "prompt.pt"

    @property
    def train_log(self) -> Path:
        return self.dir / "train_log.json"


@dataclasses.dataclass(frozen=True)
class DomainFeatures:
    """The zero-shot teacher's L2-normalised image features of one domain, in shard order, and a faiss index."""

    dir: Path

    @property
    def features_path(self) -> Path:
        return self.dir / "features.npy"

    @property
    def keys_path(self) -> Path:
        return self.dir / "keys.json"

    @property
    def index_path(self) -> Path:
        return self.dir / "index.faiss"

    @property
    def index_meta_path(self) -> Path:
        return self.dir / "index.json"

    def keys(self, expected: list[str]) -> list[str]:
        """``keys.json``, checked to be ``expected`` (the domain's shard keys, in manifest order)."""
        keys = read_json(self.keys_path)
        check_keys(self.keys_path, keys, expected)
        return keys

    def features(self, expected: list[str]) -> np.ndarray:
        """The features [N, D], rows in ``expected`` order (checked against ``keys.json`` and N)."""
        self.keys(expected)
        feats = load_array(self.features_path, fix=REBUILD)
        if len(feats) != len(expected):
            raise StaleCacheError(f"{self.features_path} has {len(feats)} rows, {self.keys_path} lists "
                                  f"{len(expected)} keys; {REBUILD}")
        return feats


@dataclasses.dataclass(frozen=True)
class TaskFeatures:
    """What the features stage caches per task.

    ``class_vectors.npy`` [C, D]: the source-prompted teacher's class vectors (shared with the student; a
    CoCoOp teacher's are conditioned on the mean target image feature);
    ``zeroshot_vectors.npy`` [C, D]: the template-ensemble zero-shot vectors; ``target_logits.npy`` [N, C]:
    the teacher's target logits (target domain key order); ``target_features.npy``: the target features
    re-encoded with the teacher's visual prompts (only when it has them); ``zeroshot_preds_<side>.npy`` [N]
    and ``teacher_preds_<side>.npy`` [E, N]: predictions the evaluate stage scores; ``meta.json``: task,
    classes, logit_scale, templates, model identity, prompt kind, prompt epochs, gpa, teacher_rows,
    visual_prompts, and
    ``keys`` ({side: :func:`keys_digest`}: the row order of every per-image file above).
    """

    dir: Path

    def load(self, path: Path) -> np.ndarray:
        """One of the arrays above; a missing or damaged file stops with its name and the fix."""
        return load_array(path, fix=REBUILD)

    @property
    def class_vectors(self) -> Path:
        return self.dir / "class_vectors.npy"

    @property
    def zeroshot_vectors(self) -> Path:
        return self.dir / "zeroshot_vectors.npy"

    @property
    def target_logits(self) -> Path:
        return self.dir / "target_logits.npy"

    @property
    def target_features(self) -> Path:
        return self.dir / "target_features.npy"

    @property
    def meta_path(self) -> Path:
        return self.dir / "meta.json"

    def zeroshot_preds(self, side: str) -> Path:
        return self.dir / f"zeroshot_preds_{_side(side)}.npy"

    def teacher_preds(self, side: str) -> Path:
        return self.dir / f"teacher_preds_{_side(side)}.npy"

    def meta(self, expected: dict[str, list[str]]) -> dict[str, Any]:
        """``meta.json``, after checking that the rows of every per-image file were computed for the
        ``expected`` keys of each side (``{side: shard keys}``)."""
        meta = read_json(self.meta_path)
        for side, keys in expected.items():
            recorded = meta.get("keys", {}).get(_side(side))
            if recorded != keys_digest(keys):
                found = f"{recorded['n']} samples" if recorded else "no keys recorded: an older cache"
                raise StaleCacheError(f"{self.meta_path}: the {side} rows were computed for other samples than "
                                      f"the {len(keys)} the shards hold now ({found}); {REBUILD}")
        return meta


@dataclasses.dataclass(frozen=True)
class FeatureCache:
    """The features stage's output folder."""

    root: Path

    def domain(self, dataset: str, domain: str) -> DomainFeatures:
        return DomainFeatures(Path(self.root) / "domains" / dataset / domain)

    def task(self, name: str) -> TaskFeatures:
        return TaskFeatures(Path(self.root) / "tasks" / name)


@dataclasses.dataclass(frozen=True)
class StudentOutput:
    """The distill stage's output for one task.

    ``student.pt`` (torch, weights only): ``method``, ``state`` (only what training changed), ``classes``,
    ``logit_scale``, ``class_vectors`` (or None), ``models`` (identity per role), ``cached_teacher``,
    ``distill`` (the params block), ``task``, plus the method's own entries; ``predictions.npy`` [E, N]:
    target predictions per epoch in ``keys.json`` order; ``extra_predictions.npz``: per-epoch predictions of
    other inference rules a method reports beside its own (labelled by the evaluate stage);
    ``train_log.json``: method, loss, refine_knn, trainable_params, per-epoch log and the method's extras.
    """

    dir: Path

    @property
    def checkpoint(self) -> Path:
        return self.dir / "student.pt"

    @property
    def predictions(self) -> Path:
        return self.dir / "predictions.npy"

    @property
    def extra_predictions(self) -> Path:
        return self.dir / "extra_predictions.npz"

    @property
    def keys(self) -> Path:
        return self.dir / "keys.json"

    @property
    def train_log(self) -> Path:
        return self.dir / "train_log.json"

    def write_predictions(self, keys: list[str], predictions: np.ndarray,
                          extra: dict[str, np.ndarray] | None = None) -> None:
        atomic_save_npy(self.predictions, predictions)
        atomic_write_json(self.keys, keys)
        if extra:
            atomic_savez(self.extra_predictions, extra)

    def read_predictions(self) -> np.ndarray:
        return load_array(self.predictions, fix=REDISTILL)

    def read_extra_predictions(self) -> dict[str, np.ndarray]:
        if not self.extra_predictions.is_file():
            return {}
        try:
            with np.load(self.extra_predictions, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise DamagedFileError(f"{self.extra_predictions}: damaged or incomplete ({exc}); {REDISTILL}") from None


@dataclasses.dataclass(frozen=True)
class EvaluateOutput:
    """The evaluate stage's ``metrics.json`` for one task (read by the report stage)."""

    dir: Path

    @property
    def metrics(self) -> Path:
        return self.dir / "metrics.json"


@dataclasses.dataclass(frozen=True)
class Artifacts:
    """Every stage output of a project, from ``params["paths"]``."""

    paths: dict[str, str]

    def writing(self, key: str, folder: Path) -> "Artifacts":
        """The same project with output ``key`` (e.g. ``distill``) in ``folder``: a stage's temporary folder."""
        return Artifacts({**self.paths, key: str(folder)})

    def shards(self, dataset: str, domain: str) -> Path:
        return Path(self.paths["shards"]) / dataset / domain

    @property
    def features(self) -> FeatureCache:
        return FeatureCache(Path(self.paths["features"]))

    def prompts(self, task: str) -> PromptOutput:
        return PromptOutput(Path(self.paths["prompts"]) / task)

    def student(self, run: str) -> StudentOutput:
        """A distill run's output: ``run`` is the task's name for its (first-seed) student, see :func:`run_name`."""
        return StudentOutput(Path(self.paths["distill"]) / run)

    def student_runs(self, task: str, seeds: list[int]) -> dict[int, StudentOutput]:
        """{seed: output} of every run of a task, the first seed's (the task's student) first."""
        return {seed: self.student(run_name(task, seed, seeds)) for seed in seeds}

    def curves(self, run: str) -> Path:
        """The DVCLive folder of a distill run's training curves (:mod:`pipeline.methods.curves`)."""
        return Path(self.paths["curves"]) / run

    def evaluation(self, task: str) -> EvaluateOutput:
        return EvaluateOutput(Path(self.paths["evaluate"]) / task)

    def bundle(self, task: str) -> Path:
        return Path(self.paths["bundles"]) / task

    def checkpoints(self, stage: str, item: str) -> Path:
        """The resume area of a stage item (:mod:`pipeline.resume`)."""
        return Path(self.paths["checkpoints"]) / stage / item

    def run_info(self, stage: str) -> Path:
        return Path(self.paths["run_info"]) / f"{stage}.json"


def _side(side: str) -> str:
    if side not in SIDES:
        raise ValueError(f"side {side!r} is not one of {SIDES}")
    return side

"""What a method is to the pipeline: a :class:`Method` record, the :class:`TaskJob` it runs, the result it returns.

A method is one module in ``pipeline/methods/`` ending in ``METHOD = Method(...)`` plus one line in the
registry (:data:`pipeline.methods.METHODS`). It owns its params block ``distill.<name>`` (a
:class:`pipeline.schema.Block` with the spec's defaults), the roles (teacher/student models from
``params.model``) the distill stage loads for it, its training (``run``: gather inputs from the cached
artefacts through the :class:`TaskJob`, train with :func:`pipeline.methods.training.fit`, return a
:class:`MethodResult`) and its parameter counts (built with the same construction code on the meta device).
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Callable

import numpy as np
from torch import nn

from pipeline.artifacts import REBUILD, SIDES, Artifacts, StaleCacheError, StudentOutput, TaskFeatures
from pipeline.data.classlists import prompt_name
from pipeline.data.shards import read_labels, resolve_num_workers, shard_keys
from pipeline.models.factory import LoadedModel
from pipeline.schema import Block


@dataclasses.dataclass(frozen=True)
class Method:
    """One adaptation method.

    ``run(job)`` trains one task; ``parameter_counts(params, n_classes)`` returns rows
    ``{part, model, trainable, stored}`` for ``uda-distill info``; ``check(params, errors)`` adds
    cross-key problems of its block to ``errors`` (the schema checks each key alone).
    ``classifier(state, config, base)`` rebuilds the trained model for inference from a student bundle
    (:mod:`pipeline.student.bundle`): ``state`` is what training changed (the result's ``state`` plus
    ``class_vectors``), ``config`` the bundle's config.json, ``base`` the frozen model of role ``base_role``
    it runs on; it returns an ``nn.Module`` in eval mode mapping preprocessed images [B, 3, H, W] to class
    logits [B, C] (softmax gives the method's probabilities, argmax its predictions).
    """

    name: str
    summary: str
    params: Block
    roles: tuple[str, ...]
    run: Callable[["TaskJob"], "MethodResult"]
    parameter_counts: Callable[[dict[str, Any], int], list[dict[str, Any]]]
    classifier: Callable[[dict[str, Any], dict[str, Any], LoadedModel], nn.Module]
    check: Callable[[dict[str, Any], list[str]], None] | None = None
    base_role: str = "student"


@dataclasses.dataclass
class MethodResult:
    """What a method hands back for one task.

    ``predictions`` [E, N]: target predictions per epoch in ``keys`` order; ``state``: only what training
    changed (saved in the student checkpoint); ``class_vectors``: the text class vectors inference uses
    (None when it uses none); ``checkpoint``: further entries of the student checkpoint;
    ``extra_predictions``: per-epoch predictions of other inference rules, ``extra_notes`` what each is (both
    scored and shown by the evaluate stage); ``log_extra``: further entries of train_log.json.
    """

    keys: list[str]
    predictions: np.ndarray
    log: list[dict[str, Any]]
    state: dict[str, Any]
    trainable_params: int
    class_vectors: np.ndarray | None = None
    checkpoint: dict[str, Any] = dataclasses.field(default_factory=dict)
    extra_predictions: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    extra_notes: dict[str, str] = dataclasses.field(default_factory=dict)  # what each extra rule is (evaluate shows it)
    log_extra: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class TaskJob:
    """One task of the distill stage, as a method sees it: params, models, device and the cached inputs."""

    name: str
    task: dict[str, str]
    params: dict[str, Any]
    models: dict[str, LoadedModel]
    device: str
    artifacts: Artifacts
    checkpoint_path: Path | None = None  # the task's resume snapshot (pipeline.resume; fit resumes from it)
    output: StudentOutput | None = None  # the task's output folder (being written), for method-specific files

    # -- settings ----------------------------------------------------------------------------------------
    @property
    def distill(self) -> dict[str, Any]:
        return self.params["distill"]

    @property
    def block(self) -> dict[str, Any]:
        """The method's own params block ``distill.<method>``."""
        return self.distill[self.distill["method"]]

    @property
    def seed(self) -> int:
        return self.params["seed"]

    @property
    def deterministic(self) -> bool:
        return self.params["runtime"]["deterministic"]

    @property
    def num_workers(self) -> int:
        """``runtime.num_workers`` as a count (``auto`` resolved for this machine)."""
        return resolve_num_workers(self.params["runtime"]["num_workers"])

    @property
    def eval_batch_size(self) -> int:
        return self.params["evaluate"]["batch_size"]

    # -- data --------------------------------------------------------------------------------------------
    def shard_dir(self, side: str) -> Path:
        return self.artifacts.shards(self.task["dataset"], self.task[side])

    def domain_keys(self, side: str) -> list[str]:
        """The sample keys of a side in shard order: the row order of every cached file."""
        return self._shard_keys[side]

    @functools.cached_property
    def _shard_keys(self) -> dict[str, list[str]]:
        return {side: shard_keys(self.shard_dir(side)) for side in SIDES}

    def domain_features(self, side: str) -> np.ndarray:
        """The plain (zero-shot) teacher image features of a side, rows in :meth:`domain_keys` order (checked)."""
        return self.artifacts.features.domain(self.task["dataset"], self.task[side]).features(self.domain_keys(side))

    def source_labels(self, keys: list[str]) -> np.ndarray:
        """Labels of the labelled source images ``keys`` (never called for the target)."""
        shard_keys, labels = read_labels(self.shard_dir("source"))
        by_key = dict(zip(shard_keys, labels.tolist()))
        return np.array([by_key[k] for k in keys])

    @functools.cached_property
    def cached(self) -> TaskFeatures:
        return self.artifacts.features.task(self.name)

    @functools.cached_property
    def meta(self) -> dict[str, Any]:
        """The task cache's meta.json; reading it checks that every cached per-image file (target logits,
        prompted target features) has rows in :meth:`domain_keys` order."""
        return self.cached.meta(self._shard_keys)

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    @property
    def classnames(self) -> list[str]:
        """Class names as prompts spell them."""
        return [prompt_name(c) for c in self.classes]

    @property
    def logit_scale(self) -> float:
        return self.meta["logit_scale"]

    def teacher_target_features(self) -> np.ndarray:
        """The teacher's target image features: re-encoded with its visual prompts when it has them."""
        prompted = self.cached.target_features
        return self.cached_rows(prompted, "target") if prompted.exists() else self.domain_features("target")

    def cached_rows(self, path: Path, side: str) -> np.ndarray:
        """A per-image file of the task cache (e.g. target logits), rows in :meth:`domain_keys` order: the
        keys meta.json records and the row count are checked first."""
        keys = self.domain_keys(side)
        self.cached.meta({side: keys})
        rows = self.cached.load(path)
        if len(rows) != len(keys):
            raise StaleCacheError(f"{path} has {len(rows)} rows for the {len(keys)} {side} samples; {REBUILD}")
        return rows

    def knn_refiner(self, probs: np.ndarray):
        """A kNN refiner over the teacher's target features seeded with ``probs`` (None when refine_knn is 0)."""
        from pipeline.methods.refine import KnnRefiner

        k = self.distill["refine_knn"]
        if not k:
            return None
        return KnnRefiner(self.domain_keys("target"), self.teacher_target_features(), probs, k=k,
                          device=self.device)

    def fit_settings(self, where: str) -> dict[str, Any]:
        """The :func:`pipeline.methods.training.fit` keywords every method passes the same way."""
        return {"where": where, "n_classes": len(self.classes), "checkpoint_path": self.checkpoint_path,
                "collapse_fraction": self.distill["collapse_fraction"]}

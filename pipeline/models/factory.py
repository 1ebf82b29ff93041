"""Load open_clip models from a spec in params.yaml, with the identity that travels with every output.

A spec names the architecture and where its weights come from, in one of three ways:

* ``{name: ViT-B-16-quickgelu, pretrained: openai}``: an open_clip pretrained tag (downloaded once into
  ``cache_dir``; offline it must already be cached);
* ``{name: ViT-B-32, pretrained: path/to/weights.pt}`` (or ``.safetensors``): a local checkpoint file;
* ``{name: "local-dir:path/to/dir"}``: a folder with ``open_clip_config.json`` and the weights, as written by
  :func:`save_local_dir` (the digits stand-ins use this).

``pretrained: random`` builds a randomly initialised model and is meant for tests only. Nothing ever falls
back silently to random weights: a missing tag, file or folder stops the stage before any work.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
from pathlib import Path
from typing import Any

import pipeline  # noqa: F401  (torchvision guard before open_clip)
import open_clip
import torch
from open_clip.pretrained import download_pretrained, get_pretrained_cfg

from pipeline.data.transforms import eval_transform
from pipeline.io import atomic_dir, follow_umask

CONFIG_DIR = Path(__file__).with_name("model_configs")
open_clip.add_model_config(CONFIG_DIR)  # architectures as data: the repo's JSON configs become model names

LOCAL_DIR = "local-dir:"
PRECISIONS = ("fp32", "bf16", "fp16")


class ModelWeightsError(RuntimeError):
    """The weights a spec names cannot be found (missing file, or a tag not cached while offline)."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from. ``role`` (teacher/student) only makes error messages precise."""

    name: str
    pretrained: str | None = None
    precision: str = "fp32"
    cache_dir: str | None = None
    role: str = "model"

    @classmethod
    def from_params(cls, entry: dict[str, Any], *, role: str, cache_dir: str | None = None) -> "ModelSpec":
        return cls(name=entry["name"], pretrained=entry.get("pretrained"),
                   precision=entry.get("precision", "fp32"), cache_dir=cache_dir, role=role)

    @property
    def is_local_dir(self) -> bool:
        return self.name.startswith(LOCAL_DIR)

    @property
    def local_dir(self) -> Path:
        return Path(self.name[len(LOCAL_DIR):])

    def describe(self) -> str:
        where = "" if self.is_local_dir else f" (pretrained={self.pretrained!r})"
        return f"{self.role} model {self.name!r}{where}"


def check_weights_available(spec: ModelSpec) -> str | None:
    """Fail fast, before any work, when the weights of ``spec`` cannot be had.

    Returns the resolved checkpoint path (``None`` for ``random``). For a pretrained tag this looks in the
    cache (and downloads when the network is allowed); with ``HF_HUB_OFFLINE=1`` a missing tag fails at once.
    """
    hint = (f"point model.{spec.role}.pretrained to a local .pt/.safetensors file, or set model.{spec.role}.name "
            f"to 'local-dir:<folder with open_clip_config.json>'; to cache a tag, run "
            f"`uda-distill fetch-weights` once on a machine with internet")
    if spec.is_local_dir:
        folder = spec.local_dir
        weights = [p for p in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
                   if (folder / p).is_file()]
        missing = ([] if (folder / "open_clip_config.json").is_file() else ["open_clip_config.json"]) + \
            ([] if weights else ["open_clip_model.safetensors (or open_clip_pytorch_model.bin)"])
        if missing:
            raise ModelWeightsError(f"{spec.describe()}: folder {folder} lacks {' and '.join(missing)} "
                                    f"(was the stage that writes it run?); {hint}")
        return str(folder / weights[0])
    if spec.name not in open_clip.list_models():
        raise ModelWeightsError(f"{spec.describe()}: unknown architecture; known names include "
                                f"{', '.join(sorted(open_clip.list_models())[:8])}, ... (open_clip.list_models())")
    if spec.pretrained == "random":
        return None
    if not spec.pretrained:
        raise ModelWeightsError(f"{spec.describe()}: model.{spec.role}.pretrained is empty; refusing to use random "
                                f"weights silently ({hint}, or 'random' for tests)")
    tag_cfg = get_pretrained_cfg(spec.name, spec.pretrained)
    if not tag_cfg:
        if os.path.isfile(spec.pretrained):
            return spec.pretrained
        raise ModelWeightsError(f"{spec.describe()}: {spec.pretrained!r} is neither a pretrained tag of this "
                                f"architecture ({open_clip.list_pretrained_tags_by_model(spec.name)}) nor an "
                                f"existing file; {hint}")
    reachable = _hub_reachable()
    try:
        with _hub_offline(not reachable):
            return download_pretrained(tag_cfg, cache_dir=spec.cache_dir)
    except Exception as exc:  # offline, no cache, network failure: all mean "not available here"
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        why = " and HF_HUB_OFFLINE is set" if offline else ("" if reachable else " and the Hub cannot be reached")
        raise ModelWeightsError(f"{spec.describe()}: weights are not cached in "
                                f"{spec.cache_dir or 'the Hugging Face cache'}{why} ({type(exc).__name__}); "
                                f"{hint}; or run offline with the stand-in models of the repository's own "
                                f"params.yaml (`git checkout params.yaml`)") from exc


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face Hub's host answers at all (False at once under HF_HUB_OFFLINE)."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline(offline: bool):
    """Look in the cache only while ``offline``: without a route to the Hub, huggingface_hub retries every file
    five times with back-off (about 50 s of warnings) before giving up. Its download functions read this
    module constant at call time."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = saved or offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


@dataclasses.dataclass
class LoadedModel:
    model: torch.nn.Module
    preprocess: Any          # eval transform (PIL -> tensor), from the model's own preprocess config
    tokenizer: Any
    identity: dict[str, Any]
    spec: ModelSpec

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp().item())


def load_model(spec: ModelSpec, *, device: str | torch.device = "cpu") -> LoadedModel:
    """Build the model in eval mode with frozen weights, plus its eval transform, tokenizer and identity."""
    if spec.precision not in PRECISIONS:
        raise ValueError(f"model.{spec.role}.precision: {spec.precision!r} is not one of {PRECISIONS}")
    weights = check_weights_available(spec)
    try:
        if spec.is_local_dir:
            model = open_clip.create_model(spec.name, device=device)
        else:
            pretrained = None if spec.pretrained == "random" else spec.pretrained
            model = open_clip.create_model(spec.name, pretrained=pretrained, device=device,
                                           cache_dir=spec.cache_dir)
    except Exception as exc:
        # A damaged or mismatched weights file: torch raises RuntimeError/EOFError, safetensors its own
        # SafetensorError (a plain Exception, matched by name so safetensors need not be imported here).
        damaged = isinstance(exc, (RuntimeError, OSError, ValueError, EOFError)) or \
            type(exc).__name__ == "SafetensorError"
        if not damaged:
            raise
        raise ModelWeightsError(f"{spec.describe()}: the weights in {weights} cannot be loaded "
                                f"({type(exc).__name__}: {str(exc)[:200]}); the file is damaged or belongs to "
                                "another architecture: restore it (`dvc checkout`, or fetch the weights again)"
                                ) from None
    model.eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(spec.name)
    # open_clip's eval transform from the model's own preprocess config, run by the pipeline's faster equivalent
    return LoadedModel(model=model, preprocess=eval_transform(preprocess_config(model)), tokenizer=tokenizer,
                       identity=model_identity(spec, model), spec=spec)


def model_identity(spec: ModelSpec, model: torch.nn.Module) -> dict[str, Any]:
    """What must match for a cached output to be reused (open_clip#771: QuickGELU mismatches are silent)."""
    visual = model.visual
    act = visual.transformer.resblocks[0].mlp.gelu if hasattr(visual, "transformer") else None
    return {
        "name": spec.name,
        "pretrained": None if spec.is_local_dir else spec.pretrained,
        "quick_gelu": type(act).__name__ == "QuickGELU",
        "precision": spec.precision,
        "embed_dim": int(model.text_projection.shape[-1]) if hasattr(model, "text_projection") else None,
        "preprocess": preprocess_config(model),
    }


def preprocess_config(model: torch.nn.Module) -> dict[str, Any]:
    """The model's preprocess config (size, mean, std, interpolation, ...) as JSON-friendly values."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in open_clip.get_model_preprocess_cfg(model).items()}


def assert_same_identity(expected: dict[str, Any], found: dict[str, Any], *, what: str) -> None:
    """Refuse to combine outputs made with different models (architecture, weights, QuickGELU, preprocess)."""
    keys = ("name", "pretrained", "quick_gelu", "preprocess")
    diff = {k: (expected.get(k), found.get(k)) for k in keys if expected.get(k) != found.get(k)}
    if diff:
        raise ValueError(f"{what} was made with a different model: " +
                         ", ".join(f"{k}: expected {a!r}, found {b!r}" for k, (a, b) in diff.items()))


def autocast(precision: str, device: str | torch.device):
    """Autocast context for the requested precision; fp32 runs without autocast."""
    device_type = torch.device(device).type
    if precision == "fp32":
        return torch.autocast(device_type=device_type, enabled=False)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device_type, dtype=dtype)


def model_config(spec: ModelSpec) -> dict[str, Any]:
    """The open_clip architecture config (``model_cfg``) of ``spec``: from its folder or open_clip's registry."""
    if spec.is_local_dir:
        return json.loads((spec.local_dir / "open_clip_config.json").read_text())["model_cfg"]
    return open_clip.get_model_config(spec.name)


def save_local_dir(model: torch.nn.Module, model_cfg: dict[str, Any], out_dir: str | os.PathLike) -> Path:
    """Save ``model`` as an ordinary open_clip ``local-dir:`` checkpoint (config + safetensors), atomically."""
    from safetensors.torch import save_file

    with atomic_dir(out_dir) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "open_clip_model.safetensors"))
        follow_umask(tmp / "open_clip_model.safetensors")
        config = {"model_cfg": model_cfg,
                  "preprocess_cfg": preprocess_config(model)}
        (tmp / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return Path(out_dir)

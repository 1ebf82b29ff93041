"""The bundle's model card: README.md in the Hugging Face convention, written with ``huggingface_hub``.

YAML metadata (license, library_name, tags, base_model, datasets, ``model-index`` results) through
``ModelCardData``/``EvalResult``, then the prose a user needs before trusting the model: what it is for
(this target domain), how it was trained and scored (transductive UDA; the best epoch is an oracle) and
its limits. Rendered offline; nothing is uploaded.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from huggingface_hub import EvalResult, ModelCard, ModelCardData

PAPERS = {
    "promptkd": "PromptKD (Li et al., CVPR 2024; zhengli97/PromptKD)",
    "ekda": "EKDA (end-to-end teacher-student alternating distillation; 1d1x1w/EKDA)",
    "dapl": "DAPL (Ge et al., TNNLS 2023; LeapLabTHU/DAPrompt)",
    "cmkd": "CMKD (TCSVT 2024; Wenlve-Zhou/VLP-UDA)",
}


def model_card(config: dict[str, Any]) -> str:
    """README.md text for a bundle whose config.json is ``config`` (see :func:`pipeline.student.bundle.bundle_config`)."""
    task, base, metrics, method = config["task"], config["base"], config["metrics"], config["method"]
    name = f"uda-distill-{method}-{task['dataset']}-{task['source']}-to-{task['target']}"
    dataset = f"{task['dataset']} ({task['target']})"
    results = [EvalResult(task_type="image-classification", dataset_type=task["dataset"], dataset_name=dataset,
                          dataset_split=f"{task['target']} (unlabelled during training)", metric_type=key,
                          metric_name=label, metric_value=round(float(metrics[which][key]), 2))
               for which, key, label in (("last", "acc", "accuracy (last epoch, reported)"),
                                         ("last", "mean_class_acc", "mean class accuracy (last epoch)"),
                                         ("best_oracle", "acc", "accuracy (best epoch, oracle)"))]
    data = ModelCardData(license="mit", library_name="open_clip", model_name=name, base_model=base.get("hf_hub"),
                         datasets=[task["dataset"]], pipeline_tag="image-classification", eval_results=results,
                         tags=["uda-distill", "unsupervised-domain-adaptation", "knowledge-distillation", method,
                               "clip"])
    rst = config.get("method_config", {}).get("rst", {}).get("enabled")
    body = f"""
# {name}

A {len(config['classes'])}-class image classifier for the **{task['target']}** domain of `{task['dataset']}`,
adapted without target labels from labelled **{task['source']}** images by {PAPERS.get(method, method)}{
    ' with Residual Sparse Training (only a sparse residual of the visual tower is stored)' if rst else ''},
built with uda-distill at code revision `{config['code_revision']}`.

## Intended use
Classifying images of the {task['target']} domain into these classes, in this order:
{', '.join(f'`{c}`' for c in config['classes'])}.
It is not meant for other domains or classes: its accuracy there is unknown.

```bash
uda-distill predict BUNDLE_FOLDER path/to/images/ --out predictions.csv --top-k 3
uda-distill export BUNDLE_FOLDER --format pt2 --out student.pt2   # or merged / onnx
```

## Model
- base model ({base['role']}): `{base['name']}`{f", pretrained `{base['pretrained']}`" if base.get('pretrained') else ''},
  QuickGELU {base['quick_gelu']}, precision {base['precision']}, visual weights sha256 `{base['weights_sha256'][:16]}...`;
  the bundle refuses any other base
- preprocessing (open_clip): `{base['preprocess']}`
- trained parts only in `model.safetensors`; everything else in `config.json`

## Training and evaluation protocol
Transductive unsupervised domain adaptation: the model trained on all target images without their labels
and is scored on the same images. **Reported: the last epoch** (epoch {metrics['last']['epoch']}):
accuracy {metrics['last']['acc']:.2f} %, mean class accuracy {metrics['last']['mean_class_acc']:.2f} %
on {metrics['last']['n']} images. The best epoch ({metrics['best_oracle']['epoch']},
{metrics['best_oracle']['acc']:.2f} %) was selected with target labels: an oracle upper bound, not a
result a user without labels could reproduce. The shipped weights are the last epoch's.

## Limits
- Accuracy holds for the {task['target']} images it adapted to; new images from the same domain may score lower.
- The base model's own license and biases apply; its training data is not described here.
- {_seed_line(config)}
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def _seed_line(config: dict[str, Any]) -> str:
    seed, over = config["params"]["seed"], config["metrics"].get("over_seeds")
    if not over:
        return f"Seed {seed}; one run, no error bars."
    acc = np.asarray(over["acc"], dtype=float)
    return (f"Seed {seed}, the first of seeds {over['seeds']}: over those runs the last-epoch target accuracy was "
            f"{acc.mean():.2f} ± {acc.std(ddof=1):.2f} % (sample std); this bundle ships the first.")

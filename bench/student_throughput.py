"""Inference throughput of the shipped models: student vs teacher, and the exported (pt2) student vs eager.

For each pair (the real-CLIP ViT-B/16 teacher -> ViT-B/32 student, and the default stand-ins) both models
classify the same synthetic images, each through its own preprocessing (done before timing): the teacher
as the source-prompted teacher infers (its image encoder against class vectors), the student as its
promptkd bundle does (prompted encoder + projector against the same class vectors, the params' promptkd
block). Weights are random: compute is what is measured, so the real architectures run offline. Variants
alternate for ``--repeats`` rounds (bench.timing); prints one JSON object of images/s and ratios.

    python -m bench.student_throughput --batch-size 32 --repeats 3
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import pipeline  # noqa: F401  (torchvision guard)
import torch
from PIL import Image
from torch.nn import functional as F

from bench.timing import median_times
from pipeline.config import load_params
from pipeline.methods.classifiers import CosineClassifier
from pipeline.methods.shared import make_student
from pipeline.models.factory import ModelSpec, load_model

PAIRS = {"clip": ("configs/digits_clip.yaml", "ViT-B-16-quickgelu", "ViT-B-32-quickgelu"),
         "standins": ("params.yaml", "digits-vit-teacher", "digits-vit-student")}


def models(params_file: str, teacher_name: str, student_name: str, classes: int):
    torch.manual_seed(0)
    teacher = load_model(ModelSpec(name=teacher_name, pretrained="random", role="teacher"))
    student = load_model(ModelSpec(name=student_name, pretrained="random", role="student"))
    W = F.normalize(torch.randn(classes, teacher.identity["embed_dim"]), dim=-1)
    block = load_params(params_file)["distill"]["promptkd"]
    prompted = make_student(student.model.visual, teacher_dim=W.shape[1],
                            **{k: block[k] for k in ("n_tokens", "location", "depth")})
    return ((teacher, CosineClassifier(teacher.model.visual, W, teacher.logit_scale).eval()),
            (student, CosineClassifier(prompted, W, teacher.logit_scale).eval()))


def images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)) for _ in range(n)]


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    pictures, out = images(args.batch_size), {"batch_size": args.batch_size, "threads": torch.get_num_threads()}
    for pair, (params_file, teacher_name, student_name) in PAIRS.items():
        (teacher, t_model), (student, s_model) = models(params_file, teacher_name, student_name, args.classes)
        x_t = torch.stack([teacher.preprocess(p) for p in pictures])
        x_s = torch.stack([student.preprocess(p) for p in pictures])
        program = torch.export.export(s_model, (x_s,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
        exported = program.module()
        diff = float((exported(x_s) - s_model(x_s)).abs().max())
        seconds, _ = median_times({"teacher": lambda: t_model(x_t), "student": lambda: s_model(x_s),
                                   "student_pt2": lambda: exported(x_s)}, repeats=args.repeats, device="cpu")
        rate = {k: round(args.batch_size / v, 1) for k, v in seconds.items()}
        out[pair] = {"teacher": teacher_name, "student": student_name, "images_per_s": rate,
                     "student_over_teacher": round(rate["student"] / rate["teacher"], 2),
                     "pt2_over_eager_student": round(rate["student_pt2"] / rate["student"], 2),
                     "pt2_max_abs_logit_diff": diff}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()

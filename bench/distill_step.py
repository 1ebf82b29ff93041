"""One distillation step with cached teacher logits vs. with the teacher run online.

Same student, teacher, batch and optimiser; the two variants alternate for ``--repeats`` rounds and the
medians are compared, so machine noise hits both alike. Weights are random (compute is what is measured),
so the real architectures can be timed offline. Prints one JSON object.

    python -m bench.distill_step --teacher ViT-B-16-quickgelu --student ViT-B-32-quickgelu --batch-size 16
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import pipeline  # noqa: F401  (torchvision guard)
import torch

from pipeline.losses.kd import kl_divergence
from pipeline.models.factory import ModelSpec, load_model
from pipeline.models.prompted import PromptedStudent


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="ViT-B-16-quickgelu")
    parser.add_argument("--student", default="ViT-B-32-quickgelu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    teacher = load_model(ModelSpec(name=args.teacher, pretrained="random"), device=args.device)
    student_model = load_model(ModelSpec(name=args.student, pretrained="random"), device=args.device)
    dim = teacher.identity["embed_dim"]
    W = torch.nn.functional.normalize(torch.randn(args.classes, dim, device=args.device), dim=-1)
    student = PromptedStudent(student_model.model.visual, teacher_dim=dim, n_tokens=4, location="append",
                              depth=2).to(args.device)
    params = student.trainable_parameters()
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    t_size = teacher.identity["preprocess"]["size"]
    s_size = student_model.identity["preprocess"]["size"]
    x_teacher = torch.randn(args.batch_size, 3, *t_size, device=args.device)
    x_student = torch.randn(args.batch_size, 3, *s_size, device=args.device)
    with torch.no_grad():
        cached = 100 * torch.nn.functional.normalize(teacher.model.encode_image(x_teacher), dim=-1) @ W.t()

    def step(online: bool) -> float:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        if online:
            with torch.no_grad():
                z_t = 100 * torch.nn.functional.normalize(teacher.model.encode_image(x_teacher), dim=-1) @ W.t()
        else:
            z_t = cached
        loss = kl_divergence(100 * student(x_student) @ W.t(), z_t)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    step(True), step(False)  # warm-up
    times = {"cached": [], "online": []}
    for _ in range(args.repeats):
        times["online"].append(step(True))
        times["cached"].append(step(False))
    cached_s, online_s = statistics.median(times["cached"]), statistics.median(times["online"])
    result = {"teacher": args.teacher, "student": args.student, "batch_size": args.batch_size,
              "device": args.device, "repeats": args.repeats, "cached_step_s": round(cached_s, 4),
              "online_step_s": round(online_s, 4), "ratio_online_over_cached": round(online_s / cached_s, 2)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

"""EKDA iteration cost: teacher step vs. student step, and a full EKDA iteration vs. a two-stage step.

The two-stage (PromptKD/CDU-style) step trains the same student from cached teacher logits, so it runs no
teacher at all. All variants use the same models, batch and optimiser settings, the real EKDA step
losses (:func:`pipeline.methods.ekda.teacher_loss` / ``student_loss``) with the training shell's update
(:func:`pipeline.methods.training.update`), and alternate for ``--repeats``
rounds; medians are compared, so machine noise hits every variant alike. Weights are random (compute is
what is measured), so real architectures can be timed offline. On CUDA the peak memory of each variant is
measured too. Prints one JSON object.

    python -m bench.ekda_iteration                                   # smoke stand-ins, CPU
    python -m bench.ekda_iteration --teacher ViT-L-14-quickgelu --student ViT-B-16-quickgelu --batch-size 32
"""
from __future__ import annotations

import argparse
import json

import pipeline  # noqa: F401  (torchvision guard)
import torch
from torch.nn import functional as F

from bench.timing import median_times
from pipeline.losses import LOSS_DEFAULTS, build_distill_loss
from pipeline.methods.ekda import student_loss, teacher_loss
from pipeline.methods.training import update
from pipeline.models.factory import ModelSpec, autocast, load_model
from pipeline.models.prompted import PromptedStudent
from pipeline.models.teacher_prompts import PromptedTeacher

EKDA = {"ce_weight": 1.0, "align_weight": 1.0}
SCL = {"text_weight": 25.0, "image_weight": 10.0, "kl_weight": 1.0}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="digits-vit-teacher")
    parser.add_argument("--student", default="digits-vit-student")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=65)
    parser.add_argument("--tokens", type=int, default=4, help="text/visual prompt tokens (EKDA N_CTX)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    dev = args.device
    torch.manual_seed(0)
    t_model = load_model(ModelSpec(name=args.teacher, pretrained="random", precision=args.precision), device=dev)
    s_model = load_model(ModelSpec(name=args.student, pretrained="random", precision=args.precision), device=dev)
    names = [f"class {i}" for i in range(args.classes)]
    teacher = PromptedTeacher(t_model.model, t_model.tokenizer, names, template="a photo of a {}.",
                              n_ctx=args.tokens, init="random", visual_tokens=args.tokens).to(dev)
    dim = t_model.identity["embed_dim"]
    depth = len(s_model.model.visual.transformer.resblocks)
    student = PromptedStudent(s_model.model.visual, teacher_dim=dim, n_tokens=args.tokens, location="middle",
                              depth=depth).to(dev)
    loss = build_distill_loss({**LOSS_DEFAULTS, "weight": 100.0, "reduction": "numel"}, n_classes=args.classes,
                              feature_dim=dim)
    opt_t = torch.optim.SGD(teacher.trainable_parameters(), lr=0.005, momentum=0.9)
    opt_s = torch.optim.SGD(student.trainable_parameters(), lr=0.005, momentum=0.9)
    size = t_model.identity["preprocess"]["size"]
    x_s, x_t = (torch.randn(args.batch_size, 3, *size, device=dev) for _ in range(2))
    y = torch.randint(0, args.classes, (args.batch_size,), device=dev)
    zs_text = F.normalize(torch.randn(args.classes, dim, device=dev), dim=-1)
    zs_image = F.normalize(torch.randn(args.batch_size, dim, device=dev), dim=-1)
    cached = 100 * zs_image @ zs_text.t()  # stands in for the pre-computed teacher logits of the batch
    precisions = (args.precision, args.precision)

    def run_teacher():
        value, _ = teacher_loss(teacher, x_s, y, zs_text=zs_text, zs_image=zs_image, scale=100.0,
                                precision=args.precision, weights=SCL)
        update(opt_t, value, where="bench teacher step")

    def run_student():
        value, _, _ = student_loss(teacher, student, loss, x_t, scale=100.0, precisions=precisions, ekda=EKDA)
        update(opt_s, value, where="bench student step")

    def run_two_stage():  # student from cached logits: no teacher forward, KD loss only
        student.train()
        student.encoder.visual.eval()
        with autocast(args.precision, dev):
            f_s = student.embed(x_t).float()
        value, _ = loss(100 * F.normalize(f_s, dim=-1) @ zs_text.t(), cached)
        update(opt_s, value, where="bench two-stage step")

    variants = {"teacher_step": run_teacher, "student_step": run_student,
                "ekda_iteration": lambda: (run_teacher(), run_student()), "two_stage_step": run_two_stage}
    med, peak = median_times(variants, repeats=args.repeats, device=dev)
    result = {"teacher": args.teacher, "student": args.student, "batch_size": args.batch_size,
              "classes": args.classes, "tokens": args.tokens, "precision": args.precision, "device": dev,
              "repeats": args.repeats, **{f"{k}_s": round(v, 4) for k, v in med.items()},
              "ratio_teacher_over_student_step": round(med["teacher_step"] / med["student_step"], 2),
              "ratio_ekda_iteration_over_two_stage_step": round(med["ekda_iteration"] / med["two_stage_step"], 2)}
    if peak:
        result["peak_gpu_memory_gib"] = peak
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

"""CMKD iteration cost with and without FixMatch and RST, and the RST residual's bytes vs the dense visual tower.

Four variants of one CMKD iteration (forward, loss, backward, Nesterov SGD step, per-iteration lr step) on the
same model and batches: plain, + FixMatch (a third encoder pass on the strong view), + RST (the projection to
theta0 after the step), + both. They alternate for ``--repeats`` rounds and the medians are compared, so machine
noise hits every variant alike. Then ``--rst-iters`` iterations with RST, the residual file they leave
(int32 index + value per changed weight, safetensors) and the dense visual state dict (safetensors) are
written and their sizes compared. Weights are random (compute is what is measured), so real architectures can
be timed offline. Prints one JSON object.

    python -m bench.cmkd_iteration                                   # smoke stand-in student, CPU
    python -m bench.cmkd_iteration --model ViT-B-16 --batch-size 32 --classes 65
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import pipeline  # noqa: F401  (torchvision guard)
import torch
from safetensors.torch import save_file

from bench.timing import median_times
from pipeline.methods.cmkd import DEFAULT_CFG, CmkdModel, cmkd_optimizer, cmkd_step
from pipeline.models.factory import ModelSpec, load_model
from pipeline.models.residual import RstProjection, dsp_counts, frozen_copy, save_residual


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="digits-vit-student")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=65)
    parser.add_argument("--lr", type=float, default=3e-6, help="visual tower lr (head x 1000)")
    parser.add_argument("--rst-threshold", type=float, default=1e-6)
    parser.add_argument("--rst-iters", type=int, default=5, help="iterations before measuring the residual")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    dev = args.device
    torch.manual_seed(0)
    loaded = load_model(ModelSpec(name=args.model, pretrained="random"), device=dev)
    names = [f"class {i}" for i in range(args.classes)]
    size = loaded.identity["preprocess"]["size"]
    x_s, x_w, x_st = (torch.randn(args.batch_size, 3, *size, device=dev) for _ in range(3))
    y = torch.randint(0, args.classes, (args.batch_size,), device=dev)

    def build():
        model = CmkdModel(copy.deepcopy(loaded.model), loaded.tokenizer, names, template="a photo of a {}.").to(dev)
        optimizer, scheduler = cmkd_optimizer(model, lr=args.lr, head_multiplier=1000.0)
        return {"model": model, "optimizer": optimizer, "scheduler": scheduler, "t": 0,
                "rst": RstProjection(frozen_copy(model.visual, device=dev), args.rst_threshold)}

    def iteration(run: dict, fixmatch: bool, rst: bool) -> None:
        cfg = {**DEFAULT_CFG, "fixmatch": {**DEFAULT_CFG["fixmatch"], "enabled": fixmatch}}
        cmkd_step(run["model"], run["optimizer"], run["scheduler"], source_images=x_s, source_labels=y,
                  target_weak=x_w, target_strong=x_st if fixmatch else None, t=run["t"], cfg=cfg,
                  rst=run["rst"] if rst else None)
        run["t"] += 1

    variants = {"plain": (False, False), "fixmatch": (True, False), "rst": (False, True), "fixmatch_rst": (True, True)}
    runs = {name: build() for name in variants}  # one model each: every variant steps its own counter
    med, peak = median_times({name: (lambda n=name, f=fm, r=rst: iteration(runs[n], f, r))
                              for name, (fm, rst) in variants.items()}, repeats=args.repeats, device=dev)

    run = build()  # the residual after --rst-iters RST iterations vs the dense tower
    for _ in range(args.rst_iters):
        iteration(run, False, True)
    model = run["model"]
    trained = {k: v.detach().cpu() for k, v in model.visual.named_parameters()}
    base = {k: v.cpu() for k, v in run["rst"].base.items()}
    head = {k: v.detach().cpu() for k, v in model.head.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        residual, dense = Path(tmp) / "residual.safetensors", Path(tmp) / "visual.safetensors"
        save_residual(residual, trained=trained, base=base, identity=loaded.identity, extra=head)
        save_file({k: v.contiguous() for k, v in model.visual.state_dict().items()}, str(dense))
        dsp = dsp_counts(trained, base, head, n_classes=args.classes, dim=model.text_vectors.shape[1], path=residual)
        dense_bytes = dense.stat().st_size
    result = {"model": args.model, "batch_size": args.batch_size, "classes": args.classes, "device": dev,
              "repeats": args.repeats, **{f"{k}_s": round(v, 4) for k, v in med.items()},
              "ratio_fixmatch_over_plain": round(med["fixmatch"] / med["plain"], 2),
              "ratio_rst_over_plain": round(med["rst"] / med["plain"], 2),
              "ratio_fixmatch_rst_over_plain": round(med["fixmatch_rst"] / med["plain"], 2),
              "rst": {"threshold": args.rst_threshold, "iterations": args.rst_iters, "lr": args.lr,
                      "visual_params": sum(v.numel() for v in trained.values()), **dsp,
                      "dense_visual_bytes": dense_bytes,
                      "ratio_residual_over_dense": round(dsp["bytes"] / dense_bytes, 4)}}
    if peak:
        result["peak_gpu_memory_gib"] = peak
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

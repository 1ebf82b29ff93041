"""The source-prompted teacher: a frozen open_clip CLIP with the learnable prompts of the CoOp family.

One module covers every variant, described by its keywords (the ``prompts.kind`` presets of
:mod:`pipeline.methods.prompt_kinds` map a kind's params block to them):

* text context (CoOp, Zhou et al., IJCV 2022, ``KaiyangZhou/CoOp``): tokens 1..n_ctx of ``template``
  become learnable, from their word embeddings (``init="word"``) or N(0, 0.02) (``"random"``, the
  CDU/EKDA/PDA overwrite); shared, or one per class (``class_specific``, CSC);
* meta-net (CoCoOp, Zhou et al., CVPR 2022): pi(f(x)) = Linear(D, D/16) -> ReLU -> Linear(D/16, width) of the
  normalised image feature is added to every context token, so the class vectors depend on the image;
  the original runs batch 1 per image, here the B x C prompts of a batch are one text-tower pass;
* deep text prompts (IVLP, MaPLe, PromptSRC; Khattak et al., CVPR 2023 / ICCV 2023,
  ``muzairkhattak/multimodal-prompt-learning``, ``muzairkhattak/PromptSRC``): the context positions are
  replaced by fresh vectors at the input of text layers 2..text_depth;
* visual prompts (VPT, Jia et al., ECCV 2022): ``visual_tokens`` tokens after the class token (``middle``)
  or after the patches (``append``), deep up to ``visual_depth``;
* coupling (MaPLe; PDA, Bai et al., AAAI 2024): the visual prompt of layers 1..coupled_depth is a per-layer
  Linear(text width -> visual width) of that layer's text prompt; deeper visual prompts are independent.

A depth of 0 means every layer of that tower. With zero prompts the teacher is plain open_clip (tested).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.models.prompted import (LOCATIONS, PROMPT_INITS, PromptTokens, check_template, encode_with_prompts,
                                      load_own_state, own_parameters, own_state)


class PromptedTeacher(nn.Module):
    """A frozen CLIP with text and/or visual prompts; only the prompts (and their nets) learn."""

    def __init__(self, clip: nn.Module, tokenizer, classnames: list[str], *, template: str, n_ctx: int,
                 init: str = "word", class_specific: bool = False, text_depth: int = 1, meta_net: bool = False,
                 visual_tokens: int = 0, visual_location: str = "middle", visual_depth: int = 1,
                 coupled_depth: int = 0, init_std: float = 0.02):
        super().__init__()
        if init not in PROMPT_INITS:
            raise ValueError(f"prompt init {init!r} is not one of {PROMPT_INITS}")
        if visual_location not in LOCATIONS:
            raise ValueError(f"visual prompt location {visual_location!r} is not one of {LOCATIONS}")
        check_template(template)
        self.clip = clip
        text_layers, visual_layers = len(clip.transformer.resblocks), len(clip.visual.transformer.resblocks)
        self.text_depth = _depth(text_depth, text_layers, "text prompt depth")
        self.visual_depth = _depth(visual_depth, visual_layers, "visual prompt depth")
        self.n_ctx, self.location, self.coupled_depth = n_ctx, visual_location, coupled_depth
        self.visual_tokens = n_ctx if coupled_depth else visual_tokens
        if coupled_depth:
            if not n_ctx or class_specific or meta_net:
                raise ValueError("coupled visual prompts project a shared text context: n_ctx > 0, not class-specific, "
                                 "no meta-net")
            if not 0 < coupled_depth <= min(self.text_depth, self.visual_depth):
                raise ValueError(f"coupled depth {coupled_depth} must be between 1 and the text and visual prompt "
                                 f"depths ({self.text_depth}, {self.visual_depth})")
        if meta_net and (not n_ctx or class_specific):
            raise ValueError("the CoCoOp meta-net shifts a shared text context: n_ctx > 0, not class-specific")
        self.prompts = PromptTokens(clip, tokenizer, [template.format(name) for name in classnames], n_ctx=n_ctx,
                                    prefix=template.split("{}")[0])
        self.n_classes = len(classnames)
        words = self.prompts.word_embeddings()
        ctx = words.clone() if init == "word" else torch.randn_like(words) * init_std
        if class_specific:  # [C, n_ctx, width]: every class starts from the same context
            ctx = ctx.unsqueeze(0).repeat(len(classnames), 1, 1)
        self.ctx = nn.Parameter(ctx)
        text_width, visual_width = words.shape[1], clip.visual.conv1.out_channels
        self.deep_text = (nn.Parameter(torch.randn(self.text_depth - 1, n_ctx, text_width) * init_std)
                          if n_ctx and self.text_depth > 1 else None)
        self.embed_dim = embed_dim = (clip.text_projection.shape[1] if isinstance(clip.text_projection, torch.Tensor)
                                      else clip.text_projection.out_features)  # of both towers' features
        self.meta_net = nn.Sequential(nn.Linear(embed_dim, embed_dim // 16), nn.ReLU(inplace=True),
                                      nn.Linear(embed_dim // 16, text_width)) if meta_net else None
        self.visual_projections = nn.ModuleList(nn.Linear(text_width, visual_width) for _ in range(coupled_depth))
        independent = self.visual_depth - coupled_depth if self.visual_tokens else 0
        self.visual_prompts = (nn.Parameter(torch.randn(independent, self.visual_tokens, visual_width) * init_std)
                               if independent > 0 else None)

    # -- what the rest of the pipeline asks ------------------------------------------------------------
    @property
    def conditional(self) -> bool:
        """The class vectors depend on the image (CoCoOp): no fixed [C, D] classifier exists."""
        return self.meta_net is not None

    @property
    def prompted_vision(self) -> bool:
        """Image features depend on the prompts (so they are task-specific and re-encoded per state)."""
        return self.visual_tokens > 0

    def class_vectors(self, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised class text vectors: [C, D], or [B, C, D] conditioned on normalised ``image_features``
        [B, D] (CoCoOp; required there)."""
        deep = self.deep_text
        if self.meta_net is None:
            return self.prompts.encode(self.ctx, deep)
        if image_features is None:
            raise ValueError("a CoCoOp teacher's class vectors depend on the image: pass its image features")
        shift = self.meta_net(image_features.to(self.ctx.dtype))                    # [B, width]
        ctx = self.ctx.unsqueeze(0) + shift.unsqueeze(1)                            # [B, n_ctx, width]
        B, C = len(image_features), self.n_classes
        rows = ctx.unsqueeze(1).expand(B, C, *ctx.shape[1:]).reshape(B * C, *ctx.shape[1:])
        return self.prompts.encode(rows, deep, repeat=B).view(B, C, -1)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image features [B, D], through the visual prompts when there are any."""
        if self.prompted_vision:
            out = encode_with_prompts(self.clip.visual, images, self.layer_visual_prompts(), self.location)
        else:
            out = self.clip.encode_image(images)
        return F.normalize(out.float(), dim=-1)

    def logits(self, image_features: torch.Tensor, scale: float, class_vectors: torch.Tensor | None = None
               ) -> torch.Tensor:
        """s * f @ t^T for normalised ``image_features`` [B, D], per image for CoCoOp; ``class_vectors``: the
        teacher's class vectors for these images when already computed ([C, D], or [B, C, D])."""
        f = image_features.float()
        text = self.class_vectors(f if self.conditional else None) if class_vectors is None else class_vectors
        if text.dim() == 3:
            return scale * torch.einsum("bd,bcd->bc", f, text.float())
        return scale * f @ text.float().t()

    def layer_visual_prompts(self) -> torch.Tensor:
        """The visual prompt tokens of layers 1..visual_depth, [depth, n, visual width]: projections of the text
        prompts up to the coupled depth, then the independent ones."""
        layers = []
        if self.coupled_depth:
            text = [self.ctx, *(self.deep_text if self.deep_text is not None else [])]
            layers = [proj(text[i].float()) for i, proj in enumerate(self.visual_projections)]
        if self.visual_prompts is not None:
            layers.extend(self.visual_prompts)
        return torch.stack([p.float() for p in layers])

    # -- training and checkpoints --------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return own_parameters(self, self.clip)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return own_state(self, self.clip)

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        load_own_state(self, self.clip, state)


def _depth(depth: int, layers: int, what: str) -> int:
    depth = depth or layers
    if not 1 <= depth <= layers:
        raise ValueError(f"{what} {depth} must be between 1 and the model's {layers} layers (0: every layer)")
    return depth

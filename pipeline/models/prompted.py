"""Learnable prompts injected into a frozen open_clip ViT, without copying its transformer.

* :class:`PromptTokens`: tokenised prompts whose tokens 1..n_ctx are replaced by given context vectors (and,
  with deep prompts, again at the input of later text layers); the teacher
  (:mod:`pipeline.models.teacher_prompts`) and DAPL own the contexts.
* :class:`PromptedVisionEncoder`: ``n_tokens`` visual prompt tokens added after the positional embedding and
  before ``ln_pre``, inserted after the class token (``location="middle"``, VPT/EKDA) or after the patches
  (``"append"``, IVLP/PromptKD); with ``depth > 1`` the prompt tokens are replaced by fresh learnable ones at
  the input of layers 2..depth (deep prompts).
* :class:`Projector`: the two-layer map from the student's embedding width to the teacher's.

With zero prompts both reproduce the plain open_clip outputs exactly (tested).
"""
from __future__ import annotations

import torch
from open_clip.transformer import text_global_pool
from torch import nn
from torch.nn import functional as F


PROMPT_INITS = ("word", "random")  # word: from the init words' embeddings; random: N(0, 0.02) (CDU/EKDA)
LOCATIONS = ("middle", "append")   # visual prompts after the class token (VPT) or after the patches (IVLP)

class PromptTokens(nn.Module):
    """Tokenised prompts (one per row) whose tokens 1..n_ctx are replaced by given context vectors.

    Holds no learnable parameters: the teacher and DAPL's prompt learner own the contexts and call
    :meth:`encode`.
    """

    def __init__(self, clip: nn.Module, tokenizer, prompts: list[str], *, n_ctx: int, prefix: str):
        super().__init__()
        self.clip = clip
        # the tokenizer returns CPU ids; the embedding lookup needs them where the (frozen) CLIP lives
        tokens = tokenizer(prompts).to(clip.token_embedding.weight.device)
        prefix_len = len(tokenizer.encode(prefix)) if hasattr(tokenizer, "encode") else n_ctx
        if n_ctx > prefix_len:
            raise ValueError(f"n_ctx={n_ctx} but the prompt prefix {prefix!r} has only {prefix_len} tokens before "
                             f"the class name; lengthen the template (e.g. 'X X X X {{}}.') or lower n_ctx")
        self.register_buffer("tokens", tokens, persistent=False)
        self.n_ctx = n_ctx

    def word_embeddings(self) -> torch.Tensor:
        """Embeddings of the words the context replaces (of the first prompt), [n_ctx, width]."""
        with torch.no_grad():
            return self.clip.token_embedding(self.tokens[:1, 1:1 + self.n_ctx])[0].float()

    def encode(self, ctx: torch.Tensor, deep: torch.Tensor | None = None, *, repeat: int = 1) -> torch.Tensor:
        """L2-normalised text vectors [repeat * P, embed_dim].

        ``ctx`` is [n_ctx, width] (shared) or [repeat * P, n_ctx, width] (one per row); ``deep`` [k, n_ctx, width]
        replaces the context positions at the input of layers 2..k+1 (deep prompts, IVLP/MaPLe); ``repeat``
        encodes the prompts that many times over (CoCoOp: once per image, rows image-major).
        """
        clip = self.clip
        cast_dtype = clip.transformer.get_cast_dtype()
        tokens = self.tokens.repeat(repeat, 1) if repeat > 1 else self.tokens
        x = clip.token_embedding(tokens).to(cast_dtype)
        n = self.n_ctx
        if n:
            ctx = ctx.to(cast_dtype)
            ctx = ctx if ctx.dim() == 3 else ctx.unsqueeze(0).expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :1], ctx, x[:, 1 + n:]], dim=1)
        x = x + clip.positional_embedding.to(cast_dtype)
        if deep is None or not n:
            x = clip.transformer(x, attn_mask=clip.attn_mask)
        else:
            batch_first = getattr(clip.transformer, "batch_first", True)
            for i, block in enumerate(clip.transformer.resblocks):  # x stays [P, L, width] between blocks
                if 0 < i <= len(deep):
                    p = deep[i - 1].to(cast_dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
                    x = torch.cat([x[:, :1], p, x[:, 1 + n:]], dim=1)
                x = block(x if batch_first else x.transpose(0, 1), attn_mask=clip.attn_mask)
                x = x if batch_first else x.transpose(0, 1)
        x = clip.ln_final(x)
        x = text_global_pool(x, tokens, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
        x = clip.text_projection(x) if isinstance(clip.text_projection, nn.Linear) else x @ clip.text_projection
        return F.normalize(x.float(), dim=-1)


def check_template(template: str) -> None:
    if "{}" not in template:
        raise ValueError(f"prompt template {template!r} must contain '{{}}' where the class name goes")


class PromptedVisionEncoder(nn.Module):
    """An open_clip ``VisionTransformer`` with (deep) visual prompt tokens."""

    def __init__(self, visual: nn.Module, *, n_tokens: int, location: str = "append", depth: int = 1,
                 init_std: float = 0.02):
        super().__init__()
        if location not in LOCATIONS:
            raise ValueError(f"visual prompt location {location!r} is not one of {LOCATIONS}")
        n_layers = len(visual.transformer.resblocks)
        if not 1 <= depth <= n_layers:
            raise ValueError(f"visual prompt depth {depth} must be between 1 and the model's {n_layers} layers")
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
            raise ValueError("visual prompts need a class-token ViT (pool_type 'tok', no attention pooling)")
        self.visual = visual
        self.n_tokens, self.location, self.depth = n_tokens, location, depth
        width = visual.conv1.out_channels
        self.prompts = nn.Parameter(torch.randn(depth, n_tokens, width) * init_std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings (not normalised), shape [B, embed_dim]."""
        return encode_with_prompts(self.visual, images, self.prompts if self.n_tokens else None, self.location)


def encode_with_prompts(visual: nn.Module, images: torch.Tensor, prompts: torch.Tensor | None,
                        location: str) -> torch.Tensor:
    """Image embeddings (not normalised) [B, embed_dim] of an open_clip ViT with visual prompt tokens.

    ``prompts`` [depth, n, width]: layer 1's tokens are added after the positional embedding and before
    ``ln_pre`` (after the class token for ``middle``, after the patches for ``append``); those of layers
    2..depth replace them at the input of that layer. None: the plain encoder.
    """
    v = visual
    x = v.conv1(images)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = v.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
    x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
    x = v.patch_dropout(x)
    n = 0 if prompts is None else prompts.shape[1]
    if n:
        p = prompts[0].to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        x = torch.cat([x[:, :1], p, x[:, 1:]] if location == "middle" else [x, p], dim=1)
    x = v.ln_pre(x)
    start = 1 if location == "middle" else x.shape[1] - n
    batch_first = getattr(v.transformer, "batch_first", True)
    for i, block in enumerate(v.transformer.resblocks):
        if n and 0 < i < len(prompts):
            p = prompts[i].to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :start], p, x[:, start + n:]], dim=1)
        x = block(x if batch_first else x.transpose(0, 1), attn_mask=None)
        x = x if batch_first else x.transpose(0, 1)
    pooled, _ = v._pool(x)
    return pooled @ v.proj if v.proj is not None else pooled


class Projector(nn.Module):
    """Linear -> BatchNorm -> ReLU -> Linear (the 1x1-conv projector of PromptKD/EKDA, 512 -> 768 for B/16)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, out_dim), nn.BatchNorm1d(out_dim), nn.ReLU(inplace=True),
                                 nn.Linear(out_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PromptedStudent(nn.Module):
    """Student image encoder with visual prompts and a projector into the teacher's embedding space."""

    def __init__(self, visual: nn.Module, *, teacher_dim: int, n_tokens: int, location: str, depth: int):
        super().__init__()
        self.encoder = PromptedVisionEncoder(visual, n_tokens=n_tokens, location=location, depth=depth)
        student_dim = visual.proj.shape[1] if visual.proj is not None else visual.conv1.out_channels
        self.projector = Projector(student_dim, teacher_dim)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Projected features in the teacher's space before normalisation, [B, teacher_dim]."""
        return self.projector(self.encoder(images).float())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised features in the teacher's space, shape [B, teacher_dim]."""
        return F.normalize(self.embed(images), dim=-1)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Prompts and projector; the backbone stays frozen."""
        return own_parameters(self, self.encoder.visual)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Only what training changes (prompts, projector incl. BN statistics): small checkpoints."""
        return own_state(self, self.encoder.visual)

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        load_own_state(self, self.encoder.visual, state)


def _frozen_ids(frozen: nn.Module) -> set[int]:
    return {id(t) for t in frozen.state_dict(keep_vars=True).values()}


def own_parameters(module: nn.Module, frozen: nn.Module) -> list[nn.Parameter]:
    """Parameters of ``module`` that are not part of the frozen backbone ``frozen``."""
    ids = _frozen_ids(frozen)
    return [p for p in module.parameters() if id(p) not in ids]


def own_entries(module: nn.Module, frozen: nn.Module) -> dict[str, torch.Tensor]:
    """State entries (parameters and buffers) of ``module`` outside ``frozen``, as the live tensors."""
    ids = _frozen_ids(frozen)
    return {k: v for k, v in module.state_dict(keep_vars=True).items() if id(v) not in ids}


def own_state(module: nn.Module, frozen: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of ``module``: :func:`own_entries`, detached copies on the CPU."""
    return {k: v.detach().cpu().clone() for k, v in own_entries(module, frozen).items()}


def load_own_state(module: nn.Module, frozen: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a state saved by :func:`own_state`; every trainable entry must be there, nothing else."""
    expected = set(own_entries(module, frozen))
    if set(state) != expected:
        raise ValueError(f"saved prompt state does not fit this model: missing {sorted(expected - set(state))}, "
                         f"unexpected {sorted(set(state) - expected)}")
    module.load_state_dict(state, strict=False)

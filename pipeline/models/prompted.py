"""Learnable prompts injected into a frozen open_clip ViT, without copying its transformer.

* :class:`PromptedTextEncoder`: CoOp-style context. The prompt of class ``c`` is ``template.format(c)``; the
  first ``n_ctx`` tokens after the start token become learnable vectors, initialised from their word
  embeddings (``init="word"``) or N(0, 0.02) (``init="random"``, the CDU/EKDA overwrite); shared by all
  classes, or one context per class (``class_specific``, CoOp's CSC).
* :class:`PromptedVisionEncoder`: ``n_tokens`` visual prompt tokens added after the positional embedding and
  before ``ln_pre``, inserted after the class token (``location="middle"``, VPT/EKDA) or after the patches
  (``"append"``, IVLP/PromptKD); with ``depth > 1`` the prompt tokens are replaced by fresh learnable ones at
  the input of layers 2..depth (deep prompts).
* :class:`Projector`: the two-layer map from the student's embedding width to the teacher's.

With zero prompts both encoders reproduce the plain open_clip outputs exactly (tested).
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

    Holds no learnable parameters: :class:`PromptedTextEncoder` and DAPL's prompt learner own the contexts
    and call :meth:`encode`.
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

    def encode(self, ctx: torch.Tensor) -> torch.Tensor:
        """L2-normalised text vectors [P, embed_dim]; ``ctx`` is [n_ctx, width] (shared) or [P, n_ctx, width]."""
        clip = self.clip
        cast_dtype = clip.transformer.get_cast_dtype()
        x = clip.token_embedding(self.tokens).to(cast_dtype)
        if self.n_ctx:
            ctx = ctx.to(cast_dtype)
            ctx = ctx if ctx.dim() == 3 else ctx.unsqueeze(0).expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :1], ctx, x[:, 1 + self.n_ctx:]], dim=1)
        x = x + clip.positional_embedding.to(cast_dtype)
        x = clip.transformer(x, attn_mask=clip.attn_mask)
        x = clip.ln_final(x)
        x = text_global_pool(x, self.tokens, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
        x = clip.text_projection(x) if isinstance(clip.text_projection, nn.Linear) else x @ clip.text_projection
        return F.normalize(x.float(), dim=-1)


def check_template(template: str) -> None:
    if "{}" not in template:
        raise ValueError(f"prompt template {template!r} must contain '{{}}' where the class name goes")


class PromptedTextEncoder(nn.Module):
    """Class text vectors of a frozen open_clip text tower with a learnable (CoOp) context."""

    def __init__(self, clip: nn.Module, tokenizer, classnames: list[str], *, template: str, n_ctx: int,
                 init: str = "word", init_std: float = 0.02, class_specific: bool = False):
        super().__init__()
        if init not in PROMPT_INITS:
            raise ValueError(f"prompt init {init!r} is not one of {PROMPT_INITS}")
        check_template(template)
        self.prompts = PromptTokens(clip, tokenizer, [template.format(name) for name in classnames], n_ctx=n_ctx,
                                    prefix=template.split("{}")[0])
        self.n_ctx = n_ctx
        words = self.prompts.word_embeddings()
        ctx = words.clone() if init == "word" else torch.randn_like(words) * init_std
        if class_specific:  # [C, n_ctx, width]: every class starts from the same context
            ctx = ctx.unsqueeze(0).repeat(len(classnames), 1, 1)
        self.ctx = nn.Parameter(ctx)

    def forward(self) -> torch.Tensor:
        """L2-normalised class text vectors, shape [C, embed_dim]."""
        return self.prompts.encode(self.ctx)


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

    def _prompt_slice(self, seq_len: int) -> slice:
        n = self.n_tokens
        return slice(1, 1 + n) if self.location == "middle" else slice(seq_len - n, seq_len)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings (not normalised), shape [B, embed_dim]."""
        v = self.visual
        x = v.conv1(images)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = v.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        x = v.patch_dropout(x)
        if self.n_tokens:
            p = self.prompts[0].to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :1], p, x[:, 1:]] if self.location == "middle" else [x, p], dim=1)
        x = v.ln_pre(x)
        where = self._prompt_slice(x.shape[1])
        batch_first = getattr(v.transformer, "batch_first", True)
        for i, block in enumerate(v.transformer.resblocks):
            if self.n_tokens and 0 < i < self.depth:
                p = self.prompts[i].to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
                x = torch.cat([x[:, :where.start], p, x[:, where.stop:]], dim=1)
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


class PromptedTeacher(nn.Module):
    """A frozen CLIP with a learnable text context and optional shallow visual prompts (CoOp, VPT, both).

    ``n_ctx=0`` keeps the plain template (visual prompts only); ``visual_tokens=0`` keeps the plain image
    encoder (text prompts only, CoOp).
    """

    def __init__(self, clip: nn.Module, tokenizer, classnames: list[str], *, template: str, n_ctx: int,
                 init: str = "word", class_specific: bool = False, visual_tokens: int = 0,
                 visual_location: str = "middle"):
        super().__init__()
        self.clip = clip
        self.text = PromptedTextEncoder(clip, tokenizer, classnames, template=template, n_ctx=n_ctx, init=init,
                                        class_specific=class_specific)
        self.vision = (PromptedVisionEncoder(clip.visual, n_tokens=visual_tokens, location=visual_location)
                       if visual_tokens else None)

    def class_vectors(self) -> torch.Tensor:
        """L2-normalised class text vectors [C, D]."""
        return self.text()

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image features [B, D], through the visual prompts when there are any."""
        out = self.vision(images) if self.vision is not None else self.clip.encode_image(images)
        return F.normalize(out.float(), dim=-1)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return own_parameters(self, self.clip)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return own_state(self, self.clip)

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        load_own_state(self, self.clip, state)


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

"""CaiT (Touvron et al., "Going deeper with Image Transformers") in PyTorch, matching ViT-flax's ``CaiT``.

The model of conceptofmind/ViT-flax ``vit_flax/cait.py``, written fresh in the manner of lucidrains'
vit-pytorch: patch tokens (with position embeddings, no cls token) go through a patch transformer,
then a cls token attends to ``cat[cls, patches]`` in a short cls transformer; head = LayerNorm + Linear.
Every LayerNorm is bias-free with eps 1e-5, GELU is tanh-approximated, attention uses talking heads
(``h x h`` mixing of the scaled scores before the softmax and of the weights after it, no
renormalisation), and both sublayers of layer ``i`` (counted from 1, restarting in the cls transformer)
are scaled by the constant LayerScale 0.1 (i <= 18), 1e-5 (19..24) or 1e-6 (beyond).

Input ``[B, C, H, W]``, logits ``[B, num_classes]``. Differences from the flax module:

* dropout, ``emb_dropout`` and ``layer_dropout`` act in train mode only. ``layer_dropout`` is
  per-sample stochastic depth: each layer's two residual branches are dropped together for a random
  subset of the batch and kept ones are scaled by ``1 / (1 - layer_dropout)``, so eval mode is the
  plain model. (The flax code instead deletes layers at construction with a fixed PRNG key, which
  also removes their parameters: 113,377,768 instead of 121,773,032 for its README config.)
* other image sizes (multiples of the patch size) use bicubically resized position embeddings;
* ``channels`` is a keyword argument; the talking-heads matrices start as identities and the
  cls token / position embedding as truncated normals (flax: zeros).
"""

from __future__ import annotations

import re
from typing import Mapping

import torch
from einops import rearrange
from einops.layers.torch import Rearrange
from spandrel.util import store_hyperparameters
from torch import Tensor, nn

from .errors import IncompatibleWeightsError
from .vit import (
    FeedForward,
    Rule,
    check_image,
    const,
    convert_flax,
    flatten_flax,
    init_token_,
    pair,
    prenorm_target,
    resize_pos_grid,
    sub,
)

# helpers


def layer_scale_init(depth: int) -> float:
    """CaiT's LayerScale constant for layer ``depth`` (counted from 1), section 2 of the paper."""
    if depth <= 18:
        return 0.1
    if depth <= 24:
        return 1e-5
    return 1e-6


# classes


class LayerScale(nn.Module):
    """``fn(x) * scale`` with a constant (not learned) ``scale``, as ViT-flax computes it."""

    def __init__(self, dim: int, fn: nn.Module, depth: int):
        super().__init__()
        self.scale = layer_scale_init(depth)
        self.fn = fn

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        return self.fn(x, **kwargs) * self.scale

    def extra_repr(self) -> str:
        return f"scale={self.scale:g}"


class Attention(nn.Module):
    """Pre-norm talking-heads attention; with ``context``, keys/values come from ``cat[norm(x), context]``."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0):
        super().__init__()
        inner_dim = dim_head * heads
        self.heads = heads
        self.scale = dim_head**-0.5
        self.norm = nn.LayerNorm(dim, eps=1e-5, bias=False)
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim, inner_dim * 2, bias=False)
        self.mix_heads_pre_attn = nn.Parameter(torch.eye(heads))
        self.mix_heads_post_attn = nn.Parameter(torch.eye(heads))
        self.to_out = nn.Sequential(nn.Linear(inner_dim, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        x = self.norm(x)
        context = x if context is None else torch.cat([x, context], dim=1)

        q = self.to_q(x)
        k, v = self.to_kv(context).chunk(2, dim=-1)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))

        dots = torch.einsum("b h i d, b h j d -> b h i j", q, k) * self.scale
        dots = torch.einsum("b h i j, h g -> b g i j", dots, self.mix_heads_pre_attn)  # talking heads, pre-softmax
        attn = dots.softmax(dim=-1)
        attn = torch.einsum("b h i j, h g -> b g i j", attn, self.mix_heads_post_attn)  # talking heads, post-softmax

        out = torch.einsum("b h i j, b h j d -> b h i d", attn, v)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class Transformer(nn.Module):
    """``depth`` layers of ``x = LS(attn(x, context)) + x; x = LS(ff(x)) + x`` with stochastic depth."""

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        dim_head: int,
        mlp_dim: int,
        dropout: float = 0.0,
        layer_dropout: float = 0.0,
    ):
        super().__init__()
        if not 0.0 <= layer_dropout < 1.0:
            raise ValueError(f"CaiT: layer_dropout must be in [0, 1), got {layer_dropout}.")
        self.layer_dropout = layer_dropout
        self.layers = nn.ModuleList(
            [
                nn.ModuleList(
                    [
                        LayerScale(dim, Attention(dim, heads, dim_head, dropout), depth=ind + 1),
                        LayerScale(dim, FeedForward(dim, mlp_dim, dropout, eps=1e-5, norm_bias=False), depth=ind + 1),
                    ]
                )
                for ind in range(depth)
            ]
        )

    def keep_mask(self, x: Tensor) -> Tensor | None:
        """Per-sample factor ``[B, 1, 1]``: 0 for samples whose layer is dropped, ``1/(1-p)`` otherwise;
        ``None`` in eval mode or without layer dropout."""
        p = self.layer_dropout
        if not self.training or p == 0.0:
            return None
        keep = torch.empty(x.shape[0], 1, 1, device=x.device, dtype=x.dtype).bernoulli_(1.0 - p)
        return keep / (1.0 - p)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        for attn, ff in self.layers:
            keep = self.keep_mask(x)
            if keep is None:
                x = attn(x, context=context) + x
                x = ff(x) + x
            else:
                x = attn(x, context=context) * keep + x
                x = ff(x) * keep + x
        return x


@store_hyperparameters()
class CaiT(nn.Module):
    """CaiT classifier: ``[B, channels, H, W]`` -> logits ``[B, num_classes]``.

    Arguments and defaults are ViT-flax's; ``channels`` is added. ``depth`` is the patch transformer's
    depth, ``cls_depth`` the cls transformer's. H and W must be multiples of ``patch_size``.
    """

    def __init__(
        self,
        *,
        image_size: int | tuple[int, int],
        patch_size: int | tuple[int, int],
        num_classes: int,
        dim: int,
        depth: int,
        cls_depth: int,
        heads: int,
        mlp_dim: int,
        dim_head: int = 64,
        dropout: float = 0.0,
        emb_dropout: float = 0.0,
        layer_dropout: float = 0.0,
        channels: int = 3,
    ):
        super().__init__()
        image_height, image_width = pair(image_size)
        patch_height, patch_width = pair(patch_size)
        if image_height % patch_height or image_width % patch_width:
            raise ValueError(
                f"CaiT: image dimensions {image_height}x{image_width} must be divisible by the patch size "
                f"{patch_height}x{patch_width}."
            )
        self.channels = channels
        self.patch_size = (patch_height, patch_width)
        self.grid = (image_height // patch_height, image_width // patch_width)
        num_patches = self.grid[0] * self.grid[1]
        patch_dim = channels * patch_height * patch_width

        self.to_patch_embedding = nn.Sequential(
            Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch_height, p2=patch_width),
            nn.Linear(patch_dim, dim),
        )
        self.pos_embedding = nn.Parameter(init_token_(torch.empty(1, num_patches, dim)))
        self.cls_token = nn.Parameter(init_token_(torch.empty(1, 1, dim)))
        self.dropout = nn.Dropout(emb_dropout)

        self.patch_transformer = Transformer(dim, depth, heads, dim_head, mlp_dim, dropout, layer_dropout)
        self.cls_transformer = Transformer(dim, cls_depth, heads, dim_head, mlp_dim, dropout, layer_dropout)

        self.mlp_head = nn.Sequential(nn.LayerNorm(dim, eps=1e-5, bias=False), nn.Linear(dim, num_classes))

    def forward(self, img: Tensor) -> Tensor:
        h, w = check_image(img, channels=self.channels, multiple=self.patch_size, model="CaiT")
        grid = (h // self.patch_size[0], w // self.patch_size[1])

        x = self.to_patch_embedding(img)
        x = x + resize_pos_grid(self.pos_embedding, self.grid, grid)
        x = self.dropout(x)

        x = self.patch_transformer(x)

        cls_tokens = self.cls_token.expand(x.shape[0], -1, -1)
        x = self.cls_transformer(cls_tokens, context=x)

        return self.mlp_head(x[:, 0])


# ViT-flax parameter trees -> state dicts


def _transformer_rules(flax: str, torch_prefix: str) -> list[Rule]:
    layers = f"{torch_prefix}.layers"
    return [
        (rf"{flax}/Attention_(\d+)", sub(rf"{layers}.\1.0.fn")),
        (rf"{flax}/Attention_(\d+)/Dense_0", sub(rf"{layers}.\1.0.fn.to_q")),
        (rf"{flax}/Attention_(\d+)/Dense_1", sub(rf"{layers}.\1.0.fn.to_kv")),
        (rf"{flax}/Attention_(\d+)/Dense_2", sub(rf"{layers}.\1.0.fn.to_out.0")),
        (rf"{flax}/FeedForward_(\d+)/Dense_0", sub(rf"{layers}.\1.1.fn.net.1")),
        (rf"{flax}/FeedForward_(\d+)/Dense_1", sub(rf"{layers}.\1.1.fn.net.4")),
        (rf"{flax}/PreNorm_(\d+)/LayerNorm_0", prenorm_target(layers, "0.fn.norm", "1.fn.net.0")),
    ]


_CAIT_RULES: list[Rule] = [
    ("", const("")),
    ("Dense_0", const("to_patch_embedding.1")),
    ("LayerNorm_0", const("mlp_head.0")),
    ("Dense_1", const("mlp_head.1")),
    *_transformer_rules("Transformer_0", "patch_transformer"),
    *_transformer_rules("Transformer_1", "cls_transformer"),
]


def from_flax(params: Mapping) -> dict[str, Tensor]:
    """State dict for :class:`CaiT` from a ViT-flax ``CaiT`` parameter tree (nested dicts of arrays).

    The flax model must have been built with ``layer_dropout=0`` (with layer dropout the flax code
    deletes layers, and its tree no longer says which layers are left).
    """
    layers: dict[str, set[int]] = {}
    for path in flatten_flax(params):
        m = re.match(r"(Transformer_\d+)/Attention_(\d+)/", path)
        if m:
            layers.setdefault(m[1], set()).add(int(m[2]))
    for transformer, found in sorted(layers.items()):
        missing = sorted(set(range(max(found) + 1)) - found)
        if missing:
            raise IncompatibleWeightsError(
                f"CaiT.from_flax: {transformer} has no parameters for layers {missing}: the flax CaiT was built "
                "with layer_dropout > 0, which deletes layers at construction. Use parameters of a flax CaiT "
                "built with layer_dropout=0."
            )
    return convert_flax(params, _CAIT_RULES, "CaiT")

"""CrossViT (Chen et al., "CrossViT: Cross-Attention Multi-Scale Vision Transformer") in PyTorch,
matching ViT-flax's ``CrossViT``.

The model of conceptofmind/ViT-flax ``vit_flax/cross_vit.py``, written fresh in the manner of
lucidrains' vit-pytorch. Two branches embed the image with small and large patches (each with a cls
token and position embeddings). Each of ``depth`` multi-scale blocks runs a transformer per branch
(each ending in a LayerNorm) and then ``cross_attn_depth`` rounds of cross attention: a branch's cls
token is projected to the other branch's width, attends to ``cat[norm(cls), other branch's patches]``
there, and is projected back (residual). The logits are the sum of both branches' heads
(LayerNorm + Linear on the cls token). LayerNorms are bias-free with eps 1e-5; GELU is tanh-approximated.

Input ``[B, C, H, W]``, logits ``[B, num_classes]``. Differences from the flax module: dropout and
``emb_dropout`` act in train mode only; other image sizes (multiples of both patch sizes) use
bicubically resized position embeddings; ``channels`` is a keyword argument; cls tokens and position
embeddings start as truncated normals (flax: zeros).
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F
from einops import rearrange
from einops.layers.torch import Rearrange
from spandrel.util import store_hyperparameters
from torch import Tensor, nn

from .vit import FeedForward, Rule, check_image, const, convert_flax, init_token_, pair, resize_pos_grid

# classes


class Attention(nn.Module):
    """Pre-norm multi-head attention on ``[B, N, dim]``; keys/values from ``context`` (default: the
    normed ``x``), prefixed by the normed ``x`` itself when ``kv_include_self``."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0):
        super().__init__()
        inner_dim = dim_head * heads
        self.heads = heads
        self.scale = dim_head**-0.5
        self.norm = nn.LayerNorm(dim, eps=1e-5, bias=False)
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim, inner_dim * 2, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor, context: Tensor | None = None, kv_include_self: bool = False) -> Tensor:
        x = self.norm(x)
        context = x if context is None else context
        if kv_include_self:
            context = torch.cat([x, context], dim=1)  # the cls token attends to itself too

        q = self.to_q(x)
        k, v = self.to_kv(context).chunk(2, dim=-1)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class Transformer(nn.Module):
    """``depth`` pre-norm blocks, then a final LayerNorm (no bias)."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int, dropout: float = 0.0):
        super().__init__()
        self.layers = nn.ModuleList(
            [
                nn.ModuleList([Attention(dim, heads, dim_head, dropout), FeedForward(dim, mlp_dim, dropout, eps=1e-5, norm_bias=False)])
                for _ in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(dim, eps=1e-5, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return self.norm(x)


class ProjectInOut(nn.Module):
    """Run ``fn`` at width ``dim_out`` on tokens of width ``dim_in`` (Linear in, ``fn``, Linear out);
    no projections when the widths are equal."""

    def __init__(self, dim_in: int, dim_out: int, fn: nn.Module):
        super().__init__()
        self.fn = fn
        need_projection = dim_in != dim_out
        self.project_in = nn.Linear(dim_in, dim_out) if need_projection else nn.Identity()
        self.project_out = nn.Linear(dim_out, dim_in) if need_projection else nn.Identity()

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        return self.project_out(self.fn(self.project_in(x), *args, **kwargs))


class CrossTransformer(nn.Module):
    """``depth`` rounds of: small cls attends to large patches, large cls attends to small patches."""

    def __init__(self, sm_dim: int, lg_dim: int, depth: int, heads: int, dim_head: int, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList(
            [
                nn.ModuleList(
                    [
                        ProjectInOut(sm_dim, lg_dim, Attention(lg_dim, heads=heads, dim_head=dim_head, dropout=dropout)),
                        ProjectInOut(lg_dim, sm_dim, Attention(sm_dim, heads=heads, dim_head=dim_head, dropout=dropout)),
                    ]
                )
                for _ in range(depth)
            ]
        )

    def forward(self, sm_tokens: Tensor, lg_tokens: Tensor) -> tuple[Tensor, Tensor]:
        (sm_cls, sm_patch_tokens), (lg_cls, lg_patch_tokens) = (
            (t[:, :1], t[:, 1:]) for t in (sm_tokens, lg_tokens)
        )
        for sm_attend_lg, lg_attend_sm in self.layers:
            sm_cls = sm_attend_lg(sm_cls, context=lg_patch_tokens, kv_include_self=True) + sm_cls
            lg_cls = lg_attend_sm(lg_cls, context=sm_patch_tokens, kv_include_self=True) + lg_cls
        return torch.cat([sm_cls, sm_patch_tokens], dim=1), torch.cat([lg_cls, lg_patch_tokens], dim=1)


class MultiScaleEncoder(nn.Module):
    """``depth`` blocks of [small-branch transformer, large-branch transformer, cross transformer]."""

    def __init__(
        self,
        *,
        depth: int,
        sm_dim: int,
        lg_dim: int,
        sm_enc_params: dict,
        lg_enc_params: dict,
        cross_attn_heads: int,
        cross_attn_depth: int,
        cross_attn_dim_head: int = 64,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.layers = nn.ModuleList(
            [
                nn.ModuleList(
                    [
                        Transformer(dim=sm_dim, dropout=dropout, **sm_enc_params),
                        Transformer(dim=lg_dim, dropout=dropout, **lg_enc_params),
                        CrossTransformer(
                            sm_dim=sm_dim,
                            lg_dim=lg_dim,
                            depth=cross_attn_depth,
                            heads=cross_attn_heads,
                            dim_head=cross_attn_dim_head,
                            dropout=dropout,
                        ),
                    ]
                )
                for _ in range(depth)
            ]
        )

    def forward(self, sm_tokens: Tensor, lg_tokens: Tensor) -> tuple[Tensor, Tensor]:
        for sm_enc, lg_enc, cross_attend in self.layers:
            sm_tokens, lg_tokens = sm_enc(sm_tokens), lg_enc(lg_tokens)
            sm_tokens, lg_tokens = cross_attend(sm_tokens, lg_tokens)
        return sm_tokens, lg_tokens


class ImageEmbedder(nn.Module):
    """``[B, C, H, W]`` -> tokens ``[B, 1 + N, dim]``: patches ``(p1 p2 c)`` through a Linear, a cls token
    in front, position embeddings added (resized bicubically for other grids), dropout."""

    def __init__(self, *, dim: int, image_size: tuple[int, int], patch_size: int, channels: int = 3, dropout: float = 0.0):
        super().__init__()
        self.grid = (image_size[0] // patch_size, image_size[1] // patch_size)
        self.patch_size = patch_size
        num_patches = self.grid[0] * self.grid[1]
        patch_dim = channels * patch_size**2
        self.to_patch_embedding = nn.Sequential(
            Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch_size, p2=patch_size),
            nn.Linear(patch_dim, dim),
        )
        self.pos_embedding = nn.Parameter(init_token_(torch.empty(1, num_patches + 1, dim)))
        self.cls_token = nn.Parameter(init_token_(torch.empty(1, 1, dim)))
        self.dropout = nn.Dropout(dropout)

    def forward(self, img: Tensor) -> Tensor:
        grid = (img.shape[-2] // self.patch_size, img.shape[-1] // self.patch_size)
        x = self.to_patch_embedding(img)
        cls_tokens = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls_tokens, x], dim=1)
        pos = self.pos_embedding
        pos = torch.cat([pos[:, :1], resize_pos_grid(pos[:, 1:], self.grid, grid)], dim=1)
        return self.dropout(x + pos)


@store_hyperparameters()
class CrossViT(nn.Module):
    """CrossViT classifier: ``[B, channels, H, W]`` -> logits ``[B, num_classes]``.

    Arguments and defaults are ViT-flax's (``dropout`` and ``emb_dropout`` default to 0.1 there too);
    ``channels`` is added. H and W must be multiples of both patch sizes.
    """

    def __init__(
        self,
        *,
        image_size: int | tuple[int, int],
        num_classes: int,
        sm_dim: int,
        lg_dim: int,
        sm_patch_size: int = 12,
        sm_enc_depth: int = 1,
        sm_enc_heads: int = 8,
        sm_enc_mlp_dim: int = 2048,
        sm_enc_dim_head: int = 64,
        lg_patch_size: int = 16,
        lg_enc_depth: int = 4,
        lg_enc_heads: int = 8,
        lg_enc_mlp_dim: int = 2048,
        lg_enc_dim_head: int = 64,
        cross_attn_depth: int = 2,
        cross_attn_heads: int = 8,
        cross_attn_dim_head: int = 64,
        depth: int = 3,
        dropout: float = 0.1,
        emb_dropout: float = 0.1,
        channels: int = 3,
    ):
        super().__init__()
        size = pair(image_size)
        for name, p in (("sm_patch_size", sm_patch_size), ("lg_patch_size", lg_patch_size)):
            if size[0] % p or size[1] % p:
                raise ValueError(f"CrossViT: image dimensions {size[0]}x{size[1]} must be divisible by {name}={p}.")
        self.channels = channels
        self.size_multiple = math.lcm(sm_patch_size, lg_patch_size)

        self.sm_image_embedder = ImageEmbedder(
            dim=sm_dim, image_size=size, patch_size=sm_patch_size, channels=channels, dropout=emb_dropout
        )
        self.lg_image_embedder = ImageEmbedder(
            dim=lg_dim, image_size=size, patch_size=lg_patch_size, channels=channels, dropout=emb_dropout
        )

        self.multi_scale_encoder = MultiScaleEncoder(
            depth=depth,
            sm_dim=sm_dim,
            lg_dim=lg_dim,
            cross_attn_heads=cross_attn_heads,
            cross_attn_dim_head=cross_attn_dim_head,
            cross_attn_depth=cross_attn_depth,
            sm_enc_params=dict(depth=sm_enc_depth, heads=sm_enc_heads, mlp_dim=sm_enc_mlp_dim, dim_head=sm_enc_dim_head),
            lg_enc_params=dict(depth=lg_enc_depth, heads=lg_enc_heads, mlp_dim=lg_enc_mlp_dim, dim_head=lg_enc_dim_head),
            dropout=dropout,
        )

        self.sm_mlp_head = nn.Sequential(nn.LayerNorm(sm_dim, eps=1e-5, bias=False), nn.Linear(sm_dim, num_classes))
        self.lg_mlp_head = nn.Sequential(nn.LayerNorm(lg_dim, eps=1e-5, bias=False), nn.Linear(lg_dim, num_classes))

    def forward(self, img: Tensor) -> Tensor:
        m = self.size_multiple
        check_image(img, channels=self.channels, multiple=(m, m), model="CrossViT")

        sm_tokens = self.sm_image_embedder(img)
        lg_tokens = self.lg_image_embedder(img)

        sm_tokens, lg_tokens = self.multi_scale_encoder(sm_tokens, lg_tokens)

        sm_cls, lg_cls = sm_tokens[:, 0], lg_tokens[:, 0]
        return self.sm_mlp_head(sm_cls) + self.lg_mlp_head(lg_cls)


# ViT-flax parameter trees -> state dicts


_ENC = r"MultiScaleEncoder_0/Transformer_(?P<t>\d+)"
_CROSS = r"MultiScaleEncoder_0/CrossTransformer_(?P<c>\d+)"


def _enc(m) -> str:
    """flax ``Transformer_{t}``: even t = small branch, odd t = large branch of multi-scale block t//2."""
    t = int(m["t"])
    return f"multi_scale_encoder.layers.{t // 2}.{t % 2}"


def _enc_prenorm(m) -> str:
    n = int(m["n"])  # PreNorm_{n}: even n = attention of layer n//2, odd n = its MLP
    return f"{_enc(m)}.layers.{n // 2}.{'0.norm' if n % 2 == 0 else '1.net.0'}"


def _cross(m) -> str:
    """flax ``CrossTransformer_{c}/*_{n}``: round n//2; n even = small cls attends large, odd = reverse."""
    n = int(m["n"])
    return f"multi_scale_encoder.layers.{m['c']}.2.layers.{n // 2}.{n % 2}"


_CROSS_VIT_RULES: list[Rule] = [
    ("ImageEmbedder_0", const("sm_image_embedder")),
    ("ImageEmbedder_1", const("lg_image_embedder")),
    ("ImageEmbedder_0/Dense_0", const("sm_image_embedder.to_patch_embedding.1")),
    ("ImageEmbedder_1/Dense_0", const("lg_image_embedder.to_patch_embedding.1")),
    ("LayerNorm_0", const("sm_mlp_head.0")),
    ("Dense_0", const("sm_mlp_head.1")),
    ("LayerNorm_1", const("lg_mlp_head.0")),
    ("Dense_1", const("lg_mlp_head.1")),
    (_ENC + r"/Attention_(?P<i>\d+)/Dense_0", lambda m: f"{_enc(m)}.layers.{m['i']}.0.to_q"),
    (_ENC + r"/Attention_(?P<i>\d+)/Dense_1", lambda m: f"{_enc(m)}.layers.{m['i']}.0.to_kv"),
    (_ENC + r"/Attention_(?P<i>\d+)/Dense_2", lambda m: f"{_enc(m)}.layers.{m['i']}.0.to_out.0"),
    (_ENC + r"/FeedForward_(?P<i>\d+)/Dense_0", lambda m: f"{_enc(m)}.layers.{m['i']}.1.net.1"),
    (_ENC + r"/FeedForward_(?P<i>\d+)/Dense_1", lambda m: f"{_enc(m)}.layers.{m['i']}.1.net.4"),
    (_ENC + r"/PreNorm_(?P<n>\d+)/LayerNorm_0", _enc_prenorm),
    (_ENC + r"/LayerNorm_0", lambda m: f"{_enc(m)}.norm"),
    (_CROSS + r"/Attention_(?P<n>\d+)/Dense_0", lambda m: f"{_cross(m)}.fn.to_q"),
    (_CROSS + r"/Attention_(?P<n>\d+)/Dense_1", lambda m: f"{_cross(m)}.fn.to_kv"),
    (_CROSS + r"/Attention_(?P<n>\d+)/Dense_2", lambda m: f"{_cross(m)}.fn.to_out.0"),
    (_CROSS + r"/PreNorm_(?P<n>\d+)/LayerNorm_0", lambda m: f"{_cross(m)}.fn.norm"),
    (_CROSS + r"/ProjectInOut_(?P<n>\d+)/Dense_0", lambda m: f"{_cross(m)}.project_in"),
    (_CROSS + r"/ProjectInOut_(?P<n>\d+)/Dense_1", lambda m: f"{_cross(m)}.project_out"),
]


def from_flax(params: Mapping) -> dict[str, Tensor]:
    """State dict for :class:`CrossViT` from a ViT-flax ``CrossViT`` parameter tree (nested dicts of arrays)."""
    return convert_flax(params, _CROSS_VIT_RULES, "CrossViT")

"""ViT (Dosovitskiy et al., "An Image is Worth 16x16 Words") in PyTorch, matching ViT-flax's ``ViT``.

The model of conceptofmind/ViT-flax ``vit_flax/vit.py``, written fresh in the manner of lucidrains'
vit-pytorch: patches of ``(p1 p2 c)`` through one Linear, a zero-position cls token, pre-norm
transformer blocks (LayerNorm eps 1e-6, tanh-approximated GELU, as flax computes them), no final
encoder norm, head = LayerNorm + Linear. Input ``[B, C, H, W]`` (any value range: it is a classifier),
output logits ``[B, num_classes]``.

Differences from the flax module, all outside the function it computes on its own image size:

* dropout and ``emb_dropout`` act in train mode only (flax applies them on every call);
* other image sizes (multiples of the patch size) work: the position embedding of the patch grid is
  resized bicubically to the new grid (flax slices the first ``n + 1`` rows, or fails);
* ``dim_head`` and ``channels`` are keyword arguments (flax fixes ``dim_head = 64`` and reads the channel
  count from the input);
* initialisation: truncated-normal (std 0.02) cls token and position embedding instead of zeros.

:func:`from_flax` turns a flax parameter tree into this model's state dict. The small helpers at the
bottom (flattening flax trees, converting Dense and Conv kernels, checking images, resizing position
embeddings) are shared with :mod:`.cait`, :mod:`.cross_vit` and :mod:`.crossformer`.
"""

from __future__ import annotations

import math
import re
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from einops.layers.torch import Rearrange
from spandrel.util import store_hyperparameters
from torch import Tensor, nn

from .errors import BadImageError, IncompatibleWeightsError

# helpers


def pair(t: int | Sequence[int]) -> tuple[int, int]:
    """``7 -> (7, 7)``; a pair stays a pair (as a tuple)."""
    if isinstance(t, (tuple, list)):
        if len(t) != 2:
            raise ValueError(f"expected an int or a pair of ints, got {t!r}")
        return int(t[0]), int(t[1])
    return int(t), int(t)


def check_image(x: Tensor, *, channels: int, multiple: tuple[int, int], model: str) -> tuple[int, int]:
    """Check ``x`` is ``[B, channels, H, W]`` with H, W multiples of ``multiple``; return ``(H, W)``.

    Raises :class:`~archs.errors.BadImageError` with a message that says what to change.
    """
    if x.ndim != 4:
        raise BadImageError(f"{model} expects an image batch [B, C, H, W]; got a tensor of shape {tuple(x.shape)}.")
    if x.shape[1] != channels:
        raise BadImageError(
            f"{model} was built for {channels}-channel images but got {x.shape[1]} channels "
            f"(shape {tuple(x.shape)}); convert the image or build the model with channels={x.shape[1]}."
        )
    h, w = x.shape[-2:]
    mh, mw = multiple
    if h == 0 or w == 0 or h % mh or w % mw:
        fix_h, fix_w = max(mh, math.ceil(h / mh) * mh), max(mw, math.ceil(w / mw) * mw)
        raise BadImageError(
            f"{model} needs the height to be a multiple of {mh} and the width a multiple of {mw} "
            f"(its patch size); got {h}x{w}. Pad or crop the image, e.g. to {fix_h}x{fix_w}."
        )
    return h, w


def resize_pos_grid(pos: Tensor, src: tuple[int, int], dst: tuple[int, int]) -> Tensor:
    """Position embeddings of a patch grid ``[1, src_h*src_w, D]`` -> ``[1, dst_h*dst_w, D]``, bicubic.

    Returns ``pos`` itself when the grids are equal, so the native size computes exactly the reference.
    """
    if tuple(src) == tuple(dst):
        return pos
    grid = rearrange(pos, "b (h w) d -> b d h w", h=src[0], w=src[1])
    grid = F.interpolate(grid, size=tuple(dst), mode="bicubic", align_corners=False)
    return rearrange(grid, "b d h w -> b (h w) d")


def init_token_(t: Tensor) -> Tensor:
    """Initialise a learned token / position embedding in place (truncated normal, std 0.02)."""
    return nn.init.trunc_normal_(t, std=0.02, a=-0.04, b=0.04)


# classes


class FeedForward(nn.Module):
    """Pre-norm MLP on tokens ``[B, N, dim]``: LayerNorm, Linear, GELU (tanh), Dropout, Linear, Dropout.

    ViT's norm has eps 1e-6 and a bias; CaiT's and CrossViT's (``eps=1e-5, norm_bias=False``) have none.
    """

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0, eps: float = 1e-6, norm_bias: bool = True):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(dim, eps=eps, bias=norm_bias),
            nn.Linear(dim, hidden_dim),
            nn.GELU(approximate="tanh"),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, dim),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Attention(nn.Module):
    """Pre-norm multi-head self-attention on tokens ``[B, N, dim]``; fused bias-free ``to_qkv``.

    The output projection (and its dropout) is left out when ``heads == 1 and dim_head == dim``.
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0):
        super().__init__()
        inner_dim = dim_head * heads
        project_out = not (heads == 1 and dim_head == dim)
        self.heads = heads
        self.scale = dim_head**-0.5
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.to_qkv = nn.Linear(dim, inner_dim * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, dim), nn.Dropout(dropout)) if project_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(x)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in self.to_qkv(x).chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class Transformer(nn.Module):
    """``depth`` blocks of ``x = attn(x) + x; x = ff(x) + x``; no final norm (as in ViT-flax)."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int, dropout: float = 0.0):
        super().__init__()
        self.layers = nn.ModuleList(
            [
                nn.ModuleList([Attention(dim, heads, dim_head, dropout), FeedForward(dim, mlp_dim, dropout)])
                for _ in range(depth)
            ]
        )

    def forward(self, x: Tensor) -> Tensor:
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return x


@store_hyperparameters()
class ViT(nn.Module):
    """Vision Transformer classifier: ``[B, channels, H, W]`` -> logits ``[B, num_classes]``.

    Arguments and defaults are ViT-flax's (``image_size`` and ``patch_size`` may be pairs ``(h, w)``);
    ``dim_head`` and ``channels`` are added. H and W must be multiples of the patch size; sizes other
    than ``image_size`` use bicubically resized position embeddings.
    """

    def __init__(
        self,
        *,
        image_size: int | tuple[int, int],
        patch_size: int | tuple[int, int],
        num_classes: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_dim: int,
        pool: str = "cls",
        dim_head: int = 64,
        dropout: float = 0.0,
        emb_dropout: float = 0.0,
        channels: int = 3,
    ):
        super().__init__()
        image_height, image_width = pair(image_size)
        patch_height, patch_width = pair(patch_size)
        if image_height % patch_height or image_width % patch_width:
            raise ValueError(
                f"ViT: image_size {image_height}x{image_width} must be divisible by patch_size "
                f"{patch_height}x{patch_width}."
            )
        if pool not in {"cls", "mean"}:
            raise ValueError(f"ViT: pool must be 'cls' (cls token) or 'mean' (mean pooling), got {pool!r}.")

        self.channels = channels
        self.patch_size = (patch_height, patch_width)
        self.grid = (image_height // patch_height, image_width // patch_width)
        num_patches = self.grid[0] * self.grid[1]
        patch_dim = channels * patch_height * patch_width

        self.to_patch_embedding = nn.Sequential(
            Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch_height, p2=patch_width),
            nn.Linear(patch_dim, dim),
        )
        self.pos_embedding = nn.Parameter(init_token_(torch.empty(1, num_patches + 1, dim)))
        self.cls_token = nn.Parameter(init_token_(torch.empty(1, 1, dim)))
        self.dropout = nn.Dropout(emb_dropout)

        self.transformer = Transformer(dim, depth, heads, dim_head, mlp_dim, dropout)

        self.pool = pool
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, num_classes))

    def pos_embedding_for(self, grid: tuple[int, int]) -> Tensor:
        """Position embeddings ``[1, 1 + gh*gw, dim]`` for a patch grid ``(gh, gw)``."""
        cls_pos, patch_pos = self.pos_embedding[:, :1], self.pos_embedding[:, 1:]
        return torch.cat([cls_pos, resize_pos_grid(patch_pos, self.grid, grid)], dim=1)

    def forward(self, img: Tensor) -> Tensor:
        h, w = check_image(img, channels=self.channels, multiple=self.patch_size, model="ViT")
        grid = (h // self.patch_size[0], w // self.patch_size[1])

        x = self.to_patch_embedding(img)
        cls_tokens = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls_tokens, x], dim=1)
        x = x + self.pos_embedding_for(grid)
        x = self.dropout(x)

        x = self.transformer(x)

        x = x.mean(dim=1) if self.pool == "mean" else x[:, 0]
        return self.mlp_head(x)


# ViT-flax parameter trees -> state dicts (shared by the family)

Rule = tuple[str, Callable[[re.Match], str]]


def flatten_flax(params: Mapping) -> dict[str, np.ndarray]:
    """A flax parameter tree (nested dicts, as ``flax.serialization.to_state_dict`` gives) as
    ``{"Transformer_0/Attention_0/Dense_0/kernel": array}``. A ``{"params": ...}`` wrapper is unwrapped."""
    if isinstance(params, Mapping) and set(params) == {"params"}:
        params = params["params"]
    flat: dict[str, np.ndarray] = {}

    def walk(node: Mapping, prefix: str) -> None:
        for key, value in node.items():
            path = f"{prefix}/{key}" if prefix else str(key)
            if isinstance(value, Mapping):
                walk(value, path)
            else:
                flat[path] = np.asarray(value)

    walk(params, "")
    return flat


_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias", "cls": "cls_token"}


def convert_flax_leaf(leaf: str, value: np.ndarray) -> tuple[str, Tensor]:
    """Torch name and tensor of one flax leaf: Dense kernels (in, out) -> (out, in), Conv kernels
    (kh, kw, in, out) -> (out, in, kh, kw), channel-norm ``g``/``b`` (1, 1, 1, d) -> (1, d, 1, 1)."""
    t = torch.from_numpy(np.array(value, dtype=np.float32))
    if leaf == "kernel":
        t = t.t() if t.ndim == 2 else t.permute(3, 2, 0, 1)
    elif leaf in ("g", "b") and t.ndim == 4:
        t = t.permute(0, 3, 1, 2)
    return _LEAF_NAMES.get(leaf, leaf), t.contiguous()


def convert_flax(params: Mapping, rules: Sequence[Rule], model: str) -> dict[str, Tensor]:
    """Apply ``rules`` (regex on the flax module path -> torch module path) to every leaf of ``params``."""
    state: dict[str, Tensor] = {}
    for path, value in flatten_flax(params).items():
        module, _, leaf = path.rpartition("/")
        for pattern, target in rules:
            match = re.fullmatch(pattern, module)
            if match:
                break
        else:
            raise IncompatibleWeightsError(
                f"{model}.from_flax: the flax parameter {path!r} has no counterpart in the PyTorch {model}; "
                f"pass the parameters of a ViT-flax {model} (vit_flax at commit d66b131)."
            )
        name, tensor = convert_flax_leaf(leaf, value)
        prefix = target(match)
        state[f"{prefix}.{name}" if prefix else name] = tensor
    return state


def prenorm_target(prefix: str, attn_norm: str, ff_norm: str) -> Callable[[re.Match], str]:
    """flax ``PreNorm_{n}`` inside a Transformer: even n wraps layer n//2's attention, odd n its MLP."""

    def target(m: re.Match) -> str:
        n = int(m.group(1))
        return f"{prefix}.{n // 2}.{attn_norm if n % 2 == 0 else ff_norm}"

    return target


def const(name: str) -> Callable[[re.Match], str]:
    return lambda m: name


def sub(template: str) -> Callable[[re.Match], str]:
    return lambda m: m.expand(template)


_VIT_RULES: list[Rule] = [
    ("", const("")),
    ("Dense_0", const("to_patch_embedding.1")),
    ("LayerNorm_0", const("mlp_head.0")),
    ("Dense_1", const("mlp_head.1")),
    (r"Transformer_0/Attention_(\d+)/Dense_0", sub(r"transformer.layers.\1.0.to_qkv")),
    (r"Transformer_0/Attention_(\d+)/Dense_1", sub(r"transformer.layers.\1.0.to_out.0")),
    (r"Transformer_0/FeedForward_(\d+)/Dense_0", sub(r"transformer.layers.\1.1.net.1")),
    (r"Transformer_0/FeedForward_(\d+)/Dense_1", sub(r"transformer.layers.\1.1.net.4")),
    (r"Transformer_0/PreNorm_(\d+)/LayerNorm_0", prenorm_target("transformer.layers", "0.norm", "1.net.0")),
]


def from_flax(params: Mapping) -> dict[str, Tensor]:
    """State dict for :class:`ViT` from a ViT-flax ``ViT`` parameter tree (nested dicts of arrays).

    ``model.load_state_dict(from_flax(params))`` then gives the flax model's logits (flax input is
    NHWC; give this model the same image as ``[B, C, H, W]``).
    """
    return convert_flax(params, _VIT_RULES, "ViT")

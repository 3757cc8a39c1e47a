"""CrossFormer (Wang et al., "CrossFormer: A Versatile Vision Transformer Hinging on Cross-scale
Attention") in PyTorch, matching ViT-flax's ``CrossFormer``.

The model of conceptofmind/ViT-flax ``vit_flax/crossformer.py``, written fresh in the manner of
lucidrains' vit-pytorch, on ``[B, C, H, W]`` maps. Four stages, each a cross-scale embedding (convs of
several kernel sizes, sorted ascending, same stride, SAME padding as flax/TensorFlow pads, outputs
concatenated with channel split ``[dim/2, dim/4, ..., rest]``: the smallest kernel gets the most) and a
transformer of ``depth`` blocks ``[short-distance attention, MLP, long-distance attention, MLP]``
(each residual). Short-distance attention works in local ``w x w`` windows ``b (h s1) (w s2)``,
long-distance attention on dilated groups ``b (l1 h) (l2 w)``. Heads = ``dim // dim_head``; q/k/v from
a bias-free 1x1 conv; one dynamic position bias per attention (an MLP over offsets ``-w..w``, shared
by the heads) indexed as ``(dy + w - 1) * (2w - 1) + (dx + w - 1)`` - a stride that does not match
the table's row length ``2w + 1``; ViT-flax does this, and so do we, so its weights give its logits.
Channel LayerNorms use the population variance with eps 1e-5; the position-bias MLP's LayerNorms are
bias-free (eps 1e-5); GELU is tanh-approximated. Head: global mean, Linear.

Input ``[B, C, H, W]``, logits ``[B, num_classes]``. H and W must be such that every stage's map is
divisible by its local and global window sizes; multiples of ``size_multiple`` always are (224 for
the defaults). Differences from the flax module: ``ff_dropout`` acts in train mode only;
``attn_dropout`` (accepted but unused by flax) drops attention weights in train mode; ``channels`` and
``dim_head`` (32, flax's fixed value) are keyword arguments.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from einops.layers.torch import Reduce
from spandrel.util import store_hyperparameters
from torch import Tensor, nn

from .errors import BadImageError
from .vit import Rule, const, convert_flax

# helpers


def cast_tuple(val, length: int = 1) -> tuple:
    """``7 -> (7,) * length``; tuples and lists stay as they are (as tuples)."""
    return tuple(val) if isinstance(val, (tuple, list)) else (val,) * length


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(before, after) padding of one axis for TensorFlow/flax ``'SAME'``: output ``ceil(size / stride)``."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


# cross embed layer


class CrossEmbedLayer(nn.Module):
    """Convs of several kernel sizes (sorted ascending), one stride, SAME padding, concatenated:
    ``[B, dim_in, H, W]`` -> ``[B, dim_out, ceil(H/stride), ceil(W/stride)]``."""

    def __init__(self, dim_in: int, dim_out: int, kernel_sizes: Sequence[int], stride: int = 2):
        super().__init__()
        kernel_sizes = sorted(cast_tuple(kernel_sizes))
        num_scales = len(kernel_sizes)
        # the dimension at each scale: dim/2, dim/4, ..., and the rest for the largest kernel
        dim_scales = [int(dim_out / (2**i)) for i in range(1, num_scales)]
        dim_scales = [*dim_scales, dim_out - sum(dim_scales)]
        self.stride = stride
        self.kernel_sizes = tuple(kernel_sizes)
        self.convs = nn.ModuleList(
            [nn.Conv2d(dim_in, dim_scale, kernel, stride=stride) for kernel, dim_scale in zip(kernel_sizes, dim_scales)]
        )

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        fmaps = []
        for kernel, conv in zip(self.kernel_sizes, self.convs):
            top, bottom = same_padding(h, kernel, self.stride)
            left, right = same_padding(w, kernel, self.stride)
            fmaps.append(conv(F.pad(x, (left, right, top, bottom))))
        return torch.cat(fmaps, dim=1)


# dynamic positional bias


class DynamicPositionBias(nn.Module):
    """MLP from a 2-d offset ``[..., 2]`` to a scalar bias ``[...]``: 3x (Linear, LayerNorm, ReLU), Linear."""

    def __init__(self, dim: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(2, dim),
            nn.LayerNorm(dim, eps=1e-5, bias=False),
            nn.ReLU(),
            nn.Linear(dim, dim),
            nn.LayerNorm(dim, eps=1e-5, bias=False),
            nn.ReLU(),
            nn.Linear(dim, dim),
            nn.LayerNorm(dim, eps=1e-5, bias=False),
            nn.ReLU(),
            nn.Linear(dim, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x).squeeze(-1)


def rel_pos_indices(window_size: int, device=None) -> Tensor:
    """``[w*w, w*w]`` indices into the ``(2w+1)**2`` bias table, with ViT-flax's row stride ``2w - 1``."""
    pos = torch.arange(window_size, device=device)
    grid = rearrange(torch.stack(torch.meshgrid(pos, pos, indexing="ij")), "c i j -> (i j) c")
    rel_pos = grid[:, None] - grid[None, :] + (window_size - 1)
    return rel_pos[..., 0] * (2 * window_size - 1) + rel_pos[..., 1]


# transformer classes


class LayerNorm(nn.Module):
    """LayerNorm over the channels of ``[B, C, H, W]`` (population variance), with ``g``, ``b`` ``[1, C, 1, 1]``."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.g = nn.Parameter(torch.ones(1, dim, 1, 1))
        self.b = nn.Parameter(torch.zeros(1, dim, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        var = torch.var(x, dim=1, unbiased=False, keepdim=True)
        mean = torch.mean(x, dim=1, keepdim=True)
        return (x - mean) / (var + self.eps).sqrt() * self.g + self.b


class FeedForward(nn.Module):
    """Pre-norm 1x1-conv MLP: channel LayerNorm, conv (dim -> dim*mult), GELU (tanh), Dropout, conv."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(
            LayerNorm(dim),
            nn.Conv2d(dim, dim * mult, 1),
            nn.GELU(approximate="tanh"),
            nn.Dropout(dropout),
            nn.Conv2d(dim * mult, dim, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Attention(nn.Module):
    """Pre-norm short- (local windows) or long-distance (dilated groups) attention on ``[B, dim, H, W]``."""

    def __init__(self, dim: int, attn_type: str, window_size: int, dim_head: int = 32, dropout: float = 0.0):
        super().__init__()
        if attn_type not in {"short", "long"}:
            raise ValueError(f"CrossFormer: attention type must be 'short' (local) or 'long' (distant), got {attn_type!r}.")
        heads = dim // dim_head
        if heads < 1:
            raise ValueError(f"CrossFormer: stage dim {dim} is smaller than dim_head {dim_head}; heads = dim // dim_head.")
        inner_dim = dim_head * heads
        self.heads = heads
        self.scale = dim_head**-0.5
        self.attn_type = attn_type
        self.window_size = window_size
        self.dropout = dropout

        self.norm = LayerNorm(dim)
        self.to_qkv = nn.Conv2d(dim, inner_dim * 3, 1, bias=False)
        self.to_out = nn.Conv2d(inner_dim, dim, 1)
        self.dpb = DynamicPositionBias(dim // 4)

    def position_bias(self) -> Tensor:
        """The bias ``[w*w, w*w]`` added to every head's scores."""
        wsz = self.window_size
        ref = self.norm.g  # a plain parameter for device and dtype (Linear weights may be parametrized)
        pos = torch.arange(-wsz, wsz + 1, device=ref.device, dtype=ref.dtype)
        rel_pos = rearrange(torch.stack(torch.meshgrid(pos, pos, indexing="ij")), "c i j -> (i j) c")
        biases = self.dpb(rel_pos)
        return biases[rel_pos_indices(wsz, device=ref.device)]

    def forward(self, x: Tensor) -> Tensor:
        _, _, height, width = x.shape
        wsz, heads = self.window_size, self.heads

        x = self.norm(x)
        if self.attn_type == "short":
            x = rearrange(x, "b d (h s1) (w s2) -> (b h w) d s1 s2", s1=wsz, s2=wsz)
        else:
            x = rearrange(x, "b d (l1 h) (l2 w) -> (b h w) d l1 l2", l1=wsz, l2=wsz)

        q, k, v = self.to_qkv(x).chunk(3, dim=1)
        q, k, v = (rearrange(t, "b (h d) x y -> b h (x y) d", h=heads) for t in (q, k, v))

        bias = self.position_bias().to(q.dtype)
        dropout_p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=self.scale)

        out = rearrange(out, "b h (x y) d -> b (h d) x y", x=wsz, y=wsz)
        out = self.to_out(out)

        if self.attn_type == "short":
            return rearrange(out, "(b h w) d s1 s2 -> b d (h s1) (w s2)", h=height // wsz, w=width // wsz)
        return rearrange(out, "(b h w) d l1 l2 -> b d (l1 h) (l2 w)", h=height // wsz, w=width // wsz)


class Transformer(nn.Module):
    """``depth`` blocks of residual [short attention, MLP, long attention, MLP]."""

    def __init__(
        self,
        dim: int,
        *,
        local_window_size: int,
        global_window_size: int,
        depth: int = 4,
        dim_head: int = 32,
        attn_dropout: float = 0.0,
        ff_dropout: float = 0.0,
    ):
        super().__init__()
        self.layers = nn.ModuleList(
            [
                nn.ModuleList(
                    [
                        Attention(dim, attn_type="short", window_size=local_window_size, dim_head=dim_head, dropout=attn_dropout),
                        FeedForward(dim, dropout=ff_dropout),
                        Attention(dim, attn_type="long", window_size=global_window_size, dim_head=dim_head, dropout=attn_dropout),
                        FeedForward(dim, dropout=ff_dropout),
                    ]
                )
                for _ in range(depth)
            ]
        )

    def forward(self, x: Tensor) -> Tensor:
        for short_attn, short_ff, long_attn, long_ff in self.layers:
            x = short_attn(x) + x
            x = short_ff(x) + x
            x = long_attn(x) + x
            x = long_ff(x) + x
        return x


# classes


@store_hyperparameters()
class CrossFormer(nn.Module):
    """CrossFormer classifier: ``[B, channels, H, W]`` -> logits ``[B, num_classes]``.

    Arguments and defaults are ViT-flax's (each per-stage argument may be one value for all four
    stages); ``channels`` and ``dim_head`` are added. See :attr:`size_multiple` for the sizes it takes.
    """

    def __init__(
        self,
        *,
        dim: int | Sequence[int] = (64, 128, 256, 512),
        depth: int | Sequence[int] = (2, 2, 8, 2),
        global_window_size: int | Sequence[int] = (8, 4, 2, 1),
        local_window_size: int | Sequence[int] = 7,
        cross_embed_kernel_sizes: Sequence = ((4, 8, 16, 32), (2, 4), (2, 4), (2, 4)),
        cross_embed_strides: int | Sequence[int] = (4, 2, 2, 2),
        num_classes: int = 1000,
        attn_dropout: float = 0.0,
        ff_dropout: float = 0.0,
        channels: int = 3,
        dim_head: int = 32,
    ):
        super().__init__()
        dim = cast_tuple(dim, 4)
        depth = cast_tuple(depth, 4)
        global_window_size = cast_tuple(global_window_size, 4)
        local_window_size = cast_tuple(local_window_size, 4)
        cross_embed_kernel_sizes = cast_tuple(cross_embed_kernel_sizes, 4)
        cross_embed_strides = cast_tuple(cross_embed_strides, 4)
        for name, value in (
            ("dim", dim),
            ("depth", depth),
            ("global_window_size", global_window_size),
            ("local_window_size", local_window_size),
            ("cross_embed_kernel_sizes", cross_embed_kernel_sizes),
            ("cross_embed_strides", cross_embed_strides),
        ):
            if len(value) != 4:
                raise ValueError(f"CrossFormer: {name} needs one value or four (one per stage), got {value!r}.")

        self.channels = channels
        self.strides = cross_embed_strides
        # the windows each stage's map must be divisible by (none for stages without blocks)
        self.windows = tuple((lw, gw) if d > 0 else (1, 1) for lw, gw, d in zip(local_window_size, global_window_size, depth))
        multiple, total_stride = 1, 1
        for stride, (local, glob) in zip(self.strides, self.windows):
            total_stride *= stride
            multiple = math.lcm(multiple, total_stride * math.lcm(local, glob))
        #: H and W that are multiples of this always work (other sizes may too).
        self.size_multiple = multiple

        dims = (channels, *dim)
        self.layers = nn.ModuleList(
            [
                nn.ModuleList(
                    [
                        CrossEmbedLayer(dim_in, dim_out, cel_kernel_sizes, stride=cel_stride),
                        Transformer(
                            dim_out,
                            local_window_size=local_wsz,
                            global_window_size=global_wsz,
                            depth=layers,
                            dim_head=dim_head,
                            attn_dropout=attn_dropout,
                            ff_dropout=ff_dropout,
                        ),
                    ]
                )
                for dim_in, dim_out, layers, global_wsz, local_wsz, cel_kernel_sizes, cel_stride in zip(
                    dims[:-1], dims[1:], depth, global_window_size, local_window_size, cross_embed_kernel_sizes, cross_embed_strides
                )
            ]
        )

        self.to_logits = nn.Sequential(Reduce("b c h w -> b c", "mean"), nn.Linear(dim[-1], num_classes))

    def check_size(self, height: int, width: int) -> None:
        """Raise :class:`~archs.errors.BadImageError` unless every stage's map fits its windows."""
        if height < 1 or width < 1:
            raise BadImageError(f"CrossFormer cannot take an empty {height}x{width} image.")
        h, w = height, width
        for stage, (stride, (local, glob)) in enumerate(zip(self.strides, self.windows), start=1):
            h, w = -(-h // stride), -(-w // stride)
            for kind, wsz in (("local", local), ("global", glob)):
                if h % wsz or w % wsz:
                    m = self.size_multiple
                    fix_h, fix_w = max(m, math.ceil(height / m) * m), max(m, math.ceil(width / m) * m)
                    raise BadImageError(
                        f"CrossFormer cannot take a {height}x{width} image: stage {stage} works on a {h}x{w} map, "
                        f"which its {kind} window size {wsz} must divide. Use sizes that are multiples of "
                        f"{m} (pad or crop, e.g. to {fix_h}x{fix_w})."
                    )

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4:
            raise BadImageError(f"CrossFormer expects an image batch [B, C, H, W]; got a tensor of shape {tuple(x.shape)}.")
        if x.shape[1] != self.channels:
            raise BadImageError(
                f"CrossFormer was built for {self.channels}-channel images but got {x.shape[1]} channels "
                f"(shape {tuple(x.shape)}); convert the image or build the model with channels={x.shape[1]}."
            )
        self.check_size(*x.shape[-2:])

        for cel, transformer in self.layers:
            x = cel(x)
            x = transformer(x)
        return self.to_logits(x)


# ViT-flax parameter trees -> state dicts


def _attention(m) -> str:
    n = int(m["n"])  # Attention_{n}: even n = short attention of block n//2, odd n = long attention
    return f"layers.{m['s']}.1.layers.{n // 2}.{2 * (n % 2)}"


def _mlp(m) -> str:
    n = int(m["n"])  # MLP_{n}: even n = MLP after the short attention of block n//2, odd n = after the long one
    return f"layers.{m['s']}.1.layers.{n // 2}.{2 * (n % 2) + 1}"


_STAGE = r"Transformer_(?P<s>\d+)"

_CROSSFORMER_RULES: list[Rule] = [
    (r"CrossEmbedLayer_(?P<s>\d+)/Conv_(?P<j>\d+)", lambda m: f"layers.{m['s']}.0.convs.{m['j']}"),
    ("Dense_0", const("to_logits.1")),
    (_STAGE + r"/Attention_(?P<n>\d+)/LayerNorm_0", lambda m: f"{_attention(m)}.norm"),
    (_STAGE + r"/Attention_(?P<n>\d+)/Conv_0", lambda m: f"{_attention(m)}.to_qkv"),
    (_STAGE + r"/Attention_(?P<n>\d+)/Conv_1", lambda m: f"{_attention(m)}.to_out"),
    (
        _STAGE + r"/Attention_(?P<n>\d+)/DynamicPositionBias_0/Dense_(?P<k>\d+)",
        lambda m: f"{_attention(m)}.dpb.layers.{3 * int(m['k'])}",
    ),
    (
        _STAGE + r"/Attention_(?P<n>\d+)/DynamicPositionBias_0/LayerNorm_(?P<k>\d+)",
        lambda m: f"{_attention(m)}.dpb.layers.{3 * int(m['k']) + 1}",
    ),
    (_STAGE + r"/MLP_(?P<n>\d+)/LayerNorm_0", lambda m: f"{_mlp(m)}.net.0"),
    (_STAGE + r"/MLP_(?P<n>\d+)/Conv_0", lambda m: f"{_mlp(m)}.net.1"),
    (_STAGE + r"/MLP_(?P<n>\d+)/Conv_1", lambda m: f"{_mlp(m)}.net.4"),
]


def from_flax(params: Mapping) -> dict[str, Tensor]:
    """State dict for :class:`CrossFormer` from a ViT-flax ``CrossFormer`` parameter tree (nested dicts of arrays)."""
    return convert_flax(params, _CROSSFORMER_RULES, "CrossFormer")

"""LMLT: Low-to-high Multi-Level Vision Transformer for lightweight SR (jwgdmkj/LMLT, ``LMLT.py``).

Module and parameter names follow the reference, so its published checkpoints load with strict key
matching. Two things differ from the reference, both without changing its numbers where it is right:

* The reference reflect-pads the input to a multiple of 64 but crops the *features* back to the input
  size before the reconstruction conv, whose 3x3 kernel then sees zeros beyond the last row and column:
  the last ``scale`` output rows and columns of every input that is not a multiple of 64 come out wrong.
  Here the whole network runs on the padded input and only the output is cropped, so the result equals
  the crop of the model's own output on the padded input. Inputs down to 1x1 work.
* The window size is a parameter (the reference hard-codes 8); the padding unit follows it.

In eval mode without autograd (``torch.no_grad()`` / ``torch.inference_mode()``) the network runs its
inference form: one channels-last buffer updated in place by every block, each level pooled from the
one above, the ``aggr`` 1x1 conv applied per level at that level's resolution, oneDNN matmuls
(:func:`archs.blocks.fast_linear`). Same numbers to float rounding (~1e-6); training is unchanged.

Presets (8 blocks, ``ffn_scale`` 2): :func:`LMLT_tiny` (dim 36), :func:`LMLT_base` (60),
:func:`LMLT_large` (84).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from spandrel import ImageModelDescriptor
from spandrel.util import KeyCondition, get_seq_len, store_hyperparameters
from torch import Tensor, nn

from .blocks import fast_linear, pad_to_multiple, window_partition, window_reverse
from .errors import IncompatibleWeightsError
from .reparam import inference_path
from .registry import FlexSRArchitecture

#: Number of resolution levels in each LHSB (fixed in the reference): the channels are split in this many chunks.
N_LEVELS = 4


class LayerNorm(nn.Module):
    """Layer norm over the channels of ``[B, C, H, W]`` (eps 1e-6); statistics in float32 for half inputs."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        if dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        x = self.weight[:, None, None] * x + self.bias[:, None, None]
        return x.to(dtype)


class CCM(nn.Module):
    """Convolutional channel mixer: conv3 ``dim -> int(dim*growth_rate)``, GELU, conv1 back to ``dim``."""

    def __init__(self, dim: int, growth_rate: float = 2.0):
        super().__init__()
        hidden = int(dim * growth_rate)
        self.ccm = nn.Sequential(nn.Conv2d(dim, hidden, 3, 1, 1), nn.GELU(), nn.Conv2d(hidden, dim, 1, 1, 0))

    def forward(self, x: Tensor) -> Tensor:
        return self.ccm(x)


class WindowAttention(nn.Module):
    """Single-head attention inside non-overlapping windows, plus a LePE term (the reference's ``downsample_vit``).

    ``[B, dim, H, W]`` (H, W multiples of ``window_size``) -> same shape. Per window:
    ``proj(softmax(q kᵀ / sqrt(dim)) v + get_v(v))``, where ``get_v`` is a depthwise 3x3 conv applied to
    ``v`` laid out as a ``window_size x window_size`` image (zero padding at the window's edges).
    """

    def __init__(self, dim: int, window_size: int = 8, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.window_size = window_size
        self.scale = dim**-0.5
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.get_v = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        ws = self.window_size
        q, k, v = self.qkv(window_partition(x, ws)).chunk(3, dim=-1)  # each [B*nW, ws*ws, dim]
        lepe = self.get_v(rearrange(v, "n (wh ww) c -> n c wh ww", wh=ws))
        lepe = rearrange(lepe, "n c wh ww -> n (wh ww) c")
        drop = self.attn_drop if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, scale=self.scale) + lepe
        out = self.proj_drop(self.proj(out))
        return window_reverse(out, ws, h, w)

    def forward_tokens(self, x: Tensor) -> Tensor:
        """Inference form on a channels-last map ``[B, H, W, dim]`` (contiguous) -> the same layout."""
        b, h, w, c = x.shape
        ws = self.window_size
        nh, nw = h // ws, w // ws
        windows = x.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(-1, ws * ws, c)
        q, k, v = fast_linear(windows, self.qkv.weight, self.qkv.bias).split(c, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        lepe = F.conv2d(v.unflatten(1, (ws, ws)).permute(0, 3, 1, 2), self.get_v.weight, self.get_v.bias,
                        padding=1, groups=c)  # [n, c, ws, ws], zero padding at each window's edges
        out += lepe.flatten(2).transpose(1, 2)
        out = fast_linear(out, self.proj.weight, self.proj.bias)
        return out.view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, h, w, c)


class LHSB(nn.Module):
    """Low-to-high hierarchical self-attention block on ``[B, dim, H, W]``.

    The channels are split into ``N_LEVELS`` chunks; chunk ``i`` is max-pooled by ``2**i``. From the
    coarsest level to the finest, each level runs window attention on its chunk plus the nearest-×2
    upsampled result of the level below; all results are resized (nearest) to ``H x W``, concatenated
    coarsest first, mixed by the 1x1 ``aggr`` conv, and gate the input: ``GELU(aggr(·)) * x``.
    H and W must be multiples of ``window_size * 2**(N_LEVELS-1)``.
    """

    def __init__(self, dim: int, window_size: int = 8, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % N_LEVELS:
            raise ValueError(f"LMLT needs dim divisible by {N_LEVELS} (one chunk per level), got dim={dim}.")
        chunk = dim // N_LEVELS
        self.mfr = nn.ModuleList(
            WindowAttention(chunk, window_size, attn_drop=attn_drop, proj_drop=proj_drop) for _ in range(N_LEVELS)
        )
        self.aggr = nn.Conv2d(dim, dim, 1, 1, 0)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        chunks = x.chunk(N_LEVELS, dim=1)
        levels = [chunks[0]] + [F.max_pool2d(c, 2**i) for i, c in enumerate(chunks) if i > 0]
        outs = []
        from_coarser = None
        for i in reversed(range(N_LEVELS)):
            feat = levels[i] if from_coarser is None else levels[i] + from_coarser
            s = self.mfr[i](feat)
            from_coarser = F.interpolate(s, size=(s.shape[-2] * 2, s.shape[-1] * 2), mode="nearest")
            outs.append(F.interpolate(s, size=(h, w), mode="nearest") if i > 0 else s)
        return self.act(self.aggr(torch.cat(outs, dim=1))) * x

    def forward_tokens(self, x: Tensor) -> Tensor:
        """Inference form on a channels-last map ``[B, H, W, dim]`` (contiguous): ``GELU(aggr(·)) * x`` as a new
        tensor of that layout.

        The same function, cheaper: each level is pooled from the one above (a max of maxes), the
        nearest-upsampled additions are broadcasts, and ``aggr`` (a 1x1 conv on the concatenation of the
        upsampled levels) is applied per level at that level's own resolution, ``aggr(cat(up(s_i))) =
        Σ up(W_i s_i) + b``, the coarser sums broadcast-added into the finer ones.
        """
        b, h, w, dim = x.shape
        c = dim // N_LEVELS
        pooled = [x[..., :c]]
        rest = x[..., c:]
        for _ in range(1, N_LEVELS):
            rest = _max_pool2_tokens(rest)
            pooled.append(rest[..., :c])
            rest = rest[..., c:]
        weight = self.aggr.weight.view(dim, dim)
        acc = None
        s = None
        for i in reversed(range(N_LEVELS)):
            feat = pooled[i].contiguous() if s is None else _add_upsampled2(pooled[i], s)
            s = self.mfr[i].forward_tokens(feat)
            j = N_LEVELS - 1 - i  # the concatenation is coarsest first
            part = fast_linear(s, weight[:, j * c : (j + 1) * c], self.aggr.bias if i == 0 else None)
            acc = part if acc is None else _add_upsampled2_(part, acc)
        return torch.ops.aten.gelu_(acc).mul_(x)


def _max_pool2_tokens(x: Tensor) -> Tensor:
    """2x2 max pooling of a channels-last map ``[B, H, W, C]`` (any strides) -> contiguous ``[B, H/2, W/2, C]``."""
    return torch.maximum(torch.maximum(x[:, 0::2, 0::2], x[:, 0::2, 1::2]),
                         torch.maximum(x[:, 1::2, 0::2], x[:, 1::2, 1::2]))


def _add_upsampled2(fine: Tensor, coarse: Tensor) -> Tensor:
    """``fine + nearest_x2(coarse)`` on channels-last maps, as a new contiguous ``[B, H, W, C]``."""
    b, h, w, c = fine.shape
    out = torch.add(fine.unflatten(1, (h // 2, 2)).unflatten(3, (w // 2, 2)), coarse[:, :, None, :, None])
    return out.view(b, h, w, c)


def _add_upsampled2_(fine: Tensor, coarse: Tensor) -> Tensor:
    """``fine += nearest_x2(coarse)`` in place on contiguous channels-last maps; returns ``fine``."""
    b, h, w, c = fine.shape
    fine.view(b, h // 2, 2, w // 2, 2, c).add_(coarse[:, :, None, :, None])
    return fine


class AttBlock(nn.Module):
    """``x = lhsb(norm1(x)) + x; x = ccm(norm2(x)) + x`` on ``[B, dim, H, W]``."""

    def __init__(
        self, dim: int, ffn_scale: float = 2.0, window_size: int = 8, drop: float = 0.0, attn_drop: float = 0.0
    ):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.norm2 = LayerNorm(dim)
        self.lhsb = LHSB(dim, window_size, attn_drop=attn_drop, proj_drop=drop)
        self.ccm = CCM(dim, ffn_scale)

    def forward(self, x: Tensor) -> Tensor:
        x = self.lhsb(self.norm1(x)) + x
        return self.ccm(self.norm2(x)) + x

    def forward_tokens_(self, x: Tensor) -> None:
        """Inference form, in place on a contiguous channels-last map ``[B, H, W, dim]``."""
        dim = x.shape[-1]
        n = F.layer_norm(x, (dim,), self.norm1.weight, self.norm1.bias, self.norm1.eps)
        x += self.lhsb.forward_tokens(n)
        n = F.layer_norm(x, (dim,), self.norm2.weight, self.norm2.bias, self.norm2.eps)
        conv3, _, conv1 = self.ccm.ccm
        hidden = F.conv2d(n.permute(0, 3, 1, 2), conv3.weight, conv3.bias, padding=1).permute(0, 2, 3, 1)
        hidden = torch.ops.aten.gelu_(hidden)
        x += fast_linear(hidden, conv1.weight.view(dim, -1), conv1.bias)


@store_hyperparameters()
class LMLT(nn.Module):
    """LMLT super-resolution network: ``[B, in_chans, H, W]`` in 0..1 -> ``[B, in_chans, H*s, W*s]``.

    ``to_feat`` (conv3) -> ``n_blocks`` x :class:`AttBlock` with a global residual -> ``to_img``
    (conv3 to ``in_chans*s²`` channels, PixelShuffle). Any input size works: the input is
    reflect-padded to a multiple of ``window_size * 8`` and the output cropped.

    ``in_chans`` and ``window_size`` are FlexSR additions (the reference fixes them at 3 and 8);
    ``drop_rate`` / ``attn_drop_rate`` are dropout on the attention output / weights (training only).
    """

    hyperparameters: dict

    def __init__(
        self,
        *,
        dim: int,
        n_blocks: int = 8,
        ffn_scale: float = 2.0,
        upscaling_factor: int = 4,
        window_size: int = 8,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
    ):
        super().__init__()
        self.scale = upscaling_factor
        self.window_size = window_size
        #: H and W are padded to multiples of this: the coarsest level (1/8 size) must hold whole windows.
        self.pad_multiple = window_size * 2 ** (N_LEVELS - 1)
        self.to_feat = nn.Conv2d(in_chans, dim, 3, 1, 1)
        self.feats = nn.Sequential(
            *(AttBlock(dim, ffn_scale, window_size, drop=drop_rate, attn_drop=attn_drop_rate) for _ in range(n_blocks))
        )
        self.to_img = nn.Sequential(
            nn.Conv2d(dim, in_chans * upscaling_factor**2, 3, 1, 1), nn.PixelShuffle(upscaling_factor)
        )

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        x = pad_to_multiple(x, self.pad_multiple)
        if inference_path(self):
            x = self._features_inference(x)
        else:
            x = self.to_feat(x)
            x = self.feats(x) + x
        x = self.to_img(x)
        return x[..., : h * self.scale, : w * self.scale]

    def _features_inference(self, x: Tensor) -> Tensor:
        """``feats(to_feat(x)) + to_feat(x)`` in the inference form: one channels-last layout throughout,
        every block updating one buffer in place. Returns a channels-last ``[B, dim, H, W]``."""
        feat = self.to_feat(x.contiguous(memory_format=torch.channels_last))
        tokens = feat.permute(0, 2, 3, 1).contiguous()  # [B, H, W, dim]
        body = tokens.clone()
        for block in self.feats:
            block.forward_tokens_(body)
        body += tokens
        return body.permute(0, 3, 1, 2)


#: The published configurations (all 8 blocks, ``ffn_scale`` 2); the scale is chosen per checkpoint.
PRESETS: dict[str, dict] = {
    "tiny": {"dim": 36, "n_blocks": 8, "ffn_scale": 2.0},
    "base": {"dim": 60, "n_blocks": 8, "ffn_scale": 2.0},
    "large": {"dim": 84, "n_blocks": 8, "ffn_scale": 2.0},
}


def LMLT_tiny(scale: int = 4, **overrides) -> LMLT:
    """LMLT-Tiny: dim 36 (239,340 / 244,215 / 251,040 params at ×2/×3/×4)."""
    return LMLT(**{**PRESETS["tiny"], "upscaling_factor": scale, **overrides})


def LMLT_base(scale: int = 4, **overrides) -> LMLT:
    """LMLT-Base: dim 60 (652,332 / 660,447 / 671,808 params at ×2/×3/×4)."""
    return LMLT(**{**PRESETS["base"], "upscaling_factor": scale, **overrides})


def LMLT_large(scale: int = 4, **overrides) -> LMLT:
    """LMLT-Large: dim 84 (1,268,076 / 1,279,431 / 1,295,328 params at ×2/×3/×4)."""
    return LMLT(**{**PRESETS["large"], "upscaling_factor": scale, **overrides})


def _preset_name(hyperparameters: dict) -> str | None:
    if hyperparameters["in_chans"] != 3:
        return None
    for name, preset in PRESETS.items():
        if all(hyperparameters[k] == v for k, v in preset.items()):
            return name
    return None


def _check_fits(model: nn.Module, state_dict: dict[str, Tensor]) -> None:
    """Raise IncompatibleWeightsError naming the keys that are missing, unexpected or of the wrong shape."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & state_dict.keys() if state_dict[k].shape != expected[k])
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} keys (first: {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (first: {', '.join(unexpected[:3])})")
    if wrong:
        k = wrong[0]
        problems.append(
            f"{len(wrong)} tensors of the wrong shape (first: {k} is {tuple(state_dict[k].shape)}, "
            f"expected {tuple(expected[k])})"
        )
    if problems:
        raise IncompatibleWeightsError(
            f"These weights look like LMLT but do not fit the LMLT read from their shapes: {'; '.join(problems)}. "
            f"The file may be damaged or from a modified LMLT variant."
        )


class LMLTArch(FlexSRArchitecture):
    """Detects and loads LMLT checkpoints (``to_feat`` / ``feats.N.lhsb.mfr`` / ``to_img`` keys)."""

    def __init__(self) -> None:
        super().__init__(
            id="LMLT",
            detect=KeyCondition.has_all(
                "to_feat.weight",
                "to_feat.bias",
                "feats.0.norm1.weight",
                "feats.0.norm2.weight",
                "feats.0.lhsb.mfr.0.qkv.weight",
                "feats.0.lhsb.mfr.0.get_v.weight",
                "feats.0.lhsb.mfr.0.proj.weight",
                f"feats.0.lhsb.mfr.{N_LEVELS - 1}.qkv.weight",
                "feats.0.lhsb.aggr.weight",
                "feats.0.ccm.ccm.0.weight",
                "feats.0.ccm.ccm.2.weight",
                "to_img.0.weight",
            ),
        )

    load_options = ("window_size",)
    filename_hints = {"window_size": "w"}

    def load(self, state_dict: dict[str, Tensor], window_size: int = 8) -> ImageModelDescriptor[LMLT]:
        """``window_size`` leaves no trace in the weights: 8 (the published models) unless given, or
        named in the file name as ``_w<N>`` (``archs.load_model`` passes it)."""
        dim, in_chans = state_dict["to_feat.weight"].shape[:2]
        n_blocks = get_seq_len(state_dict, "feats")
        ffn_scale = state_dict["feats.0.ccm.ccm.0.weight"].shape[0] / dim
        out = state_dict["to_img.0.weight"].shape[0]
        scale = math.isqrt(out // in_chans)
        if in_chans * scale * scale != out:
            raise ValueError(
                f"to_img.0.weight has {out} output channels, which is not {in_chans}·scale² for any scale."
            )
        model = LMLT(
            dim=dim, n_blocks=n_blocks, ffn_scale=ffn_scale, upscaling_factor=scale, in_chans=in_chans,
            window_size=window_size,
        )
        _check_fits(model, state_dict)
        preset = _preset_name(model.hyperparameters)
        tags = ([preset] if preset else []) + [f"{dim}dim", f"{n_blocks}nb"]
        if window_size != 8:
            tags.append(f"w{window_size}")
        return self.sr_descriptor(model, state_dict, scale=scale, tags=tags, input_channels=in_chans,
                                  output_channels=in_chans)

    def signature_model(self) -> LMLT:
        return LMLT(dim=12, n_blocks=1, upscaling_factor=2)


ARCHITECTURES = (LMLTArch(),)

__all__ = ["LMLT", "LMLT_tiny", "LMLT_base", "LMLT_large", "LMLTArch", "ARCHITECTURES"]

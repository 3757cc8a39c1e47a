"""FlexNet V1 (umzi2/FlexNet): window-attention + RWKV ChannelMix transformer for single-image SR.

Two pipelines share one block design:

* ``linear``: groups of :class:`TransformerBlock` at full resolution, each group closed by a
  :class:`ConvBlock` on ``cat[group input, group output]``;
* ``meta``: a 4-level U-shape (``dim, 2dim, 4dim, 8dim``) with PixelUnshuffle downsampling,
  PixelShuffle upsampling and concatenated skips.

Three tails: ``ps`` (conv + PixelShuffle), ``n+c`` (nearest upsampling + convs) and ``dys`` (DySample).

Parameter and buffer names follow umzi2/FlexNet's ``FlexNet_arch.py``, so its checkpoints (and
traiNNer-redux's and neosr's, which use the same layout) load strictly and give the same outputs.
Differences from the reference, all of them fixes: any ``window_size`` works (the reference's LePE
hard-codes 8x8 windows), DySample runs on CPU-only torch, inputs of any size down to 1x1 are padded
correctly, and OmniShift's fused kernel can never go stale (see :mod:`archs.blocks`).

neosr's ``flash_attn=True`` variant (a ``flash_attn`` buffer in its checkpoints) reorders each
window's attention output as ``out.transpose(1, 2).reshape(B, N, C)`` before the projection; models
trained that way need the same ordering, which ``FlexNet(flash_attn=True)`` reproduces.

Inference (eval mode, autograd off) takes its own path through each block (``add_to_``): channels-last
features, gamma folded into the output weights, in-place residuals, and the linear layers on oneDNN's
matmul (:func:`archs.blocks.fast_linear`, ChannelMix's ReLU and sigmoid fused into it), about 1.5x the
speed of the BLAS matmul behind ``F.linear`` on an AVX-512 CPU (``bench/bench_flexnet.py --blas-linears``).
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from spandrel import ImageModelDescriptor, StateDict
from spandrel.util import KeyCondition, get_seq_len, store_hyperparameters
from torch import Tensor, nn

from .blocks import OmniShift, fast_linear, pad_to_multiple, window_partition, window_reverse
from .registry import FlexSRArchitecture
from .reparam import derived, inference_path

PipelineType = Literal["linear", "meta"]
Upsampler = Literal["ps", "n+c", "dys", "pixelshuffle", "nearest+conv", "dysample"]

#: Upsampler spellings accepted by :class:`FlexNet` -> umzi2's canonical name.
#: ``pixelshuffle``/``nearest+conv``/``dysample`` are traiNNer-redux's names for the same tails.
UPSAMPLER_ALIASES: dict[str, str] = {
    "ps": "ps",
    "pixelshuffle": "ps",
    "n+c": "n+c",
    "nearest+conv": "n+c",
    "dys": "dys",
    "dysample": "dys",
}

#: The meta pipeline downsamples three times, so its padding unit is ``window_size * META_STRIDE``.
META_STRIDE = 8


# --------------------------------------------------------------------------------------------------
# Blocks


class ConvBlock(nn.Module):
    """``conv3 -> Mish -> conv3 -> Mish`` plus a 1x1 conv branch: ``[B, in, H, W] -> [B, out, H, W]``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            nn.Mish(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
            nn.Mish(),
        )
        self.conv11 = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        if inference_path(self) and x.is_contiguous(memory_format=torch.channels_last):
            return self._infer(x)
        return self.block(x) + self.conv11(x)

    def _infer(self, x: Tensor) -> Tensor:
        """Channels-last inference: Mish in place, the 1x1 branch as a matmul added in place."""
        conv1, _, conv2, _ = self.block
        y = _mish_(conv2(_mish_(conv1(x))))
        if not y.is_contiguous(memory_format=torch.channels_last):
            return y + self.conv11(x)
        b, c, h, w = x.shape
        tokens = y.permute(0, 2, 3, 1).view(-1, y.shape[1])
        weight = self.conv11.weight.view(y.shape[1], c)
        tokens.add_(fast_linear(x.permute(0, 2, 3, 1).reshape(-1, c), weight, self.conv11.bias))
        return y


class WindowAttention(nn.Module):
    """Single-head attention inside non-overlapping ``window x window`` windows, after an OmniShift.

    Values get a locally-enhanced positional encoding (LePE): a depthwise 3x3 conv (``get_v``) run
    inside each window. ``flash_attn=True`` reproduces neosr's token/channel reordering of the
    per-window output (see the module docstring).
    """

    def __init__(
        self,
        dim: int,
        window_size: int = 8,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        flash_attn: bool = False,
    ):
        super().__init__()
        self.window_size = window_size
        self.scale = dim**-0.5
        self.attn_drop = attn_drop
        self.flash_attn = flash_attn
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.omni_shift = OmniShift(dim)
        self.get_v = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, H, W]`` (H, W multiples of the window) -> ``[B, C, H, W]``."""
        _, c, h, w = x.shape
        ws = self.window_size
        windows = window_partition(self.omni_shift(x), ws)  # [B*nW, ws*ws, C]
        q, k, v = self.qkv(windows).chunk(3, dim=-1)
        v_img = rearrange(v, "n (wh ww) c -> n c wh ww", wh=ws, ww=ws)
        lepe = rearrange(self.get_v(v_img), "n c wh ww -> n (wh ww) c")
        drop = self.attn_drop if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, scale=self.scale) + lepe
        if self.flash_attn:  # neosr: out.transpose(1, 2).reshape(B, N, C) per window
            out = rearrange(out, "n t c -> n (c t)")
            out = rearrange(out, "n (t c) -> n t c", c=c)
        out = self.proj_drop(self.proj(out))
        return window_reverse(out, ws, h, w)

    def add_to_(self, x: Tensor, s: Tensor, gamma: Tensor) -> None:
        """Inference: ``x += gamma * attention(s)`` in place, ``x`` tokens ``[B, H*W, C]``, ``s`` the
        OmniShift output ``[B, C, H, W]`` (channels-last preferred).

        One copy into windows; q/k and v from separate matmuls so v is contiguous for LePE's conv;
        ``gamma`` folded into ``proj``; the window reverse fused into the residual add.
        """
        b, c, h, w = s.shape
        ws = self.window_size
        nh, nw, t = h // ws, w // ws, ws * ws
        wqk, bqk, wv, bv, wp, bp = derived(
            self, "weights", [self.qkv.weight, self.qkv.bias, self.proj.weight, self.proj.bias, gamma],
            lambda: (self.qkv.weight[: 2 * c].contiguous(), self.qkv.bias[: 2 * c].contiguous(),
                     self.qkv.weight[2 * c :].contiguous(), self.qkv.bias[2 * c :].contiguous(),
                     (self.proj.weight * gamma[:, None]).contiguous(), (self.proj.bias * gamma).contiguous()),
        )
        image, residual = s.permute(0, 2, 3, 1), x.view(b, nh, ws, nw, ws, c)
        step = max(1, FFN_CHUNK // (ws * w))  # rows of windows per slice, so a slice's activations stay in cache
        for i in range(0, nh, step):
            rows = min(step, nh - i)
            windows = image[:, i * ws : (i + rows) * ws].reshape(b, rows, ws, nw, ws, c).transpose(2, 3).reshape(-1, c)
            qk = fast_linear(windows, wqk, bqk)  # [n*t, 2C]
            v = fast_linear(windows, wv, bv).view(-1, t, c)
            n = v.shape[0]
            q, k = qk[:, :c].view(n, t, c), qk[:, c:].view(n, t, c)
            lepe = self.get_v(v.view(n, ws, ws, c).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(n, t, c)
            # softmax(q k^T * scale) v + lepe: batched matmuls beat SDPA's CPU kernel on 64-token windows
            scores = torch.baddbmm(torch.empty((), dtype=q.dtype, device=q.device), q, k.transpose(1, 2),
                                   beta=0.0, alpha=self.scale)
            out = torch.baddbmm(lepe, scores.softmax(-1), v)
            if self.flash_attn:
                out = out.transpose(1, 2).reshape(n, t, c)
            out = fast_linear(out.view(-1, c), wp, bp)
            residual[:, i : i + rows].add_(out.view(b, rows, nw, ws, ws, c).transpose(2, 3))


def _mish_(x: Tensor) -> Tensor:
    """Mish in place, ``x * tanh(softplus(x)) = x - 2x / ((e^x + 1)^2 + 1)``: one exp (twice as fast as
    ``F.mish`` here; same to ~1e-6). Above 20, mish(x) = x in float32 (e^x is clamped to keep it finite)."""
    u = x.clamp(max=20.0).exp_().add_(1).square_().add_(1)
    return x.addcdiv_(x, u, value=-2)


def _rms_normalize(x: Tensor, eps: float | None) -> Tensor:
    """``F.rms_norm(x, (C,), None, eps)`` over the last dim, from one vector norm (fewer passes; same to ~1e-7)."""
    c = x.shape[-1]
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    scale = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)
    return x * scale.square_().mul_(1.0 / c).add_(eps).rsqrt_().to(x.dtype)


#: Inference: tokens per slice of ChannelMix's pointwise part, so its 4x-wide activations stay in cache.
FFN_CHUNK = 8192


class ChannelMix(nn.Module):
    """Restore-RWKV's ChannelMix: OmniShift, then ``sigmoid(receptance(x)) * value(relu(key(x))^2)``."""

    def __init__(self, dim: int, hidden_rate: float = 4, key_norm: bool = False):
        super().__init__()
        hidden = int(hidden_rate * dim)
        self.key = nn.Linear(dim, hidden, bias=False)
        self.omni_shift = OmniShift(dim)
        self.key_norm = nn.RMSNorm(hidden) if key_norm else None
        self.receptance = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, H, W]`` -> tokens ``[B, H*W, C]``."""
        x = rearrange(self.omni_shift(x), "b c h w -> b (h w) c")
        k = torch.relu(self.key(x)).square()
        if self.key_norm is not None:
            k = self.key_norm(k)
        return torch.sigmoid(self.receptance(x)) * self.value(k)

    def add_to_(self, x: Tensor, s: Tensor, gamma: Tensor) -> None:
        """Inference: ``x += gamma * channel_mix(s)`` in place (``s`` the OmniShift output ``[B, C, H, W]``).

        ReLU, square and sigmoid in place; ``gamma`` (and key_norm's weight) folded into ``value``; the
        gate and the residual add as one ``addcmul_``.
        """
        c = s.shape[1]
        norm = self.key_norm
        def fold() -> Tensor:
            w = self.value.weight * gamma[:, None]
            return (w * norm.weight[None, :] if norm is not None else w).contiguous()

        wv = derived(self, "value", [self.value.weight, gamma] + ([norm.weight] if norm is not None else []), fold)
        tokens = s.permute(0, 2, 3, 1).reshape(-1, c)  # a view when s is channels-last
        out = x.view(-1, c)
        for i in range(0, tokens.shape[0], FFN_CHUNK):
            t = tokens[i : i + FFN_CHUNK]
            k = fast_linear(t, self.key.weight, act="relu").square_()
            if norm is not None:
                k = F.rms_norm(k, norm.normalized_shape, None, norm.eps)
            r = fast_linear(t, self.receptance.weight, act="sigmoid")
            out[i : i + FFN_CHUNK].addcmul_(r, fast_linear(k, wv))


class TransformerBlock(nn.Module):
    """``x += gamma1 * att(RMSNorm(x)); x += gamma2 * ffn(RMSNorm(x))`` on tokens ``[B, H*W, C]``."""

    def __init__(
        self,
        dim: int,
        window_size: int = 8,
        hidden_rate: float = 4,
        channel_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        flash_attn: bool = False,
    ):
        super().__init__()
        self.rn1 = nn.RMSNorm(dim)
        self.rn2 = nn.RMSNorm(dim)
        self.att = WindowAttention(dim, window_size, attn_drop, proj_drop, flash_attn)
        self.ffn = ChannelMix(dim, hidden_rate, channel_norm)
        self.gamma1 = nn.Parameter(torch.ones(dim))
        self.gamma2 = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        to_img = lambda t: rearrange(t, "b (h w) c -> b c h w", h=h, w=w)  # noqa: E731
        att = rearrange(self.att(to_img(self.rn1(x))), "b c h w -> b (h w) c")
        x = x + self.gamma1 * att
        return x + self.gamma2 * self.ffn(to_img(self.rn2(x)))

    def forward_(self, x: Tensor, h: int, w: int) -> None:
        """Inference form of :meth:`forward`, in place on contiguous tokens ``x`` ``[B, H*W, C]``.

        The tokens are the channels-last image, so no layout copy is needed around the OmniShifts: the
        RMSNorm weights fold into the OmniShift kernels (depthwise, so per-channel scales commute).
        """
        b, _, c = x.shape
        for norm, mixer, gamma in ((self.rn1, self.att, self.gamma1), (self.rn2, self.ffn, self.gamma2)):
            kernel = mixer.omni_shift.inference_kernel(norm.weight)
            normed = _rms_normalize(x, norm.eps)
            shifted = F.conv2d(normed.view(b, h, w, c).permute(0, 3, 1, 2), kernel, padding=2, groups=c)
            mixer.add_to_(x, shifted, gamma)


class BlockGroup(nn.Module):
    """``n_blocks`` TransformerBlocks closed by ``ConvBlock(2*dim -> dim)`` on ``cat[input, output]``.

    umzi2's ``LBlock`` and ``MBlock`` (same weights and math); ``[B, dim, H, W] -> [B, dim, H, W]``.
    """

    def __init__(self, dim: int, n_blocks: int, **block_kwargs):
        super().__init__()
        self.t_blocks = nn.ModuleList(TransformerBlock(dim, **block_kwargs) for _ in range(n_blocks))
        self.conv = ConvBlock(dim * 2, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        if inference_path(self):  # one token buffer, updated in place by every block
            y = torch.empty((b, h * w, c), dtype=x.dtype, device=x.device)
            y.view(b, h, w, c).copy_(x.permute(0, 2, 3, 1))
            for block in self.t_blocks:
                block.forward_(y, h, w)
            return self.conv(torch.cat([x, y.view(b, h, w, c).permute(0, 3, 1, 2)], dim=1))
        y = rearrange(x, "b c h w -> b (h w) c")
        for block in self.t_blocks:
            y = block(y, h, w)
        y = rearrange(y, "b (h w) c -> b c h w", h=h, w=w)
        return self.conv(torch.cat([x, y], dim=1))


class LinearPipeline(nn.Module):
    """Block groups at full resolution, one after another."""

    def __init__(self, dim: int, num_blocks: Sequence[int], **block_kwargs):
        super().__init__()
        self.att = nn.ModuleList(BlockGroup(dim, n, **block_kwargs) for n in num_blocks)

    def forward(self, x: Tensor) -> Tensor:
        for group in self.att:
            x = group(x)
        return x


class Downsample(nn.Module):
    """``conv3(n -> n/2, no bias) + PixelUnshuffle(2)``: ``[B, n, H, W] -> [B, 2n, H/2, W/2]``."""

    def __init__(self, n_feat: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(n_feat, n_feat // 2, 3, padding=1, bias=False), nn.PixelUnshuffle(2))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class Upsample(nn.Module):
    """``conv3(n -> n, no bias) + PixelShuffle(2)``: ``[B, n, H, W] -> [B, n/4, 2H, 2W]``."""

    def __init__(self, n_feat: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(n_feat, n_feat, 3, padding=1, bias=False), nn.PixelShuffle(2))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class MetaPipeline(nn.Module):
    """U-shape: enc0 (d) -> enc1 (2d) -> enc2 (4d) -> enc3 (8d) -> dec0 (4d) -> dec1 (2d) -> dec2 (d).

    Needs H, W multiples of ``8 * window_size`` (FlexNet pads to that).
    """

    def __init__(self, dim: int, num_blocks: Sequence[int], **block_kwargs):
        super().__init__()
        if len(num_blocks) != 4:
            raise ValueError(f"the meta pipeline takes 4 block counts (enc0..enc3), got {tuple(num_blocks)}")
        n0, n1, n2, n3 = num_blocks
        self.enc0 = nn.Sequential(BlockGroup(dim, n0, **block_kwargs))
        self.enc1 = nn.Sequential(BlockGroup(dim * 2, n1, **block_kwargs))
        self.enc2 = nn.Sequential(BlockGroup(dim * 4, n2, **block_kwargs))
        self.enc3 = nn.Sequential(BlockGroup(dim * 8, n3, **block_kwargs))
        self.down1 = Downsample(dim)
        self.down2 = Downsample(dim * 2)
        self.down3 = Downsample(dim * 4)
        self.up1 = Upsample(dim * 16)
        self.up2 = Upsample(dim * 8)
        self.up3 = Upsample(dim * 4)
        self.dec0 = nn.Sequential(BlockGroup(dim * 4, n2, **block_kwargs))
        self.dec1 = nn.Sequential(BlockGroup(dim * 2, n1, **block_kwargs))
        self.dec2 = nn.Sequential(BlockGroup(dim, n0, **block_kwargs))

    def forward(self, x: Tensor) -> Tensor:
        skip0 = self.down1(self.enc0(x))  # 2d, /2
        skip1 = self.down2(self.enc1(skip0))  # 4d, /4
        skip2 = self.down3(self.enc2(skip1))  # 8d, /8
        x = torch.cat([self.enc3(skip2), skip2], dim=1)  # 16d, /8
        x = torch.cat([self.dec0(self.up1(x)), skip1], dim=1)  # 8d, /4
        x = torch.cat([self.dec1(self.up2(x)), skip0], dim=1)  # 4d, /2
        return self.dec2(self.up3(x))  # d, /1


# --------------------------------------------------------------------------------------------------
# Tails


class DySample(nn.Module):
    """DySample ("Learning to Upsample by Learning to Sample"), with a 1x1 end conv.

    ``[B, in, H, W] -> [B, out, s*H, s*W]``: each of ``groups`` channel groups is resampled
    bilinearly at learned offsets around the regular grid. Works on any device (no pinned memory).
    """

    def __init__(self, in_channels: int, out_channels: int, scale: int = 2, groups: int = 4):
        super().__init__()
        if in_channels < groups or in_channels % groups:
            raise ValueError(f"DySample needs in_channels ({in_channels}) to be a multiple of groups ({groups}).")
        self.scale = scale
        self.groups = groups
        offsets = 2 * groups * scale**2
        self.end_conv = nn.Conv2d(in_channels, out_channels, 1)
        self.offset = nn.Conv2d(in_channels, offsets, 1)
        self.scope = nn.Conv2d(in_channels, offsets, 1, bias=False)
        nn.init.trunc_normal_(self.offset.weight, std=0.02)
        nn.init.zeros_(self.scope.weight)
        self.register_buffer("init_pos", self._initial_positions())

    def _initial_positions(self) -> Tensor:
        """``[1, 2*groups*s*s, 1, 1]``: sub-pixel centres, x then y, laid out ``(xy, group, i, j)``."""
        s = self.scale
        h = (torch.arange(s, dtype=torch.float32) - (s - 1) / 2) / s
        ys, xs = torch.meshgrid(h, h, indexing="ij")
        return repeat(torch.stack([xs, ys]), "xy i j -> 1 (xy g i j) 1 1", g=self.groups)

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        s, g = self.scale, self.groups
        offset = self.offset(x) * self.scope(x).sigmoid() * 0.5 + self.init_pos
        offset = rearrange(offset, "b (xy n) h w -> b xy n h w", xy=2)
        ys = torch.arange(h, device=x.device, dtype=x.dtype) + 0.5
        xs = torch.arange(w, device=x.device, dtype=x.dtype) + 0.5
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"))  # [2, H, W]: x, y pixel centres
        size = torch.tensor([w, h], device=x.device, dtype=x.dtype).view(1, 2, 1, 1, 1)
        coords = 2 * (grid[None, :, None] + offset) / size - 1  # normalized to -1..1
        coords = F.pixel_shuffle(rearrange(coords, "b xy n h w -> b (xy n) h w"), s)
        coords = rearrange(coords, "b (xy g) h w -> (b g) h w xy", xy=2, g=g)
        out = F.grid_sample(
            rearrange(x, "b (g c) h w -> (b g) c h w", g=g),
            coords,
            mode="bilinear",
            align_corners=False,
            padding_mode="border",
        )
        return self.end_conv(rearrange(out, "(b g) c h w -> b (g c) h w", b=b))


def _nearest_conv_tail(dim: int, out_channels: int, scale: int) -> nn.Sequential:
    """umzi2's InterpolateUpsampler: ``[conv3, nearest x2, lrelu] * log2(s)`` (or one x3 step), conv3, lrelu, conv3."""
    if scale & (scale - 1) == 0:
        steps = [2] * int(math.log2(scale))
    elif scale == 3:
        steps = [3]
    else:
        raise ValueError(f"the n+c upsampler supports scales 1, 2, 3, 4, 8, ... (powers of two and 3), not {scale}")
    layers: list[nn.Module] = []
    for step in steps:
        layers += [
            nn.Conv2d(dim, dim, 3, padding=1),
            nn.Upsample(scale_factor=step, mode="nearest"),
            nn.LeakyReLU(0.2, inplace=True),
        ]
    layers += [nn.Conv2d(dim, dim, 3, padding=1), nn.LeakyReLU(0.2, inplace=True), nn.Conv2d(dim, out_channels, 3, padding=1)]
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------------------------------
# The model


@store_hyperparameters()
class FlexNet(nn.Module):
    """FlexNet V1. Input ``[B, inp_channels, H, W]`` in 0..1 -> ``[B, out_channels, scale*H, scale*W]``.

    Any H, W >= 1: the input is reflect-padded (bottom/right) to a multiple of ``window_size``
    (``linear``) or ``8 * window_size`` (``meta``) and the output cropped back.

    Args (umzi2's names and defaults): ``pipeline_type`` ``"linear"``/``"meta"``; ``upsampler``
    ``"ps"``/``"n+c"``/``"dys"`` (traiNNer-redux's ``"pixelshuffle"``/``"nearest+conv"``/``"dysample"``
    are accepted and stored under umzi2's name); ``channel_norm`` adds an RMSNorm on ChannelMix's keys;
    ``flash_attn`` reproduces neosr's attention-output ordering (and registers its ``flash_attn`` buffer).
    """

    hyperparameters: dict

    def __init__(
        self,
        *,
        inp_channels: int = 3,
        out_channels: int = 3,
        scale: int = 4,
        dim: int = 64,
        num_blocks: Sequence[int] = (6, 6, 6, 6, 6, 6),
        window_size: int = 8,
        hidden_rate: float = 4,
        channel_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        pipeline_type: PipelineType = "linear",
        upsampler: Upsampler = "ps",
        flash_attn: bool = False,
    ):
        super().__init__()
        if upsampler not in UPSAMPLER_ALIASES:
            raise ValueError(f"unknown upsampler {upsampler!r}; choose one of {sorted(UPSAMPLER_ALIASES)}")
        if pipeline_type not in ("linear", "meta"):
            raise ValueError(f"pipeline_type must be 'linear' or 'meta', not {pipeline_type!r}")
        if not 1 <= window_size <= 255:
            raise ValueError(f"window_size must be 1..255 (it is stored as a uint8 buffer), not {window_size}")
        upsampler = UPSAMPLER_ALIASES[upsampler]
        self.hyperparameters["upsampler"] = upsampler  # one spelling, so saved and reloaded models compare equal
        self.hyperparameters["num_blocks"] = tuple(num_blocks)

        self.scale = scale
        self.pipeline_type = pipeline_type
        self.pad_unit = window_size * (META_STRIDE if pipeline_type == "meta" else 1)
        self.register_buffer("window_size", torch.tensor(window_size, dtype=torch.uint8))
        if flash_attn:  # neosr's marker; its value is irrelevant, its presence tells the variant
            self.register_buffer("flash_attn", torch.zeros(1, dtype=torch.bool))

        block_kwargs = dict(
            window_size=window_size,
            hidden_rate=hidden_rate,
            channel_norm=channel_norm,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            flash_attn=flash_attn,
        )
        self.short_cut = ConvBlock(inp_channels, dim)
        self.in_to_feat = nn.Conv2d(inp_channels, dim, 3, padding=1)
        pipeline = LinearPipeline if pipeline_type == "linear" else MetaPipeline
        self.pipeline = pipeline(dim, num_blocks, **block_kwargs)

        if upsampler == "n+c":
            self.register_buffer("scale_factor", torch.tensor(scale, dtype=torch.uint8))
            self.to_img = nn.Sequential(
                nn.Conv2d(dim * 2, dim, 3, padding=1), _nearest_conv_tail(dim, out_channels, scale)
            )
        elif upsampler == "dys":
            self.to_img = DySample(dim * 2, out_channels, scale)
        else:
            self.to_img = nn.Sequential(nn.Conv2d(dim * 2, out_channels * scale**2, 3, padding=1), nn.PixelShuffle(scale))

    def forward(self, x: Tensor) -> Tensor:
        _, _, h, w = x.shape
        x = pad_to_multiple(x, self.pad_unit)
        if inference_path(self):  # one memory layout throughout: channels-last images are the token layout
            x = x.contiguous(memory_format=torch.channels_last)
        short_cut = self.short_cut(x)
        x = self.pipeline(self.in_to_feat(x))
        x = self.to_img(torch.cat([x, short_cut], dim=1))
        return x[:, :, : h * self.scale, : w * self.scale]


def MetaFlexNet(**overrides) -> FlexNet:
    """The MetaFlexNet preset: dim 48, num_blocks (4, 6, 6, 8), meta pipeline (38,053,568 params at x4)."""
    kwargs = dict(dim=48, num_blocks=(4, 6, 6, 8), pipeline_type="meta")
    kwargs.update(overrides)
    return FlexNet(**kwargs)


# --------------------------------------------------------------------------------------------------
# spandrel Architecture


def _count_blocks(state_dict: StateDict, prefix: str) -> int:
    return get_seq_len(state_dict, f"{prefix}.t_blocks")


def _as_number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


class FlexNetArch(FlexSRArchitecture):
    """FlexNet and MetaFlexNet checkpoints (umzi2, traiNNer-redux, neosr incl. its flash_attn variant)."""

    def __init__(self) -> None:
        super().__init__(
            id="FlexNet",
            detect=KeyCondition.has_all(
                "window_size",
                "short_cut.block.0.weight",
                "short_cut.block.2.weight",
                "short_cut.conv11.weight",
                "in_to_feat.weight",
                KeyCondition.has_any(
                    "pipeline.att.0.t_blocks.0.att.qkv.weight",
                    "pipeline.att.0.conv.conv11.weight",
                    "pipeline.enc0.0.conv.conv11.weight",
                ),
                KeyCondition.has_any("to_img.0.weight", "to_img.offset.weight"),
            ),
        )

    def signature_model(self) -> FlexNet:
        return FlexNet(dim=16, num_blocks=(1, 1))

    def load(self, state_dict: StateDict) -> ImageModelDescriptor[FlexNet]:
        inp_channels = state_dict["in_to_feat.weight"].shape[1]
        dim = state_dict["in_to_feat.weight"].shape[0]
        window_size = int(state_dict["window_size"].item())
        flash_attn = "flash_attn" in state_dict

        if "pipeline.enc0.0.conv.conv11.weight" in state_dict:
            pipeline_type = "meta"
            num_blocks = tuple(_count_blocks(state_dict, f"pipeline.enc{i}.0") for i in range(4))
        else:
            pipeline_type = "linear"
            groups = get_seq_len(state_dict, "pipeline.att")
            num_blocks = tuple(_count_blocks(state_dict, f"pipeline.att.{g}") for g in range(groups))
        key = next((k for k in state_dict if k.endswith(".ffn.key.weight")), None)
        if key is not None:  # ChannelMix key: Linear(d, int(hidden_rate * d)) at any level
            hidden, d = state_dict[key].shape
            hidden_rate = _as_number(hidden / d)
        else:  # no transformer block at all: hidden_rate leaves no trace
            hidden_rate = 4
        channel_norm = any(k.endswith(".ffn.key_norm.weight") for k in state_dict)

        if "to_img.offset.weight" in state_dict:
            upsampler = "dys"
            out_channels = state_dict["to_img.end_conv.weight"].shape[0]
            scale = math.isqrt(state_dict["to_img.offset.weight"].shape[0] // (2 * 4))
        elif "scale_factor" in state_dict:
            upsampler = "n+c"
            scale = int(state_dict["scale_factor"].item())
            last = get_seq_len(state_dict, "to_img.1") - 1
            out_channels = state_dict[f"to_img.1.{last}.weight"].shape[0]
        else:
            upsampler = "ps"
            scale, out_channels = _pixelshuffle_scale_and_channels(state_dict["to_img.0.weight"].shape[0], inp_channels)

        model = FlexNet(
            inp_channels=inp_channels,
            out_channels=out_channels,
            scale=scale,
            dim=dim,
            num_blocks=num_blocks,
            window_size=window_size,
            hidden_rate=hidden_rate,
            channel_norm=channel_norm,
            pipeline_type=pipeline_type,
            upsampler=upsampler,
            flash_attn=flash_attn,
        )
        tags = [pipeline_type, f"{dim}dim", upsampler, f"w{window_size}"]
        if channel_norm:
            tags.append("channel_norm")
        if flash_attn:
            tags.append("flash_attn")
        return self.sr_descriptor(model, state_dict, scale=scale, tags=tags, input_channels=inp_channels,
                                  output_channels=out_channels)


def _pixelshuffle_scale_and_channels(conv_out: int, inp_channels: int) -> tuple[int, int]:
    """``conv_out = out_channels * scale**2``: prefer out == in, then 3, 1, 4 channels."""
    for c in dict.fromkeys((inp_channels, 3, 1, 4)):
        if conv_out % c == 0 and math.isqrt(conv_out // c) ** 2 == conv_out // c:
            return math.isqrt(conv_out // c), c
    raise ValueError(f"to_img.0 has {conv_out} output channels, which is not channels*scale^2 for 1, 3 or 4 channels")


ARCHITECTURES = (FlexNetArch(),)

__all__ = ["FlexNet", "MetaFlexNet", "FlexNetArch", "ARCHITECTURES", "UPSAMPLER_ALIASES"]

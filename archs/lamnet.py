"""LAMNet (Linear Adaptive Mixer Network) for image super-resolution, and its spandrel descriptor.

Reference: zononhzy/LAMNet ``basicsr/archs/lamnet_arch.py`` ("Unifying Dimensions: A Linear Adaptive
Mixer for Lightweight Image Super-Resolution"). Module, parameter and buffer names match the reference,
so its ``params_ema`` checkpoints load with strict key matching and give the same outputs. The
reference's FSA op is a CUDA extension; here it is :mod:`archs.fsa`, plain PyTorch, so LAMNet runs on
every device. No padding is needed: every layer works on any size down to 1x1, as in the reference.

Layout: ``x - mean`` -> conv3 (``shallow_feature_extraction``) -> ``num_groups`` x LAMixerBlock
(``num_blocks`` x [pre-norm LSAMixer, pre-norm DGFN], scaled residual) -> conv3, scaled residual ->
conv3 + PixelShuffle (``upsample``) -> ``+ mean``.

Inference form: without autograd, on float32 CPU tensors (no autocast), ``forward`` runs
:meth:`LAMNet._infer`: channels-last tokens ``[B*H*W, C]`` through the body, 1x1 convs as oneDNN
matmuls (:mod:`archs.onednn`), each norm's ``alpha``/``beta`` and each residual ``alpha`` folded into
neighbouring weights (cached by :func:`archs.reparam.derived`), depthwise convs channels-last, DGFN in
row bands; only the FSA op works on ``[B, C/2, H, W]`` maps. Same numbers to ~1e-6.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from spandrel import ImageModelDescriptor, StateDict
from spandrel.util import KeyCondition, get_seq_len, store_hyperparameters
from torch import Tensor, nn

from . import onednn
from .errors import IncompatibleWeightsError
from .fsa import CPU_BAND_ELEMENTS, KernelMap, fsa_spatial, normalize_kernel_map, tap_ranges
from .registry import FlexSRArchitecture
from .reparam import derived

__all__ = [
    "LAMNet",
    "LAMNet_base",
    "LAMNet_large",
    "LAMNetArch",
    "LSAMixer",
    "DGFN",
    "generate_kernel_map",
    "kernel_layout_of",
    "check_kernel_map",
    "depthwise_conv_cpu",
    "ARCHITECTURES",
]

#: The released configurations (the paper's LAMNet and LAMNet-L); only ``num_groups`` differs.
PRESETS: dict[str, dict] = {
    "base": dict(
        num_blocks=6, num_groups=4, dim=64, kernel_size=13, kernel_loc=(4, 6, 7), kernel_stride=(1, 2, 4), num_head=4
    ),
    "large": dict(
        num_blocks=6, num_groups=5, dim=64, kernel_size=13, kernel_loc=(4, 6, 7), kernel_stride=(1, 2, 4), num_head=4
    ),
}


# --------------------------------------------------------------------------------------------------
# Kernel maps


def generate_kernel_map(
    kernel_size: int, kernel_stride: Sequence[int], kernel_loc: Sequence[int]
) -> tuple[KernelMap, int]:
    """The reference's symmetric kernel map and the patch size of its kernel-predicting convs.

    One side of the map, walking out from the centre tap ``(0, 1)``: up to tap index ``kernel_loc[0]``
    (exclusive) runs of ``kernel_stride[0]`` pixels, then up to ``kernel_loc[1]`` runs of
    ``kernel_stride[1]``, ...; each run starts where the previous one ended. The other side mirrors it.
    ``kernel_size = 2 * (kernel_loc[-1] - 1) + 1`` taps; the patch covers every sampled pixel.
    Release: ``generate_kernel_map(13, (1, 2, 4), (4, 6, 7))`` -> starts ``-8 -6 -4 -3 .. 3 4 6 8`` with
    lengths ``4 2 2 1 .. 1 2 2 4``, patch size 23.
    """
    kernel_loc, kernel_stride = list(kernel_loc), list(kernel_stride)
    if not kernel_loc or len(kernel_loc) != len(kernel_stride):
        raise ValueError(
            f"kernel_loc and kernel_stride must be non-empty and of equal length, got {kernel_loc} and {kernel_stride}."
        )
    if any(s < 1 for s in kernel_stride) or any(b < a for a, b in zip([1] + kernel_loc, kernel_loc)):
        raise ValueError(
            f"kernel_stride must be >= 1 and kernel_loc non-decreasing from 1, got {kernel_stride}, {kernel_loc}."
        )
    if kernel_size % 2 != 1 or kernel_loc[-1] != kernel_size // 2 + 1:
        raise ValueError(
            f"kernel_size must be odd and kernel_loc[-1] must be kernel_size // 2 + 1; got kernel_size "
            f"{kernel_size}, kernel_loc {kernel_loc}."
        )
    side = [(0, 1)]
    start = 1
    for loc, stride in zip(kernel_loc, kernel_stride):
        for _ in range(loc - start):
            prev_start, prev_len = side[-1]
            side.append((prev_start + prev_len, stride))
        start = loc
    reach = side[-1][0] + side[-1][1] - 1
    mirrored = [(-s, n) for s, n in reversed(side[1:])]
    return tuple(mirrored + side), 2 * reach + 1


def kernel_layout_of(kernel_map: KernelMap) -> tuple[list[int], list[int]] | None:
    """``(kernel_loc, kernel_stride)`` that :func:`generate_kernel_map` turns into ``kernel_map``, or None.

    Runs of equal strides are merged, so the answer is the shortest such layout.
    """
    k = len(kernel_map)
    if k % 2 != 1:
        return None
    side = list(kernel_map[k // 2 :])
    if side[0] != (0, 1) or [(-s, n) for s, n in reversed(side[1:])] != list(kernel_map[: k // 2]):
        return None
    locs: list[int] = []
    strides: list[int] = []
    for i in range(1, len(side)):
        start, length = side[i]
        if start != side[i - 1][0] + side[i - 1][1]:
            return None
        if strides and strides[-1] == length:
            locs[-1] = i + 1
        else:
            locs.append(i + 1)
            strides.append(length)
    if not locs:  # a single centre tap
        return [1], [1]
    return locs, strides


def _reach_patch(kernel_map: KernelMap) -> int:
    """The odd patch size that covers every pixel the map samples (what the reference derives)."""
    return 2 * max(max(-lo, hi, 0) for lo, hi in tap_ranges(kernel_map)) + 1


def _kernel_map_tensor(kernel_map: KernelMap) -> Tensor:
    return torch.tensor(kernel_map, dtype=torch.int32).reshape(len(kernel_map), 2)


def check_kernel_map(value: Tensor, kernel_size: int, where: str = "kernel_map") -> KernelMap:
    """Validate a ``kernel_map`` read from a checkpoint; raises :class:`IncompatibleWeightsError`."""
    try:
        taps = normalize_kernel_map(value)
    except ValueError as e:
        raise IncompatibleWeightsError(
            f"{where} is corrupt: {e} A LAMNet kernel map is a [kernel_size, 2] int32 tensor of "
            f"(start, length) pairs; re-export the checkpoint from the original model."
        ) from None
    if len(taps) != kernel_size:
        raise IncompatibleWeightsError(
            f"{where} has {len(taps)} taps, but the layer predicts {kernel_size} tap weights per head "
            f"(kernel_size); the checkpoint is inconsistent or damaged."
        )
    if any(abs(v) >= 2**31 for pair in taps for v in pair):
        raise IncompatibleWeightsError(f"{where} holds values outside the int32 range; it is corrupt.")
    return taps


# --------------------------------------------------------------------------------------------------
# Layers


#: Inference on the CPU: pixels per band of DGFN's wide part. Each band recomputes the rows its 3x3
#: conv reads above and below it: bands of 8192 pixels run LAMNet base 1.08-1.10x / 1.12-1.13x faster at
#: 64² / 128² than bands of 1024 (8 rows of a 128-wide map, a quarter recomputed), 1.01-1.02x on a
#: 768-wide strip (bench/bench_inference_bands.py).
FFN_CHUNK = 8192


def _inference() -> bool:
    """No autograd graph is being built: intermediate tensors may be reused in place."""
    return not torch.is_grad_enabled()


def _cpu_inference(x: Tensor) -> bool:
    """The eager CPU forms (hand-banded depthwise conv, tanh by sigmoid) apply: not under torch.compile,
    whose generated code fuses the plain forms itself."""
    return x.device.type == "cpu" and not torch.is_grad_enabled() and not torch.compiler.is_compiling()


def _scaled_residual(x: Tensor, y: Tensor, alpha: Tensor) -> Tensor:
    """``x + y * alpha``, written into ``y`` (a fresh tensor) when no graph is being built."""
    if _inference() and y.shape == x.shape:
        return torch.addcmul(x, y, alpha, out=y)
    return torch.addcmul(x, y, alpha)


def depthwise_conv_cpu(x: Tensor, conv: nn.Conv2d, band_elements: int | None = None) -> Tensor:
    """``conv(x)`` for a depthwise, stride-1, zero-padded "same" conv, as shifted multiply-adds.

    oneDNN runs such convs on NCHW tensors through layout reorders that cost several times the
    arithmetic; here each kernel tap is one fused multiply-add of a shifted slice of ``x`` into the part
    of the output it reaches (so no padded copy is made), in bands of rows that stay in cache (the
    same band size as :mod:`archs.fsa`). ``x`` ``[B, C, H, W]``.
    """
    weight, bias = conv.weight, conv.bias
    b, c, h, w = x.shape
    kh, kw = weight.shape[-2:]
    ph, pw = conv.padding
    if (kh, kw) != (2 * ph + 1, 2 * pw + 1) or conv.stride != (1, 1) or conv.dilation != (1, 1):
        return conv(x)
    taps = weight.to(x.dtype).reshape(c, kh * kw).t().reshape(kh * kw, 1, c, 1, 1)
    order = [ph * kw + pw] + [t for t in range(kh * kw) if t != ph * kw + pw]  # the centre covers all
    band = CPU_BAND_ELEMENTS * torch.get_num_threads() if band_elements is None else band_elements
    rows = max(1, min(h, band // max(1, c * w)))
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    for i in range(b):
        for r0 in range(0, h, rows):
            r1 = min(h, r0 + rows)
            for t in order:
                dy, dx = t // kw - ph, t % kw - pw
                ya, yb = max(r0, -dy), min(r1, h - dy)  # output rows whose source row is inside
                xa, xb = max(0, -dx), min(w, w - dx)
                if ya >= yb or xa >= xb:
                    continue
                target = out[i : i + 1, :, ya:yb, xa:xb]
                src = x[i : i + 1, :, ya + dy : yb + dy, xa + dx : xb + dx]
                if t == order[0]:
                    torch.mul(src, taps[t], out=target)
                else:
                    target.addcmul_(src, taps[t])
            if bias is not None:
                out[i : i + 1, :, r0:r1].add_(bias.to(x.dtype).view(1, c, 1, 1))
    return out


class LayerNormUnchanged(nn.Module):
    """Layer norm over channels of ``[B, C, H, W]`` (population variance), learned ``alpha``/``beta`` ``[1, C, 1, 1]``."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.alpha = nn.Parameter(torch.ones(1, dim, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, dim, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float16:  # var_mean accumulates in float32: squares above 65504 stay finite
            var, mean = torch.var_mean(x, dim=1, keepdim=True, correction=0)
            centred = x - mean
        else:  # two means over channels: several times faster than torch.var_mean on the CPU
            centred = x - x.mean(dim=1, keepdim=True)
            var = (centred * centred).mean(dim=1, keepdim=True)
        if _inference():  # in place: fewer fresh tensors, whose first touch costs page faults on the CPU
            centred.mul_(torch.rsqrt(var.add_(self.eps)))
            return torch.addcmul(self.beta, centred, self.alpha, out=centred)
        return torch.addcmul(self.beta, centred * torch.rsqrt(var + self.eps), self.alpha)


class PreNormResidual(nn.Module):
    """``x + alpha * fn(norm(x))``."""

    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm = LayerNormUnchanged(dim)
        self.fn = fn
        self.alpha = nn.Parameter(torch.ones(1, dim, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return _scaled_residual(x, self.fn(self.norm(x)), self.alpha)

    def forward_tokens(self, x: Tensor, size: tuple[int, int, int]) -> Tensor:
        """Inference form on tokens ``[B*H*W, C]`` (a new tensor): the norm's ``alpha``/``beta`` and the
        residual's ``alpha`` fold into the branch's first and last weights."""
        normed = F.layer_norm(x, (x.shape[1],), None, None, self.norm.eps)
        return self.fn.add_tokens(x, normed, size, self.norm, self.alpha)


class DGFN(nn.Module):
    """Dual-gate feed-forward: ``project_out(cat[gelu(x1) * x1, gelu(x1) * x2])``, ``x1, x2`` from a 1x1 + dw3x3."""

    def __init__(self, dim: int, expansion_factor: float, bias: bool = True):
        super().__init__()
        hidden = int(dim * expansion_factor)
        self.project_in = nn.Conv2d(dim, hidden * 2, 1, bias=bias)
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, 3, padding=1, groups=hidden * 2, bias=bias)
        self.project_out = nn.Conv2d(hidden * 2, dim, 1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.project_in(x)
        x = depthwise_conv_cpu(x, self.dwconv) if _cpu_inference(x) else self.dwconv(x)
        b, c, h, w = x.shape
        both = x.view(b, 2, c // 2, h, w)
        gate = F.gelu(both[:, :1])  # one gate for both halves: cat[g*x1, g*x2] = cat[x1, x2] * g
        gated = both.mul_(gate) if _inference() else both * gate
        return self.project_out(gated.view(b, c, h, w))

    def add_tokens(self, x: Tensor, normed: Tensor, size, norm: LayerNormUnchanged, alpha: Tensor) -> Tensor:
        """``x + alpha * DGFN(norm.alpha * normed + norm.beta)`` on tokens ``[B*H*W, C]``, a new tensor;
        in bands of about :data:`FFN_CHUNK` pixels (each with the rows its 3x3 conv reads), so the
        2x-wide activations stay bounded on large tiles."""
        b, h, w = size
        c = x.shape[1]
        hidden2 = self.project_in.out_channels

        def fold():
            w_in = self.project_in.weight.view(hidden2, c)
            b_in = w_in @ norm.beta.view(c)
            w_out = self.project_out.weight.view(c, hidden2) * alpha.view(c, 1)
            return ((w_in * norm.alpha.view(1, c)).contiguous(),
                    b_in if self.project_in.bias is None else b_in + self.project_in.bias,
                    w_out.contiguous(), None if self.project_out.bias is None else self.project_out.bias * alpha.view(c))

        sources = [self.project_in.weight, self.project_in.bias, self.project_out.weight, self.project_out.bias,
                   norm.alpha, norm.beta, alpha]
        w_in, b_in, w_out, b_out = derived(self, "tokens", [t for t in sources if t is not None], fold)
        half = hidden2 // 2
        out = torch.empty_like(x)
        for rows, inner, start in onednn.row_bands(b, h, w, FFN_CHUNK, 1):  # with the rows dwconv reads
            band = onednn.linear(normed[rows], w_in, b_in)
            band = onednn.tokens(onednn.depthwise_conv(onednn.image(band, 1, band.shape[0] // w, w), self.dwconv))[inner]
            band.view(-1, 2, half).mul_(F.gelu(band[:, :half]).unsqueeze(1))
            end = start + band.shape[0]
            out[start:end] = onednn.linear_add(band, x[start:end], w_out, b_out)
        return out


class SpatialInteraction(nn.Module):
    """Gate each pixel of ``channel_map`` by how it aligns with ``spatial_map``'s channel means ([B, C, HW])."""

    def gate(self, channel_map: Tensor, spatial_map: Tensor) -> Tensor:
        means = spatial_map.mean(dim=-1).unsqueeze(1)  # [B, 1, C]
        return torch.sigmoid(means @ channel_map / spatial_map.size(1))  # [B, 1, HW]

    def forward(self, channel_map: Tensor, spatial_map: Tensor) -> Tensor:
        return self.gate(channel_map, spatial_map) * channel_map


class ChannelInteraction(nn.Module):
    """Gate each channel of ``spatial_map`` by how it aligns with ``channel_map``'s pixel means ([B, C, HW])."""

    def gate(self, channel_map: Tensor, spatial_map: Tensor) -> Tensor:
        # divide before the sum over pixels (the reference divides after): equal, and no fp16 overflow
        means = channel_map.mean(dim=1).unsqueeze(2) / spatial_map.size(2)  # [B, HW, 1]
        return torch.sigmoid(spatial_map @ means)  # [B, C, 1]

    def forward(self, channel_map: Tensor, spatial_map: Tensor) -> Tensor:
        return self.gate(channel_map, spatial_map) * spatial_map


def _tanh(x: Tensor) -> Tensor:
    """``tanh`` of a fresh tensor, which it may overwrite. On the CPU without autograd it is computed
    as ``2 * sigmoid(2x) - 1``: equal to within about 1e-7, and several times faster there."""
    if not _cpu_inference(x):
        return torch.tanh(x)
    return x.mul_(2).sigmoid_().mul_(2).sub_(1)


class LSAMixer(nn.Module):
    """Linear spatial-adaptive mixer: a channel branch and a horizontal-then-vertical FSA branch.

    ``kernel_map`` (int32 buffer ``[K, 2]``, part of the state dict) holds each tap's ``(start, length)``;
    the forward pass uses the buffer's current values (checked when a state dict is loaded).
    """

    def __init__(self, dim: int, kernel_size: int, kernel_map: KernelMap, patch_size: int, num_heads: int):
        super().__init__()
        if dim % (2 * num_heads):
            raise ValueError(f"dim ({dim}) must be divisible by 2 * num_head ({2 * num_heads}).")
        if len(kernel_map) != kernel_size:
            raise ValueError(f"kernel_map has {len(kernel_map)} taps but kernel_size is {kernel_size}.")
        if patch_size < 1 or patch_size % 2 != 1:
            raise ValueError(f"patch_size must be a positive odd number, got {patch_size}.")
        half = dim // 2
        self.kernel_size = kernel_size
        self.groups = num_heads
        self.dim = half
        self.groups_dim = half // num_heads
        self.patch_size = patch_size
        self.register_buffer("kernel_map", _kernel_map_tensor(kernel_map))
        self._taps: KernelMap = tuple(kernel_map)
        self._taps_key: tuple | None = None

        self.proj_in = nn.Conv2d(dim, dim, 1)
        self.h_kernel = nn.Sequential(
            nn.Conv2d(half, half, (1, patch_size), padding=(0, patch_size // 2), groups=half),
            nn.Conv2d(half, num_heads * kernel_size, 1),
        )
        self.v_kernel = nn.Sequential(
            nn.Conv2d(half, half, (patch_size, 1), padding=(patch_size // 2, 0), groups=half),
            nn.Conv2d(half, num_heads * kernel_size, 1),
        )
        self.channel_branch = nn.Sequential(nn.Conv2d(half, dim // 4, 1), nn.ReLU(inplace=True), nn.Conv2d(dim // 4, half, 1))
        self.spatial_interaction = SpatialInteraction()
        self.channel_interaction = ChannelInteraction()
        self.proj_out = nn.Conv2d(dim, dim, 1)

    def taps(self) -> KernelMap:
        """The kernel map as Python pairs, re-read whenever the buffer changes (load, in-place edit, move).

        On the CPU the buffer's values are the cache key (a few dozen ints); elsewhere its storage and
        version counter are, so that no forward pass waits on a device-to-host copy. (Inference tensors
        keep no version counter: there, only loads and moves are noticed.)
        """
        buf = self.kernel_map
        if buf.device.type == "meta" or torch.compiler.is_compiling():
            # compiled: the map of the constructor or the last loaded state dict (reading the buffer's
            # values is not traceable; dynamo guards on this tuple, so a new one recompiles)
            return self._taps
        if buf.device.type == "cpu":
            key: tuple = tuple(buf.flatten().tolist())
        else:
            key = (buf.device, buf.data_ptr(), None if buf.is_inference() else buf._version)
        if key != self._taps_key:
            self._taps = normalize_kernel_map(buf)
            self._taps_key = key
        return self._taps

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        key = prefix + "kernel_map"
        if key in state_dict:
            check_kernel_map(state_dict[key], self.kernel_size, where=f"'{key}'")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        self._taps_key = None  # re-read the (possibly new) values at the next forward pass
        if key in state_dict and state_dict[key].device.type != "meta":
            self._taps = normalize_kernel_map(state_dict[key])  # already current for a compiled forward

    def _horizontal_patch_conv(self, x: Tensor) -> Tensor:
        """``h_kernel[0]`` (depthwise 1 x P), run as a P x 1 conv on the transposed map: the same sums,
        and oneDNN's depthwise conv is several times faster along H than along W on the CPU."""
        conv = self.h_kernel[0]
        if x.device.type != "cpu":
            return conv(x)
        weight = conv.weight.transpose(2, 3)
        out = F.conv2d(x.transpose(2, 3), weight, conv.bias, padding=conv.padding[::-1], groups=conv.groups)
        return out.transpose(2, 3)

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        taps = self.taps()
        x1, x2 = self.proj_in(x).chunk(2, dim=1)
        x_conv = self.channel_branch(x1)
        kernel_h = _tanh(self.h_kernel[1](self._horizontal_patch_conv(x2)))
        attn_h = fsa_spatial(x2, kernel_h, taps, self.groups, "horizontal")
        attn = fsa_spatial(attn_h, _tanh(self.v_kernel(attn_h)), taps, self.groups, "vertical")
        x_conv = x_conv.reshape(b, self.dim, h * w)
        attn = attn.reshape(b, self.dim, h * w)
        if _inference():  # both gated maps written straight into the concatenation
            mixed = x_conv.new_empty(b, 2 * self.dim, h * w)
            torch.mul(self.spatial_interaction.gate(x_conv, attn), x_conv, out=mixed[:, : self.dim])
            torch.mul(self.channel_interaction.gate(x_conv, attn), attn, out=mixed[:, self.dim :])
            return self.proj_out(mixed.view(b, 2 * self.dim, h, w))
        spatial_map = self.spatial_interaction(x_conv, attn).view(b, self.dim, h, w)
        channel_map = self.channel_interaction(x_conv, attn).view(b, self.dim, h, w)
        return self.proj_out(torch.cat([spatial_map, channel_map], dim=1))

    def add_tokens(self, x: Tensor, normed: Tensor, size, norm: LayerNormUnchanged, alpha: Tensor) -> Tensor:
        """``x + alpha * LSAMixer(norm.alpha * normed + norm.beta)`` on tokens ``[B*H*W, C]``, a new tensor.

        Every conv works on tokens (1x1 convs on oneDNN, depthwise convs channels-last); the FSA op works
        on ``[B, C/2, H, W]`` maps (fastest there): the kernel-predicting 1x1 convs write maps straight
        from tokens (:func:`onednn.linear_to_maps`), the horizontal pass's output is turned into tokens
        once for ``v_kernel``, and the gated FSA output is written straight into ``proj_out``'s input.
        """
        b, h, w = size
        hw, c, half = h * w, x.shape[1], self.dim
        taps = self.taps()

        def fold():
            w_in = self.proj_in.weight.view(c, c)
            b_in = self.proj_in.bias + w_in @ norm.beta.view(c)
            w_in = w_in * norm.alpha.view(1, c)
            w_out = self.proj_out.weight.view(c, c) * alpha.view(c, 1)
            return (w_in[:half].contiguous(), b_in[:half].contiguous(), w_in[half:].contiguous(),
                    b_in[half:].contiguous(), w_out.contiguous(), self.proj_out.bias * alpha.view(c))

        sources = [self.proj_in.weight, self.proj_in.bias, self.proj_out.weight, self.proj_out.bias,
                   norm.alpha, norm.beta, alpha]
        w1, b1, w2, b2, w_out, b_out = derived(self, "tokens", sources, fold)
        x1 = onednn.linear(normed, w1, b1)
        branch = self.channel_branch
        x_conv = onednn.linear(onednn.linear(x1, branch[0].weight.flatten(1), branch[0].bias, "relu"),
                               branch[2].weight.flatten(1), branch[2].bias)  # [N, C/2]
        x2 = onednn.linear(normed, w2, b2)  # tokens [N, C/2]
        patch = onednn.tokens(onednn.depthwise_conv(onednn.image(x2, b, h, w), self.h_kernel[0]))
        conv = self.h_kernel[1]
        kernel_h = _tanh(onednn.linear_to_maps(patch, conv.weight.flatten(1), conv.bias, b)).view(b, -1, h, w)
        x2 = x2.view(b, hw, half).transpose(1, 2).reshape(b, half, h, w)  # maps, for the FSA op
        attn_h = fsa_spatial(x2, kernel_h, taps, self.groups, "horizontal")
        patch = attn_h.permute(0, 2, 3, 1).contiguous()  # tokens, for the channels-last depthwise conv
        patch = onednn.tokens(onednn.depthwise_conv(onednn.image(patch.view(-1, half), b, h, w), self.v_kernel[0]))
        conv = self.v_kernel[1]
        kernel_v = _tanh(onednn.linear_to_maps(patch, conv.weight.flatten(1), conv.bias, b)).view(b, -1, h, w)
        attn = fsa_spatial(attn_h, kernel_v, taps, self.groups, "vertical").view(b, half, hw)
        x_conv = x_conv.view(b, hw, half)
        spatial_gate = torch.sigmoid(x_conv @ (attn.mean(-1) / half).unsqueeze(-1))  # [B, HW, 1]
        channel_gate = torch.sigmoid(attn @ (x_conv.mean(-1) / hw).unsqueeze(-1))  # [B, C/2, 1]
        mixed = torch.empty_like(x).view(b, hw, c)  # the concatenation, both gates applied, as tokens
        torch.mul(x_conv, spatial_gate, out=mixed[..., :half])
        torch.mul(attn.transpose(1, 2), channel_gate.transpose(1, 2), out=mixed[..., half:])
        return onednn.linear_add(mixed.view(-1, c), x, w_out, b_out)


class LAMixerBlock(nn.Module):
    """``num_blocks`` x [pre-norm LSAMixer, pre-norm DGFN], then ``x + alpha * mixers(x)``."""

    def __init__(self, dim, num_blocks, kernel_size, kernel_map, patch_size, num_head, expansion_factor):
        super().__init__()
        body = []
        for _ in range(num_blocks):
            body.append(PreNormResidual(dim, LSAMixer(dim, kernel_size, kernel_map, patch_size, num_head)))
            body.append(PreNormResidual(dim, DGFN(dim, expansion_factor, bias=True)))
        self.mixers = nn.Sequential(*body)
        self.alpha = nn.Parameter(torch.ones(1, dim, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return _scaled_residual(x, self.mixers(x), self.alpha)

    def forward_tokens(self, x: Tensor, size: tuple[int, int, int]) -> Tensor:
        y = x
        for layer in self.mixers:
            y = layer.forward_tokens(y, size)
        return torch.addcmul(x, y, self.alpha.view(-1), out=y)


class UpsampleOneStep(nn.Sequential):
    """conv3 (dim -> out * scale^2) + PixelShuffle(scale)."""

    def __init__(self, scale: int, num_feat: int, num_out_ch: int):
        super().__init__(nn.Conv2d(num_feat, scale**2 * num_out_ch, 3, 1, 1), nn.PixelShuffle(scale))


@store_hyperparameters()
class LAMNet(nn.Module):
    """LAMNet: ``[B, in_chans, H, W]`` (0..1) -> ``[B, in_chans, H*upscale, W*upscale]``; any H, W >= 1.

    Args (the reference's names): ``in_chans``, ``num_blocks`` (mixer blocks per group), ``num_groups``,
    ``dim``, ``kernel_size`` (FSA taps), ``kernel_loc`` / ``kernel_stride`` (the kernel map's layout, see
    :func:`generate_kernel_map`), ``num_head`` (FSA channel groups), ``expansion_factor`` (DGFN width),
    ``upscale``, ``img_range``, ``rgb_mean`` (subtracted when it has ``in_chans`` values, else nothing is).
    FlexSR additions: ``kernel_map`` (explicit ``(start, length)`` pairs, for maps that ``kernel_loc`` /
    ``kernel_stride`` cannot express; pass those two as None then) and ``patch_size`` (of the
    kernel-predicting convs; default: the map's reach, as in the reference).

    Defaults are the released LAMNet (base) at x4. (The reference's own defaults, kernel_size 11 with
    kernel_loc [3, 4, 5], fail its own consistency check.) Presets: :func:`LAMNet_base`, :func:`LAMNet_large`.
    """

    def __init__(
        self,
        *,
        in_chans: int = 3,
        num_blocks: int = 6,
        num_groups: int = 4,
        dim: int = 64,
        kernel_size: int = 13,
        kernel_loc: Sequence[int] | None = (4, 6, 7),
        kernel_stride: Sequence[int] | None = (1, 2, 4),
        num_head: int = 4,
        expansion_factor: float = 1.0,
        upscale: int = 4,
        img_range: float = 1.0,
        rgb_mean: Sequence[float] = (0.4488, 0.4371, 0.4040),
        kernel_map: Sequence[Sequence[int]] | None = None,
        patch_size: int | None = None,
    ):
        super().__init__()
        if kernel_map is None:
            if kernel_loc is None or kernel_stride is None:
                raise ValueError("LAMNet needs kernel_loc and kernel_stride, or an explicit kernel_map.")
            taps, default_patch = generate_kernel_map(kernel_size, kernel_stride, kernel_loc)
        else:
            taps = normalize_kernel_map(kernel_map)
            default_patch = _reach_patch(taps)
        patch_size = default_patch if patch_size is None else patch_size
        self.in_chans = in_chans
        self.upscale = upscale
        self.img_range = img_range
        mean = rgb_mean if len(rgb_mean) == in_chans else [0.0] * in_chans
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, in_chans, 1, 1), persistent=False)

        self.shallow_feature_extraction = nn.Conv2d(in_chans, dim, 3, 1, 1)
        body: list[nn.Module] = [
            LAMixerBlock(dim, num_blocks, kernel_size, taps, patch_size, num_head, expansion_factor)
            for _ in range(num_groups)
        ]
        body.append(nn.Conv2d(dim, dim, 3, 1, 1))
        self.deep_feature_extraction = nn.Sequential(*body)
        self.alpha = nn.Parameter(torch.ones(1, dim, 1, 1))
        self.upsample = UpsampleOneStep(upscale, dim, in_chans)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Conv2d):  # the reference: truncated normal (std 0.02), zero bias
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled() and onednn.available(x):
            return self._infer(x)
        mean = self.mean.to(x.dtype)
        x = (x - mean) * self.img_range
        x = self.shallow_feature_extraction(x)
        x = _scaled_residual(x, self.deep_feature_extraction(x), self.alpha)
        x = self.upsample(x)
        return x / self.img_range + mean

    def _infer(self, x: Tensor) -> Tensor:
        """Inference form (no autograd, float32 CPU): channels-last tokens ``[B*H*W, C]`` through the
        body, 1x1 convs on oneDNN, norm and residual scales folded into neighbouring weights. Same
        numbers as the reference graph to float rounding."""
        b, _, h, w = x.shape
        mean = self.mean.to(x.dtype)
        x = ((x - mean) * self.img_range).contiguous(memory_format=torch.channels_last)
        feat = self.shallow_feature_extraction(x)
        y = onednn.tokens(feat)
        body = self.deep_feature_extraction
        for group in body[:-1]:
            y = group.forward_tokens(y, (b, h, w))
        deep = body[-1](onednn.image(y, b, h, w))
        x = self.upsample(torch.addcmul(feat, deep, self.alpha))
        return x / self.img_range + mean


def LAMNet_base(scale: int = 4, **overrides) -> LAMNet:
    """The released LAMNet: 828,364 / 837,019 / 849,136 parameters at x2 / x3 / x4."""
    return LAMNet(**{**PRESETS["base"], "upscale": scale, **overrides})


def LAMNet_large(scale: int = 4, **overrides) -> LAMNet:
    """The released LAMNet-L (5 groups): 1,024,028 / 1,032,683 / 1,044,800 parameters at x2 / x3 / x4."""
    return LAMNet(**{**PRESETS["large"], "upscale": scale, **overrides})


# --------------------------------------------------------------------------------------------------
# spandrel


_MIXER = "deep_feature_extraction.0.mixers.0.fn."
_FFN = "deep_feature_extraction.0.mixers.1.fn."


class LAMNetArch(FlexSRArchitecture):
    """spandrel support for LAMNet checkpoints (reference ``params_ema`` state dicts)."""

    def __init__(self) -> None:
        super().__init__(
            id="LAMNet",
            name="LAMNet",
            detect=KeyCondition.has_all(
                "shallow_feature_extraction.weight",
                "deep_feature_extraction.0.alpha",
                "deep_feature_extraction.0.mixers.0.norm.alpha",
                "deep_feature_extraction.0.mixers.0.alpha",
                _MIXER + "kernel_map",
                _MIXER + "proj_in.weight",
                _MIXER + "h_kernel.0.weight",
                _MIXER + "h_kernel.1.weight",
                _MIXER + "v_kernel.0.weight",
                _MIXER + "channel_branch.0.weight",
                _MIXER + "proj_out.weight",
                _FFN + "project_in.weight",
                _FFN + "dwconv.weight",
                _FFN + "project_out.weight",
                "alpha",
                "upsample.0.weight",
            ),
        )

    def signature_model(self) -> LAMNet:
        return LAMNet(num_blocks=1, num_groups=1, dim=16, kernel_size=3, kernel_loc=(2,), kernel_stride=(1,), num_head=2)

    def load(self, state_dict: StateDict) -> ImageModelDescriptor[LAMNet]:
        dim, in_chans = state_dict["shallow_feature_extraction.weight"].shape[:2]
        num_groups = get_seq_len(state_dict, "deep_feature_extraction") - 1
        if num_groups < 1 or f"deep_feature_extraction.{num_groups}.weight" not in state_dict:
            raise IncompatibleWeightsError(
                "LAMNet checkpoint: could not find the conv that closes deep_feature_extraction; keys are missing."
            )
        num_blocks = get_seq_len(state_dict, "deep_feature_extraction.0.mixers") // 2
        heads_x_taps = state_dict[_MIXER + "h_kernel.1.weight"].shape[0]
        raw_map = state_dict[_MIXER + "kernel_map"]
        if raw_map.dim() != 2 or raw_map.shape[0] < 1 or heads_x_taps % raw_map.shape[0]:
            raise IncompatibleWeightsError(
                f"'{_MIXER}kernel_map' has shape {list(raw_map.shape)}, which does not fit the "
                f"{heads_x_taps} tap weights per pixel that h_kernel predicts; the checkpoint is corrupt."
            )
        kernel_size = raw_map.shape[0]
        num_head = heads_x_taps // kernel_size
        taps = check_kernel_map(raw_map, kernel_size, where=f"'{_MIXER}kernel_map'")
        for key, value in state_dict.items():
            if key.endswith(".fn.kernel_map") and check_kernel_map(value, kernel_size, f"'{key}'") != taps:
                raise IncompatibleWeightsError(
                    f"'{key}' differs from '{_MIXER}kernel_map'; LAMNet layers share one kernel map."
                )
        patch_size = state_dict[_MIXER + "h_kernel.0.weight"].shape[-1]
        hidden = state_dict[_FFN + "project_in.weight"].shape[0] // 2
        out_chans = state_dict["upsample.0.weight"].shape[0]
        upscale = math.isqrt(out_chans // in_chans)
        if upscale * upscale * in_chans != out_chans:
            raise IncompatibleWeightsError(
                f"LAMNet checkpoint: upsample.0 has {out_chans} outputs, not in_chans * scale^2 for in_chans {in_chans}."
            )

        layout = kernel_layout_of(taps)
        params: dict = dict(
            in_chans=in_chans,
            num_blocks=num_blocks,
            num_groups=num_groups,
            dim=dim,
            kernel_size=kernel_size,
            num_head=num_head,
            expansion_factor=_expansion_factor(hidden, dim),
            upscale=upscale,
        )
        if layout is not None and generate_kernel_map(kernel_size, layout[1], layout[0])[1] == patch_size:
            params.update(kernel_loc=layout[0], kernel_stride=layout[1])
        else:  # a map the reference's layout cannot express: kept as explicit pairs
            params.update(kernel_loc=None, kernel_stride=None, kernel_map=[list(t) for t in taps])
            if patch_size != _reach_patch(taps):
                params["patch_size"] = patch_size
        model = LAMNet(**params)
        model.load_state_dict(state_dict)

        preset = next(
            (name for name, p in PRESETS.items() if all(_same(params.get(k), v) for k, v in p.items())), None
        )
        tags = [t for t in (preset,) if t] + [
            f"{dim}dim",
            f"{num_groups}x{num_blocks}blocks",
            f"{num_head}heads",
            f"{kernel_size}taps",
        ]
        return self.sr_descriptor(model, state_dict, scale=upscale, tags=tags, input_channels=in_chans,
                                  output_channels=in_chans)


def _same(a, b) -> bool:
    norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    return norm(a) == norm(b)


def _expansion_factor(hidden: int, dim: int) -> float:
    """A float ``f`` with ``int(dim * f) == hidden`` (the reference computes the width that way)."""
    f = hidden / dim
    while int(dim * f) < hidden:
        f = math.nextafter(f, math.inf)
    return f


ARCHITECTURES = (LAMNetArch(),)

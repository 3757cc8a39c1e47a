"""Building blocks shared by several families: OmniShift, window partitioning, padding helpers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .reparam import ReparamModule, derived, inference_path


class OmniShift(ReparamModule):
    """Restore-RWKV's OmniShift: a learned mix of identity, depthwise 1x1, 3x3 and 5x5 convolutions.

    Training form: ``a0*x + a1*conv1x1(x) + a2*conv3x3(x) + a3*conv5x5(x)`` on ``[B, dim, H, W]``.
    Fused form (after :func:`archs.fuse`): one 5x5 depthwise conv whose kernel, ``conv5x5_reparam.weight``,
    is recomputed from the branches whenever weights are loaded or the module is switched to eval.
    """

    def __init__(self, dim: int = 48):
        super().__init__()
        self.conv1x1 = nn.Conv2d(dim, dim, 1, groups=dim, bias=False)
        self.conv3x3 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False)
        self.conv5x5 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim, bias=False)
        self.alpha = nn.Parameter(torch.randn(4))
        self.conv5x5_reparam = nn.Conv2d(dim, dim, 5, padding=2, groups=dim, bias=False)
        self.conv5x5_reparam.weight.requires_grad_(False)

    def fused_kernel(self) -> Tensor:
        """The single 5x5 depthwise kernel ``[dim, 1, 5, 5]`` equal to the four branches."""
        w1 = F.pad(self.conv1x1.weight, (2, 2, 2, 2))
        w3 = F.pad(self.conv3x3.weight, (1, 1, 1, 1))
        identity = F.pad(torch.ones_like(self.conv1x1.weight), (2, 2, 2, 2))
        a = self.alpha
        return a[0] * identity + a[1] * w1 + a[2] * w3 + a[3] * self.conv5x5.weight

    def inference_kernel(self, scale: Tensor | None = None) -> Tensor:
        """The fused 5x5 kernel (the fused weights once fused, else derived from the branches), times a
        per-input-channel ``scale`` when given (a preceding RMSNorm's weight folds in here); cached."""
        sources = [self.conv5x5_reparam.weight] if self.fused else [self.alpha, self.conv1x1.weight,
                                                                   self.conv3x3.weight, self.conv5x5.weight]
        if scale is not None:
            sources.append(scale)

        def compute() -> Tensor:
            k = self.conv5x5_reparam.weight if self.fused else self.fused_kernel()
            return (k * scale.view(-1, 1, 1, 1) if scale is not None else k).contiguous()

        return derived(self, "kernel", sources, compute)

    def _refresh_fused(self) -> None:
        self.conv5x5_reparam.weight.copy_(self.fused_kernel())

    def forward(self, x: Tensor) -> Tensor:
        if inference_path(self):  # eval without autograd: one 5x5 conv, fused by the Fuse node or not
            return F.conv2d(x, self.inference_kernel(), padding=2, groups=x.shape[1])
        if self.fused and not self.training:
            return self.conv5x5_reparam(x)
        a = self.alpha
        return a[0] * x + a[1] * self.conv1x1(x) + a[2] * self.conv3x3(x) + a[3] * self.conv5x5(x)


def _onednn_linear_op():
    """``torch.ops.mkldnn._linear_pointwise`` where this torch build has it (oneDNN on x86/ARM CPUs), else None."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


_ONEDNN_LINEAR = _onednn_linear_op()
#: Below this many multiply-accumulates a oneDNN call's fixed cost (~12 µs) outweighs its faster kernel.
_ONEDNN_MIN_MACS = 1 << 20


#: Activations oneDNN fuses into its matmul (``act`` of :func:`fast_linear`), with their in-place fallbacks.
_FALLBACK_ACT = {"gelu": torch.ops.aten.gelu_, "relu": torch.relu_, "sigmoid": torch.sigmoid_}


def fast_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, gelu: bool = False, act: str = "none"
) -> Tensor:
    """``F.linear(x, weight, bias)``, followed by ``act`` (``"gelu"`` (exact; also ``gelu=True``),
    ``"relu"``, ``"sigmoid"`` or ``"none"``): for inference forms only.

    On a CPU in float32 it runs oneDNN's matmul (the kernel behind PyTorch's CPU convolutions, with the
    activation fused into it) instead of the BLAS one behind ``F.linear``: the same numbers to float rounding,
    measured 1.8x the GEMM throughput of ``F.linear`` on one AVX-512 CPU (``bench/bench_vs_reference.py``), the
    same on another whose BLAS took its fast paths.
    Elsewhere (other devices and dtypes, a torch without oneDNN, products too small to gain) it is
    ``F.linear`` and the activation in place.
    Not differentiable: call it only where autograd is off.
    """
    act = "gelu" if gelu else act
    if act != "none" and act not in _FALLBACK_ACT:
        raise ValueError(f"fast_linear: unknown activation {act!r} (one of none, {', '.join(_FALLBACK_ACT)})")
    if (
        _ONEDNN_LINEAR is not None
        # not under torch.compile: inductor lowers this op only with constant weights (folded ones are
        # computed in the graph), and lowers F.linear and the activation itself
        and not torch.compiler.is_compiling()
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and weight.dtype == torch.float32
        and torch.backends.mkldnn.enabled
        and x.numel() * weight.shape[0] >= _ONEDNN_MIN_MACS
    ):
        # a weight with other strides (a column slice) takes a reference path in oneDNN ~500x slower
        weight = weight if weight.is_contiguous() else weight.contiguous()
        return _ONEDNN_LINEAR(x, weight, bias, act, [], "none" if act == "gelu" else "")
    y = F.linear(x, weight, bias)
    return y if act == "none" else _FALLBACK_ACT[act](y)


def pad_to_multiple(x: Tensor, multiple: int, mode: str = "reflect") -> Tensor:
    """Pad ``[B, C, H, W]`` on the bottom/right so H and W become multiples of ``multiple``.

    Reflect padding needs the pad to be smaller than the size; for tiny inputs it is applied in
    several rounds (each at most size-1), and 1-pixel inputs fall back to replicate padding.
    """
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x
    if mode != "reflect":
        return F.pad(x, (0, pw, 0, ph), mode=mode)
    while ph > 0 or pw > 0:
        h, w = x.shape[-2:]
        sh = min(ph, h - 1) if h > 1 else 0
        sw = min(pw, w - 1) if w > 1 else 0
        if sh == 0 and sw == 0:  # a 1-pixel side cannot be reflected
            return F.pad(x, (0, pw, 0, ph), mode="replicate")
        x = F.pad(x, (0, sw, 0, sh), mode="reflect")
        ph, pw = ph - sh, pw - sw
    return x


def window_partition(x: Tensor, window: int) -> Tensor:
    """``[B, C, H, W]`` (H, W multiples of ``window``) -> ``[B*nW, window*window, C]`` tokens per window."""
    return rearrange(x, "b c (nh wh) (nw ww) -> (b nh nw) (wh ww) c", wh=window, ww=window)


def window_reverse(windows: Tensor, window: int, h: int, w: int) -> Tensor:
    """Inverse of :func:`window_partition`: ``[B*nW, window*window, C]`` -> ``[B, C, H, W]``."""
    return rearrange(
        windows, "(b nh nw) (wh ww) c -> b c (nh wh) (nw ww)", nh=h // window, nw=w // window, wh=window, ww=window
    )

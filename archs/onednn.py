"""CPU inference building blocks that keep float32 work on oneDNN, for token-major (channels-last) maps.

On the CPU, torch runs a 1x1 convolution or ``F.linear`` in float32 through its BLAS (MKL), whose
kernels reach ~35-45 % of a 3x3 convolution's multiply-add rate on the development machine (an AMD
EPYC with AVX-512, where MKL does not take its fastest paths); oneDNN's matmul, the library behind
torch's convolutions, reaches ~75-85 % on the same shapes and can apply an activation or add a
residual as it writes its output. ``torch.ops.mkldnn._linear_pointwise`` is that matmul (the op
torch's own compiler emits for linear layers on the CPU). Everything here falls back to plain torch
ops wherever oneDNN is not there, is switched off (``torch.backends.mkldnn.enabled``), autocast is on,
or the tensors are not float32 CPU tensors; results agree with the plain ops to float rounding.

Tokens are ``[N, C]`` with ``N = B*H*W`` in row-major pixel order: the memory of a channels-last image,
so :func:`image` and :func:`tokens` turn one into the other without a copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "available", "linear", "linear_add", "linear_to_maps", "image", "tokens", "row_bands", "depthwise_conv",
    "depthwise_gated",
]

_ACTIVATIONS = {
    "none": lambda t: t,
    "gelu": F.gelu,
    "swish": F.silu,
    "relu": F.relu,
}
_ALGORITHM = {"gelu": "none"}  # erf GELU, as F.gelu's default
_OP = None


def _linear_op():
    global _OP
    if _OP is None:
        op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
        _OP = op if op is not None and torch.backends.mkldnn.is_available() else False
    return _OP


def available(x: Tensor) -> bool:
    """True where :func:`linear` runs on oneDNN for ``x``: float32 on the CPU, oneDNN built and enabled,
    and no autocast (which the models' reference graphs follow; these ops would stay float32)."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and torch.backends.mkldnn.enabled
        and not torch.is_autocast_enabled("cpu")
        and bool(_linear_op())
    )


def _eager(x: Tensor) -> bool:
    """:func:`available`, and not being traced by ``torch.compile``: inductor lowers these oneDNN ops only
    with constant weights (the folded ones here are computed in the graph), and fuses the plain ops itself."""
    return available(x) and not torch.compiler.is_compiling()


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str = "none") -> Tensor:
    """``activation(x @ weight.T + bias)``, ``x`` ``[N, Cin]``, ``weight`` ``[Cout, Cin]`` -> ``[N, Cout]``.

    ``activation``: ``"none"``, ``"gelu"`` (erf), ``"swish"`` (SiLU) or ``"relu"``.
    """
    if _eager(x):
        return _linear_op()(x, weight, bias, activation, [], _ALGORITHM.get(activation, ""))
    return _ACTIVATIONS[activation](F.linear(x, weight, bias))


def linear_add(x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``residual + x @ weight.T + bias`` as a new tensor (``residual`` ``[N, Cout]`` is left alone)."""
    if _eager(x) and residual.dtype == x.dtype and residual.is_contiguous():
        return _linear_op().binary(x, residual, weight, bias, "add")
    return torch.addmm(residual, x, weight.t()) if bias is None else torch.addmm(residual + bias, x, weight.t())


def linear_to_maps(t: Tensor, weight: Tensor, bias: Tensor | None, b: int) -> Tensor:
    """A 1x1 conv from tokens ``t`` ``[B*HW, Cin]`` to maps ``[B, Cout, HW]`` (``weight @ t.T + bias``
    per image). On oneDNN the weight is the matmul's input and the tokens its weight, so the result
    comes out channel-major with no transpose."""
    n = t.shape[0] // b
    if _eager(t) and t.is_contiguous():
        op = _linear_op()
        maps = [op(weight, t[i * n : (i + 1) * n], None, "none", [], "") for i in range(b)]
        out = maps[0].unsqueeze(0) if b == 1 else torch.stack(maps)
        return out if bias is None else out.add_(bias.view(1, -1, 1))
    out = torch.matmul(weight, t.view(b, n, -1).transpose(1, 2))
    return out if bias is None else out.add_(bias.view(1, -1, 1))


def image(t: Tensor, b: int, h: int, w: int) -> Tensor:
    """Tokens ``[B*H*W, C]`` as a channels-last ``[B, C, H, W]`` view."""
    return t.view(b, h, w, t.shape[-1]).permute(0, 3, 1, 2)


def tokens(x: Tensor) -> Tensor:
    """``[B, C, H, W]`` as tokens ``[B*H*W, C]``: a view of a channels-last map, else one copy."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def row_bands(b: int, h: int, w: int, pixels: int, halo: int):
    """Bands of image rows holding about ``pixels`` pixels each (but at least ``8 * halo`` rows, so that
    wide images recompute at most a quarter more), for work whose activations should stay in cache: yields ``(rows, inner, start)`` per band, ``rows`` the token range of the band with up to
    ``halo`` rows above and below it (what a ``2*halo+1``-tall conv reads), ``inner`` the band's own
    token range within those, ``start`` its first token in the whole map (``[B*H*W, C]`` tokens)."""
    step = max(1, min(h, max(8 * halo, pixels // max(1, w))))  # at least 8 rows per halo row: <= 25% recomputed
    for i in range(b):
        for r0 in range(0, h, step):
            r1 = min(h, r0 + step)
            a, z = max(0, r0 - halo), min(h, r1 + halo)
            yield slice((i * h + a) * w, (i * h + z) * w), slice((r0 - a) * w, (r1 - a) * w), (i * h + r0) * w


def depthwise_conv(x: Tensor, conv: torch.nn.Conv2d) -> Tensor:
    """``conv(x)`` for a depthwise "same" conv on a channels-last ``x``; the result is channels-last.

    A dilated one (dilation ``d`` > 1, where oneDNN takes a slow path) runs as one undilated conv over
    the ``d*d`` interleaved sub-grids of the (zero-extended) map, batched: the same sums.
    """
    weight, bias = conv.weight, conv.bias
    c = x.shape[1]
    kh, kw = weight.shape[-2:]
    dh, dw = conv.dilation
    if (
        conv.groups != c
        or weight.shape[0] != c
        or conv.stride != (1, 1)
        or dh != dw
        or dh == 1
        or conv.padding != (dh * (kh // 2), dw * (kw // 2))
        or kh % 2 == 0
        or kw % 2 == 0
        or conv.padding_mode != "zeros"
    ):
        return _channels_last(conv(x.contiguous(memory_format=torch.channels_last)))
    d = dh
    b, _, h, w = x.shape
    hp, wp = -(-h // d) * d, -(-w // d) * d
    pix = x.permute(0, 2, 3, 1)  # [B, H, W, C]
    if (hp, wp) != (h, w):  # zeros beyond the map keep every sub-grid's border zero-padded
        pix = F.pad(pix, (0, 0, 0, wp - w, 0, hp - h))
    grids = pix.reshape(b, hp // d, d, wp // d, d, c).permute(0, 2, 4, 1, 3, 5)
    grids = grids.reshape(b * d * d, hp // d, wp // d, c).permute(0, 3, 1, 2)  # one copy, channels-last
    out = F.conv2d(grids, weight, bias, padding=(kh // 2, kw // 2), groups=c)
    out = out.permute(0, 2, 3, 1).reshape(b, d, d, hp // d, wp // d, c).permute(0, 3, 1, 4, 2, 5)
    out = out.reshape(b, hp, wp, c)
    if (hp, wp) != (h, w):
        out = out[:, :h, :w]
    return _channels_last(out.permute(0, 3, 1, 2))


def depthwise_gated(gate: Tensor, value: Tensor, w_gate: Tensor, b_gate: Tensor | None, w_value: Tensor,
                    b_value: Tensor | None, padding: int) -> Tensor:
    """``gelu(dwconv(gate)) * dwconv(value)`` for two channels-last maps of equal shape (depthwise,
    stride 1, ``padding`` on every side), each conv on oneDNN with the GELU or the product fused in."""
    c = gate.shape[1]
    pad = [padding, padding]
    op = getattr(getattr(torch.ops, "mkldnn", None), "_convolution_pointwise", None)
    if op is not None and _eager(gate) \
            and gate.is_contiguous(memory_format=torch.channels_last) \
            and value.is_contiguous(memory_format=torch.channels_last):
        g = op(gate, w_gate, b_gate, pad, [1, 1], [1, 1], c, "gelu", [], "none")
        return op.binary(value, g, w_value, b_value, pad, [1, 1], [1, 1], c, "mul", None, None, [], None)
    g = F.gelu(F.conv2d(gate, w_gate, b_gate, padding=padding, groups=c))
    return g.mul_(F.conv2d(value, w_value, b_value, padding=padding, groups=c))


def _channels_last(x: Tensor) -> Tensor:
    return x if x.is_contiguous(memory_format=torch.channels_last) else x.contiguous(memory_format=torch.channels_last)

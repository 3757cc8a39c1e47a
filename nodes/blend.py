"""Tile blending: crop a tile's output to its share and write it into the output in place.

Each tile's weight is separable, ``wy ⊗ wx``; along an axis it is 1 inside the core and a raised-cosine
ramp across ``blend`` input pixels centred on every edge shared with a neighbour (rising for the tile
after the edge, ``1 - rising`` for the tile before it). The weights of all tiles sum to exactly one at
every output pixel, so the output needs no weight-sum buffer: pixels owned by one tile are copied,
pixels in a crossfade band are accumulated (the output starts at zero).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .tiles import Span, Tile


def raised_cosine(t: Tensor) -> Tensor:
    """0 -> 1 over t in [0, 1], flat outside: ``(1 - cos(pi t)) / 2``."""
    return 0.5 - 0.5 * torch.cos(math.pi * t.clamp(0.0, 1.0))


def crop_range(span: Span, blend: int, length: int) -> tuple[int, int]:
    """Input-pixel range ``[a, b)`` whose output this tile contributes to."""
    half = blend // 2
    a = span.start - half if span.blend_start else span.start
    b = span.end + half if span.blend_end else span.end
    return max(0, a), min(length, b)


def inner_range(span: Span, blend: int, length: int) -> tuple[int, int]:
    """Input-pixel range where this tile's weight is exactly 1."""
    half = blend // 2
    a = span.start + half if span.blend_start else span.start
    b = span.end - half if span.blend_end else span.end
    a, b = max(0, a), min(length, b)
    return a, max(a, b)


def axis_weights(span: Span, blend: int, scale: int, out_a: int, out_b: int) -> Tensor:
    """Weights ``[out_b - out_a]`` (float32) of output pixels ``[out_a, out_b)`` for this span."""
    pos = (torch.arange(out_a, out_b, dtype=torch.float64) + 0.5) / scale
    w = torch.ones_like(pos)
    if blend > 0:
        half = blend / 2
        if span.blend_start:
            w = w * raised_cosine((pos - (span.start - half)) / blend)
        if span.blend_end:
            w = w * (1.0 - raised_cosine((pos - (span.end - half)) / blend))
    else:  # hard edges: a pixel belongs to the tile whose core holds its centre
        w = ((pos >= span.start) & (pos < span.end)).to(w.dtype)
    return w.to(torch.float32)


def write_tile(dst: Tensor, index: int, tile: Tile, result: Tensor, blend: int, scale: int,
               height: int, width: int) -> None:
    """Blend one tile's model output into ``dst`` in place.

    ``dst``: [B, C, H*scale, W*scale] (any strides), zero wherever crossfades will accumulate.
    ``result``: [C, window_h*scale, window_w*scale], already clamped; any device and float dtype.
    """
    ya, yb = crop_range(tile.y, blend, height)
    xa, xb = crop_range(tile.x, blend, width)
    yi, yj = inner_range(tile.y, blend, height)
    xi, xj = inner_range(tile.x, blend, width)
    s = scale
    oy, ox = tile.y.lo * s, tile.x.lo * s  # output offset of the window

    def piece(y0: int, y1: int, x0: int, x1: int) -> Tensor:
        return result[:, y0 * s - oy : y1 * s - oy, x0 * s - ox : x1 * s - ox]

    out = dst[index]
    # the part owned by this tile alone: plain copy
    if yj > yi and xj > xi:
        out[:, yi * s : yj * s, xi * s : xj * s].copy_(piece(yi, yj, xi, xj))
    if blend == 0:
        return
    wy = axis_weights(tile.y, blend, s, ya * s, yb * s).to(result.device)
    wx = axis_weights(tile.x, blend, s, xa * s, xb * s).to(result.device)
    # the crossfade frame around it: top and bottom bands at full width, left and right bands between
    bands = [(ya, yi, xa, xb), (yj, yb, xa, xb), (yi, yj, xa, xi), (yi, yj, xj, xb)]
    for y0, y1, x0, x1 in bands:
        if y1 <= y0 or x1 <= x0:
            continue
        w = wy[(y0 - ya) * s : (y1 - ya) * s, None] * wx[None, (x0 - xa) * s : (x1 - xa) * s]
        contribution = piece(y0, y1, x0, x1).float() * w
        out[:, y0 * s : y1 * s, x0 * s : x1 * s].add_(contribution.to(out.device))

"""FSA, LAMNet's linear focal separable attention, in plain PyTorch (any device, any float dtype).

For every tap ``k`` of a kernel map, ``(start_k, len_k) = kernel_map[k]`` names a run of ``len_k``
neighbours along one axis, starting ``start_k`` pixels away and walking outwards (``d = +1`` if
``start_k >= 0`` else ``-1``). The vertical op is::

    y[b, c, h, w] = sum_k kernel[b, g(c)*K + k, h, w] / len_k * sum_{i < len_k} x[b, c, h + start_k + i*d, w]

with ``g(c) = c // (C // groups)`` and samples outside the image counting as zero (still divided by
``len_k``). The horizontal op is the same along ``w``. These are the semantics of the reference CUDA
kernels (zononhzy/LAMNet ``basicsr/ops/fsa``), which only run on CUDA and no longer build.

How it is computed: each tap is a box (a run of neighbours) over the zero-padded axis, so the input is
turned once into box *means* of the few distinct run lengths (built by pairwise halving: the mean of a
run of 4 is the mean of two adjacent runs of 2), and every tap is then one fused multiply-add of a
shifted slice of those means with the tap's kernel plane, accumulated in place into the output. On the
CPU the work is done in bands of rows sized to stay in cache; with autograd active, one band (all rows)
keeps the graph simple. There is no loop over pixels or channels; the loop over taps is in Python.

Why not one prefix sum (each tap the difference of two slices of a cumulative sum)? It needs two
multiply-adds per tap instead of one, a cumulative sum that runs serially along the axis, and its
differences of large running totals lose precision as images grow. Measured on a LAMNet-base layer
(32 channels, 256x256, release map, one CPU thread; ``bench/bench_fsa.py``): per-tap formula ~100 ms,
prefix sum ~30 ms (max error 1.5e-5), run means ~15 ms in one band and ~10 ms banded (max error 1.9e-6).
:func:`fsa_prefix_sum` and :func:`fsa_per_tap` stay here for that benchmark and as specifications.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "KernelMap",
    "normalize_kernel_map",
    "tap_ranges",
    "fsa_spatial",
    "fsa_horizontal",
    "fsa_vertical",
    "fsa_per_tap",
    "fsa_prefix_sum",
]

#: ``((start, len), ...)``: one pair per tap, as stored in LAMNet's ``kernel_map`` buffer.
KernelMap = tuple[tuple[int, int], ...]

#: Output elements per band and CPU thread (2 MB of float32: a thread's working set stays in cache).
CPU_BAND_ELEMENTS = 1 << 19

_DIRECTIONS = {"horizontal": -1, "vertical": -2}


def normalize_kernel_map(kernel_map: Tensor | Sequence[Sequence[int]]) -> KernelMap:
    """A kernel map (``[K, 2]`` integer tensor or nested sequence) as a tuple of ``(start, len)`` pairs.

    Raises ``ValueError`` for a map that is not ``[K, 2]`` with K >= 1, holds non-integers, or has a
    run length below 1.
    """
    if isinstance(kernel_map, Tensor):
        if kernel_map.is_floating_point() or kernel_map.is_complex() or kernel_map.dtype == torch.bool:
            raise ValueError(f"kernel_map must hold integers, got dtype {kernel_map.dtype}.")
        if kernel_map.dim() != 2 or kernel_map.shape[1] != 2 or kernel_map.shape[0] < 1:
            raise ValueError(f"kernel_map must have shape [K, 2] with K >= 1, got {list(kernel_map.shape)}.")
        pairs = kernel_map.tolist()
    else:
        pairs = [list(p) for p in kernel_map]
        if not pairs or any(len(p) != 2 for p in pairs):
            raise ValueError(f"kernel_map must be a non-empty list of (start, len) pairs, got {kernel_map!r}.")
        if any(not isinstance(v, int) or isinstance(v, bool) for p in pairs for v in p):
            try:
                if any(int(v) != v for p in pairs for v in p):
                    raise ValueError
                pairs = [[int(v) for v in p] for p in pairs]
            except (TypeError, ValueError):
                raise ValueError(f"kernel_map must hold integers, got {kernel_map!r}.") from None
    bad = [(s, n) for s, n in pairs if n < 1]
    if bad:
        raise ValueError(f"kernel_map run lengths must be >= 1; got (start, len) = {bad}.")
    return tuple((int(s), int(n)) for s, n in pairs)


def tap_ranges(kernel_map: KernelMap) -> list[tuple[int, int]]:
    """Each tap's inclusive offset range ``(lo, hi)``: ``start`` walking out by ``len`` samples."""
    return [(s, s + n - 1) if s >= 0 else (s - n + 1, s) for s, n in kernel_map]


def fsa_horizontal(x: Tensor, kernel: Tensor, kernel_map, groups: int) -> Tensor:
    """Horizontal FSA: ``x`` ``[B, C, H, W]``, ``kernel`` ``[B, groups*K, H, W]`` -> ``[B, C, H, W]``."""
    return fsa_spatial(x, kernel, kernel_map, groups, "horizontal")


def fsa_vertical(x: Tensor, kernel: Tensor, kernel_map, groups: int) -> Tensor:
    """Vertical FSA: ``x`` ``[B, C, H, W]``, ``kernel`` ``[B, groups*K, H, W]`` -> ``[B, C, H, W]``."""
    return fsa_spatial(x, kernel, kernel_map, groups, "vertical")


def fsa_spatial(
    x: Tensor,
    kernel: Tensor,
    kernel_map: Tensor | Sequence[Sequence[int]],
    groups: int,
    direction: str = "horizontal",
    *,
    band_elements: int | None = None,
) -> Tensor:
    """FSA along one axis (see the module docstring for the formula).

    Args:
        x: ``[B, C, H, W]`` features, C divisible by ``groups``.
        kernel: ``[B, groups*K, H, W]`` per-pixel tap weights, laid out group-major (``g*K + k``).
        kernel_map: ``[K, 2]`` ``(start, len)`` pairs (tensor or sequence; see :func:`normalize_kernel_map`).
        groups: number of channel groups sharing one set of tap weights.
        direction: ``"horizontal"`` (along W) or ``"vertical"`` (along H).
        band_elements: rows per CPU band are chosen so a band holds about this many output elements
            (default :data:`CPU_BAND_ELEMENTS` times torch's thread count; ``0`` = no banding). Only
            speed depends on it.

    Returns ``[B, C, H, W]`` in ``x``'s dtype. Differentiable in ``x`` and ``kernel``.
    """
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction must be 'horizontal' or 'vertical', got {direction!r}.")
    taps = kernel_map if _is_normalized(kernel_map) else normalize_kernel_map(kernel_map)
    _check_shapes(x, kernel, len(taps), groups)
    return _fsa(x, kernel, taps, groups, _DIRECTIONS[direction], band_elements)


def _is_normalized(kernel_map) -> bool:
    return isinstance(kernel_map, tuple) and all(
        isinstance(p, tuple) and len(p) == 2 and type(p[0]) is int and type(p[1]) is int and p[1] >= 1
        for p in kernel_map
    ) and len(kernel_map) > 0


def _check_shapes(x: Tensor, kernel: Tensor, k: int, groups: int) -> None:
    if x.dim() != 4 or kernel.dim() != 4:
        raise ValueError(f"FSA expects 4-D input and kernel, got {list(x.shape)} and {list(kernel.shape)}.")
    b, c, h, w = x.shape
    if groups < 1 or c % groups:
        raise ValueError(f"FSA: {c} channels cannot be split into {groups} groups.")
    want = (b, groups * k, h, w)
    if tuple(kernel.shape) != want:
        raise ValueError(
            f"FSA: kernel must have shape {list(want)} (groups*K = {groups}*{k}), got {list(kernel.shape)}."
        )


# --------------------------------------------------------------------------------------------------
# The fast path


def _live_taps(taps: KernelMap, n: int) -> list[tuple[int, int, int, float]]:
    """Taps that reach the image, as ``(k, lo, span, scale)``.

    Offsets beyond ``±(n-1)`` never hit an axis of length ``n``, so each run is clipped to them; the
    clipped run of ``span`` samples is weighted ``span/len`` so the mean still divides by ``len``.
    """
    live = []
    for k, ((lo, hi), (_, length)) in enumerate(zip(tap_ranges(taps), taps)):
        lo, hi = max(lo, -(n - 1)), min(hi, n - 1)
        if lo <= hi:
            span = hi - lo + 1
            live.append((k, lo, span, span / length))
    return live


def _box_plan(spans: Iterable[int]) -> list[tuple[int, int, int, float]]:
    """Steps that build the run means of every length in ``spans`` from shorter ones.

    Each step ``(length, a, b_len, weight)`` makes ``mean_length[i] = lerp(mean_a[i], mean_b[i + a], weight)``
    with ``weight = b_len / length``: powers of two by halving (the mean of 4 = the mean of two adjacent
    means of 2), other lengths from their binary decomposition. One elementwise op per step.
    """
    spans = sorted(set(spans))
    steps, have = [], {1}
    p = 1
    while 2 * p <= spans[-1]:
        steps.append((2 * p, p, p, 0.5))
        have.add(2 * p)
        p *= 2
    for length in spans:
        if length in have:
            continue
        parts = [1 << bit for bit in reversed(range(length.bit_length())) if length & (1 << bit)]
        done = parts[0]
        for part in parts[1:]:
            step_len = done + part
            if step_len not in have:
                steps.append((step_len, done, part, part / step_len))
                have.add(step_len)
            done = step_len
    return steps


def _box_means(xp: Tensor, plan, dim: int, bufs: dict[int, Tensor] | None = None) -> dict[int, Tensor]:
    """Run means along ``dim`` of ``xp``: ``means[L][..., i] = mean(xp[..., i:i+L])`` for the plan's lengths.

    With ``bufs`` (one tensor per length, at least as large), results are written there (no allocation).
    """
    means: dict[int, Tensor] = {1: xp}
    n = xp.shape[dim]
    for length, a, b_len, weight in plan:
        size = n - length + 1
        first, second = means[a].narrow(dim, 0, size), means[b_len].narrow(dim, a, size)
        if bufs is None:
            means[length] = torch.lerp(first, second, weight)
        else:
            target = bufs[length][tuple(slice(0, s) for s in first.shape)]
            means[length] = torch.lerp(first, second, weight, out=target)
    return means


def _accumulate(means: dict[int, Tensor], kern: Tensor, live, pad_lo: int, dim: int, out: Tensor | None) -> Tensor:
    """``sum_k scale_k * kern[:, :, k] * mean_k``, each tap a shifted slice of the run means of its length.

    ``means`` from :func:`_box_means` on the zero-padded band, ``kern`` ``[B, G, K, h, w]``; written into
    ``out`` (``[B, G, Cg, h, w]``, may be a view) when given, else into a new tensor.
    """
    n = kern.shape[dim]
    for i, (k, lo, span, scale) in enumerate(live):
        src = means[span].narrow(dim, lo + pad_lo, n)
        weight = kern[:, :, k : k + 1]
        if i == 0:
            out = torch.mul(src, weight) if out is None else torch.mul(src, weight, out=out)
            if scale != 1.0:
                out.mul_(scale)
        else:
            out.addcmul_(src, weight, value=scale)
    return out


def _fsa(x: Tensor, kernel: Tensor, taps: KernelMap, groups: int, dim: int, band_elements: int | None) -> Tensor:
    b, c, h, w = x.shape
    k = len(taps)
    n = x.shape[dim]
    live = _live_taps(taps, n)
    if not live or x.numel() == 0:
        return x.new_zeros(x.shape)
    pad_lo = max(0, -min(lo for _, lo, _, _ in live))
    pad_hi = max(0, max(lo + span - 1 for _, lo, span, _ in live))
    plan = _box_plan(span for _, _, span, _ in live)
    xg = x.reshape(b, groups, c // groups, h, w)
    kg = kernel.reshape(b, groups, k, h, w)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or kernel.requires_grad)
    # each of torch's CPU threads works on its share of a band, so bands grow with the thread count
    if torch.compiler.is_compiling():  # one band: the compiler fuses the sums itself (no unrolled band loop)
        band = 0
    else:
        band = CPU_BAND_ELEMENTS * torch.get_num_threads() if band_elements is None else band_elements
    if needs_grad or band <= 0 or x.device.type != "cpu" or x.numel() <= band:
        # One band: a fresh result, which autograd follows through the in-place adds; batched work
        # also suits accelerators.
        xp = F.pad(xg, (pad_lo, pad_hi) if dim == -1 else (0, 0, pad_lo, pad_hi))
        return _accumulate(_box_means(xp, plan, dim), kg, live, pad_lo, dim, None).reshape(b, c, h, w)
    rows = max(1, min(h, band // max(1, c * w)))
    return _fsa_banded(xg, kg, live, plan, pad_lo, pad_hi, dim, rows).view(b, c, h, w)


def _fsa_banded(xg: Tensor, kg: Tensor, live, plan, pad_lo: int, pad_hi: int, dim: int, rows: int) -> Tensor:
    """The CPU path: one image and ``rows`` rows at a time, so a band's work stays in cache.

    The zero-padded band and the run means live in buffers allocated once and reused by every band.
    """
    b, groups, cg, h, w = xg.shape
    out = torch.empty_like(xg, memory_format=torch.contiguous_format)
    if dim == -1:  # the side margins stay zero; every band fills the middle
        padded = xg.new_empty(1, groups, cg, rows, pad_lo + w + pad_hi)
        padded[..., :pad_lo].zero_()
        padded[..., pad_lo + w :].zero_()
    else:  # each band fills all of its rows (zeros above and below the image)
        padded = xg.new_empty(1, groups, cg, pad_lo + rows + pad_hi, w)
    bufs = {length: torch.empty_like(padded) for length, _, _, _ in plan}
    for i in range(b):
        for r0 in range(0, h, rows):
            r1 = min(h, r0 + rows)
            if dim == -1:
                xp = padded[:, :, :, : r1 - r0]
                xp[..., pad_lo : pad_lo + w].copy_(xg[i : i + 1, :, :, r0:r1])
            else:  # image rows r0 - pad_lo .. r1 + pad_hi, zeros outside the image
                xp = padded[:, :, :, : pad_lo + (r1 - r0) + pad_hi]
                a, z = max(0, r0 - pad_lo), min(h, r1 + pad_hi)
                top, bottom = a - (r0 - pad_lo), (r1 + pad_hi) - z
                if top:
                    xp[:, :, :, :top].zero_()
                if bottom:
                    xp[:, :, :, xp.shape[3] - bottom :].zero_()
                xp[:, :, :, top : xp.shape[3] - bottom].copy_(xg[i : i + 1, :, :, a:z])
            means = _box_means(xp, plan, dim, bufs)
            _accumulate(means, kg[i : i + 1, :, :, r0:r1], live, pad_lo, dim, out[i : i + 1, :, :, r0:r1])
    return out


# --------------------------------------------------------------------------------------------------
# Slower variants kept for the benchmark and as readable specifications


def fsa_per_tap(x: Tensor, kernel: Tensor, kernel_map, groups: int, direction: str = "horizontal") -> Tensor:
    """The formula written tap by tap (a new box sum per tap): slow, but plainly the definition."""
    taps = normalize_kernel_map(kernel_map)
    _check_shapes(x, kernel, len(taps), groups)
    dim = _DIRECTIONS[direction]
    b, c, h, w = x.shape
    n = x.shape[dim]
    ranges = tap_ranges(taps)
    pad = max(max(-lo, hi) for lo, hi in ranges)
    pad = max(0, min(pad, n))
    xp = F.pad(x, (pad, pad) if dim == -1 else (0, 0, pad, pad))
    kg = kernel.reshape(b, groups, 1, len(taps), h, w)
    y = torch.zeros_like(x).reshape(b, groups, c // groups, h, w)
    for k, ((lo, hi), (_, length)) in enumerate(zip(ranges, taps)):
        box = torch.zeros_like(x)
        for o in range(lo, hi + 1):
            if -n < o < n:
                box = box + xp.narrow(dim, pad + o, n)
        y = y + kg[:, :, :, k] * (box / length).reshape(b, groups, c // groups, h, w)
    return y.reshape(b, c, h, w)


def fsa_prefix_sum(x: Tensor, kernel: Tensor, kernel_map, groups: int, direction: str = "horizontal") -> Tensor:
    """Each tap as the difference of two slices of one zero-padded prefix sum (2 multiply-adds per tap)."""
    taps = normalize_kernel_map(kernel_map)
    _check_shapes(x, kernel, len(taps), groups)
    dim = _DIRECTIONS[direction]
    b, c, h, w = x.shape
    n = x.shape[dim]
    live = _live_taps(taps, n)
    if not live:
        return x.new_zeros(x.shape)
    pad_lo = max(0, -min(lo for _, lo, _, _ in live))
    pad_hi = max(0, max(lo + span - 1 for _, lo, span, _ in live))
    xg = x.reshape(b, groups, c // groups, h, w)
    # s[i] = sum of the padded axis before i (a leading zero, then the running sum)
    pads = (pad_lo + 1, pad_hi) if dim == -1 else (0, 0, pad_lo + 1, pad_hi)
    s = F.pad(xg, pads).cumsum(dim)
    kg = kernel.reshape(b, groups, len(taps), h, w)
    out = torch.zeros_like(xg)
    for k, lo, span, scale in live:
        weight = kg[:, :, k : k + 1] * (scale / span)
        out.addcmul_(s.narrow(dim, lo + pad_lo + span, n), weight)
        out.addcmul_(s.narrow(dim, lo + pad_lo, n), weight, value=-1.0)
    return out.reshape(b, c, h, w)

"""Tile planning: where tiles go, which pixels each tile's model run sees, and which edges crossfade.

Coordinates are input pixels. A tile owns a *core* (its share of the image); the model sees the core
plus up to ``context`` pixels of the image around it (only where the image continues: never past the
image's edges), and the output is cropped back to the core widened by half a crossfade at every edge
the tile shares with a neighbour. Core boundaries inside the image fall on multiples of ``align`` and
``context`` is a multiple of ``align``, so every model window starts on the model's padding/window grid
and window-attention models partition a tile exactly as they partition the whole image.

Tiles along an axis are even: a range of length L split for a tile size T gets n = ceil(L / T) cores
of one aligned step (the last one takes the rest). Re-splitting a pending tile (after running out of
memory) keeps its outer edges and adds new inner ones, so finished tiles stay valid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class Span:
    """One tile's extent along one axis (input pixels, half-open ranges)."""

    start: int  #: first core pixel
    end: int  #: one past the last core pixel
    lo: int  #: first pixel the model sees
    hi: int  #: one past the last pixel the model sees
    blend_start: bool  #: crossfades with the previous tile around ``start``
    blend_end: bool  #: crossfades with the next tile around ``end``

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def window(self) -> int:
        return self.hi - self.lo


@dataclass(frozen=True)
class Tile:
    """A rectangle of image ``index`` in a batch: ``y`` and ``x`` spans."""

    index: int
    y: Span
    x: Span

    @property
    def window_shape(self) -> tuple[int, int]:
        return self.y.window, self.x.window

    @property
    def core_area(self) -> int:
        return self.y.size * self.x.size


@dataclass(frozen=True)
class Layout:
    """The fixed geometry of one tiled run.

    ``align``: core boundaries and context are multiples of it (the model's padding/window unit).
    ``context``: pixels of image the model sees beyond a core edge that has a neighbour.
    ``blend``: crossfade width (even, <= context) centred on each shared core edge.
    ``uniform``: widen edge tiles' windows (into the image) so most windows share one shape and batch.
    """

    align: int = 1
    context: int = 0
    blend: int = 0
    uniform: bool = False

    def __post_init__(self):
        if self.align < 1:
            raise ValueError(f"align must be >= 1, not {self.align}")
        if self.context < 0 or self.context % self.align:
            raise ValueError(f"context ({self.context}) must be a non-negative multiple of align ({self.align})")
        if self.blend < 0 or self.blend % 2 or self.blend > 2 * self.context:
            raise ValueError(f"blend ({self.blend}) must be even and at most twice the context ({self.context})")

    @classmethod
    def for_model(cls, align: int, overlap: int, uniform: bool = False) -> "Layout":
        """Context from the ``overlap`` asked for; crossfade over the middle half of it.

        A positive ``overlap`` is raised to the model's minimum context (:func:`min_context`) and
        rounded up to ``align``; 0 means plain tiling without context (hard seams).
        """
        if overlap <= 0:
            return cls(align=align, context=0, blend=0, uniform=uniform)
        context = round_up(max(overlap, min_context(align)), align)
        return cls(align=align, context=context, blend=2 * (context // 4), uniform=uniform)

    def min_tile(self) -> int:
        """The smallest core size that keeps crossfades from overlapping: >= blend, a multiple of align."""
        return round_up(max(self.blend, 8, 1), self.align)

    def tile_size(self, requested: int) -> int:
        """``requested`` rounded down to ``align`` (at least :meth:`min_tile`)."""
        return max(self.min_tile(), requested // self.align * self.align)


def min_context(align: int) -> int:
    """The least context that makes tiles match the whole image: one grid unit, two for grids of 32 px
    or more (U-shaped models whose coarsest level works in cells that large see that much further)."""
    return align if align < 32 else 2 * align


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def split_range(start: int, end: int, tile: int, align: int, min_piece: int) -> list[int]:
    """Boundaries ``[start, b1, ..., end]`` splitting ``[start, end)`` into even aligned pieces <= ``tile``.

    ``start`` must be a multiple of ``align`` (or the range is taken whole), ``tile`` a multiple of
    ``align``. A last piece shorter than ``min_piece`` is merged into the one before it.
    """
    length = end - start
    if length <= tile or start % align:
        return [start, end]
    count = math.ceil(length / tile)
    step = round_up(math.ceil(length / count), align)
    bounds = list(range(start, end, step)) + [end]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < min_piece:
        del bounds[-2]
    return bounds


def _spans(
    bounds: list[int], length: int, layout: Layout, blend_start: bool, blend_end: bool
) -> list[Span]:
    c = layout.context
    nominal = max(b - a for a, b in zip(bounds, bounds[1:])) + 2 * c
    spans = []
    last = len(bounds) - 2
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        lo, hi = max(0, a - c), min(length, b + c)
        if layout.uniform and length > nominal:
            if lo == 0:
                hi = min(length, max(hi, nominal))
            elif hi == length and length % layout.align == 0:
                lo = min(lo, (length - nominal) // layout.align * layout.align)
        spans.append(Span(a, b, lo, hi, blend_start if i == 0 else True, blend_end if i == last else True))
    return spans


def plan_tiles(batch: int, height: int, width: int, tile: int, layout: Layout) -> list[Tile]:
    """Tiles covering ``batch`` images of ``height`` x ``width`` with cores of at most ``tile`` px.

    Raster order per image; ``tile`` is rounded to the layout (see :meth:`Layout.tile_size`).
    """
    tile = layout.tile_size(tile)
    region = Tile(0, Span(0, height, 0, height, False, False), Span(0, width, 0, width, False, False))
    tiles = split_tile(region, height, width, tile, layout)
    return [Tile(b, t.y, t.x) for b in range(batch) for t in tiles]


def split_tile(tile: Tile, height: int, width: int, size: int, layout: Layout) -> list[Tile]:
    """Split a (pending) tile into sub-tiles with cores of at most ``size`` px; outer edges are kept."""
    size = layout.tile_size(size)
    mp = max(layout.blend, 1)
    ys = split_range(tile.y.start, tile.y.end, size, layout.align, mp)
    xs = split_range(tile.x.start, tile.x.end, size, layout.align, mp)
    y_spans = _collapse(_spans(ys, height, layout, tile.y.blend_start, tile.y.blend_end), tile.y, height)
    x_spans = _collapse(_spans(xs, width, layout, tile.x.blend_start, tile.x.blend_end), tile.x, width)
    return [Tile(tile.index, y, x) for y in y_spans for x in x_spans]


def _collapse(spans: list[Span], region: Span, length: int) -> list[Span]:
    """One span instead of several whose windows all are the whole axis (same work, fewer runs)."""
    if len(spans) > 1 and all(sp.lo == 0 and sp.hi == length for sp in spans):
        return [Span(region.start, region.end, 0, length, region.blend_start, region.blend_end)]
    return spans


def resplit(tiles: Iterable[Tile], height: int, width: int, size: int, layout: Layout) -> list[Tile]:
    """Re-split every pending tile for a smaller tile ``size`` (after running out of memory)."""
    return [sub for t in tiles for sub in split_tile(t, height, width, size, layout)]


def describe(tiles: list[Tile]) -> str:
    """'12 tiles × 256×256 px' style summary of the most common core size."""
    if not tiles:
        return "0 tiles"
    sizes: dict[tuple[int, int], int] = {}
    for t in tiles:
        sizes[(t.y.size, t.x.size)] = sizes.get((t.y.size, t.x.size), 0) + 1
    (h, w), _ = max(sizes.items(), key=lambda kv: (kv[1], kv[0]))
    return f"{len(tiles)} tile{'s' if len(tiles) != 1 else ''} × {w}×{h} px"

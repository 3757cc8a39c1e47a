"""Procedurally generated anime-style images for the embedded default fine-tune (numpy + pillow).

Every image is a pure function of ``(seed, split, index)``: flat cel-shaded shapes with a hard shadow
and a highlight over a soft gradient background, dark line art of varying width (outlines and free
tapered strokes), screentone dot patches, and speech bubbles filled with small text-like strokes.
Drawing happens at ``SUPERSAMPLE`` times the size and is box-filtered down, so edges are antialiased
the way drawn artwork is.

    from training.synthetic import make_image, make_images
    img = make_image(seed=0, size=(128, 128))              # [H, W, 3] uint8
    train = make_images(64, (192, 192), seed=0, split="train")
    held_out = make_images(8, (128, 128), seed=0, split="val")  # disjoint from train by construction

``python -m training.synthetic OUT_DIR --count 32`` writes PNGs (to use as a ``--data`` folder).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SUPERSAMPLE = 3
SPLITS = {"train": 0, "val": 1, "test": 2}

# Hue families an anime palette draws from (skin, hair, clothes, sky, foliage ...), as RGB 0..255.
_BASE_COLOURS = np.array(
    [
        (250, 222, 200), (244, 200, 170), (255, 236, 214),  # skin
        (90, 60, 50), (230, 200, 120), (200, 80, 90), (60, 70, 120), (240, 160, 200),  # hair
        (70, 110, 200), (220, 60, 60), (250, 250, 245), (40, 40, 50), (120, 190, 110),  # clothes
        (150, 200, 240), (255, 210, 120), (180, 150, 220), (100, 170, 160), (245, 130, 60),
    ],
    dtype=np.float64,
)
_LINE_COLOURS = np.array([(20, 16, 20), (35, 25, 30), (25, 30, 55), (60, 35, 30)], dtype=np.float64)


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    return np.random.default_rng(np.random.SeedSequence([int(seed), SPLITS[split], int(index)]))


def _pick_colour(rng: np.random.Generator) -> np.ndarray:
    c = _BASE_COLOURS[rng.integers(len(_BASE_COLOURS))]
    return np.clip(c + rng.normal(0, 12, 3), 0, 255)


def _gradient_background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Soft two-colour linear gradient plus a faint radial glow, ``[h, w, 3]`` float 0..255."""
    c0, c1 = _pick_colour(rng), _pick_colour(rng)
    c0, c1 = 0.5 * c0 + 0.5 * 235, 0.6 * c1 + 0.4 * 200  # backgrounds are paler than characters
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (np.cos(angle) * xx / w + np.sin(angle) * yy / h) + 0.5
    t = np.clip((t - t.min()) / max(t.max() - t.min(), 1e-9), 0, 1)[..., None]
    img = c0 * (1 - t) + c1 * t
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    r2 = ((yy - cy) ** 2 + (xx - cx) ** 2) / (0.5 * (h * h + w * w))
    img += (rng.uniform(10, 30) * np.exp(-3 * r2))[..., None]
    return img.astype(np.float32)


def _blob(rng: np.random.Generator, cx: float, cy: float, r: float, kind: str) -> list[tuple[float, float]]:
    """Closed outline of a shape: ``ellipse``, ``polygon`` (jagged, like hair tufts) or ``blob`` (smooth)."""
    if kind == "ellipse":
        n, ax, ay, rot = 64, r * rng.uniform(0.6, 1.2), r * rng.uniform(0.5, 1.1), rng.uniform(0, math.pi)
        t = np.linspace(0, 2 * math.pi, n, endpoint=False)
        x, y = ax * np.cos(t), ay * np.sin(t)
        xs = cx + x * math.cos(rot) - y * math.sin(rot)
        ys = cy + x * math.sin(rot) + y * math.cos(rot)
        return list(zip(xs, ys))
    if kind == "polygon":
        n = int(rng.integers(5, 11))
        t = np.sort(rng.uniform(0, 2 * math.pi, n))
        rad = r * rng.uniform(0.45, 1.15, n)
        return list(zip(cx + rad * np.cos(t), cy + rad * np.sin(t)))
    n = 72
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    rad = np.full(n, r)
    for k in (2, 3, 4):  # low-frequency wobble of the radius
        rad += r * rng.uniform(0, 0.18) * np.sin(k * t + rng.uniform(0, 2 * math.pi))
    return list(zip(cx + rad * np.cos(t), cy + rad * np.sin(t)))


def _mask(size: tuple[int, int], draw_fn) -> np.ndarray:
    m = Image.new("L", (size[1], size[0]), 0)
    draw_fn(ImageDraw.Draw(m))
    return np.asarray(m, dtype=np.float32) * np.float32(1 / 255)


def _paint(img: np.ndarray, mask: np.ndarray, colour) -> None:
    """Composite ``colour`` over ``img`` with coverage ``mask`` (0..1), inside the mask's bounding box."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    a = mask[box][..., None]
    img[box] += a * (np.asarray(colour, dtype=img.dtype) - img[box])


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(mask)
    h, w = mask.shape
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = mask[ys, xs]
    return out


def _cel_shape(rng, img, size, line_colour, s) -> np.ndarray:
    """One flat-filled shape with a hard cel shadow, a highlight and an outline; returns its mask."""
    h, w = size
    r = rng.uniform(0.12, 0.35) * min(h, w)
    cx, cy = rng.uniform(0.1 * w, 0.9 * w), rng.uniform(0.1 * h, 0.9 * h)
    pts = _blob(rng, cx, cy, r, ["ellipse", "polygon", "blob"][rng.integers(3)])
    shape = _mask(size, lambda d: d.polygon(pts, fill=255))
    fill = _pick_colour(rng)
    _paint(img, shape, fill)
    # Cel shadow: the part of the shape not covered by a copy shifted towards the light.
    off = rng.uniform(0.15, 0.35) * r
    ang = rng.uniform(0, 2 * math.pi)
    shadow = shape * (1 - _shift(shape, int(off * math.sin(ang)), int(off * math.cos(ang))))
    _paint(img, shadow, fill * rng.uniform(0.6, 0.8))
    if rng.random() < 0.6:  # specular highlight: a small pale ellipse inside the shape
        hx = cx - 0.4 * r * math.cos(ang)
        hy = cy - 0.4 * r * math.sin(ang)
        hr = r * rng.uniform(0.08, 0.2)
        hl = _mask(size, lambda d: d.ellipse([hx - 1.6 * hr, hy - hr, hx + 1.6 * hr, hy + hr], fill=255))
        _paint(img, hl * shape, np.minimum(fill * 1.25 + 30, 255))
    width = max(1, int(round(rng.uniform(0.7, 3.0) * s)))
    outline = _mask(size, lambda d: d.line(pts + pts[:1], fill=255, width=width, joint="curve"))
    _paint(img, outline, line_colour)
    return shape


def _stroke(rng, img, size, line_colour, s) -> None:
    """A free tapered line-art stroke (hair strand, fold): thin-thick-thin along a smooth curve."""
    h, w = size
    n = 40
    x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
    length = rng.uniform(0.2, 0.7) * min(h, w)
    ang = rng.uniform(0, 2 * math.pi)
    bend = rng.uniform(-2.5, 2.5) / length
    t = np.linspace(0, 1, n)
    heading = ang + bend * length * t
    xs = x0 + np.cumsum(np.cos(heading)) * length / n
    ys = y0 + np.cumsum(np.sin(heading)) * length / n
    wmax = rng.uniform(1.0, 4.0) * s
    widths = np.maximum(0.6 * s, wmax * np.sin(np.pi * np.clip(t * 1.1, 0, 1)) ** 0.7)

    def draw(d: ImageDraw.ImageDraw) -> None:
        for i in range(n - 1):
            wi = widths[i]
            d.line([(xs[i], ys[i]), (xs[i + 1], ys[i + 1])], fill=255, width=max(1, int(round(wi))))
            d.ellipse([xs[i] - wi / 2, ys[i] - wi / 2, xs[i] + wi / 2, ys[i] + wi / 2], fill=255)

    _paint(img, _mask(size, draw), line_colour)


def _screentone(rng, img, size, region: np.ndarray, s) -> None:
    """Halftone dots on a (possibly rotated) lattice inside ``region``."""
    pitch = rng.uniform(3.0, 7.0) * s
    radius = pitch * rng.uniform(0.18, 0.42)
    rot = [0.0, math.pi / 4, math.pi / 6][rng.integers(3)]
    tone = np.array([30, 30, 35]) if rng.random() < 0.7 else _pick_colour(rng) * 0.5
    rows, cols = np.flatnonzero(region.any(axis=1)), np.flatnonzero(region.any(axis=0))
    if rows.size == 0:
        return
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    u = (xx * math.cos(rot) + yy * math.sin(rot)) / pitch
    v = (-xx * math.sin(rot) + yy * math.cos(rot)) / pitch
    du, dv = (u - np.round(u)) * pitch, (v - np.round(v)) * pitch
    dots = np.zeros(region.shape, dtype=np.float32)
    dots[y0:y1, x0:x1] = (du * du + dv * dv <= radius * radius) * region[y0:y1, x0:x1]
    _paint(img, dots, tone)


def _speech_bubble(rng, img, size, line_colour, s) -> None:
    """A white bubble with an outline and rows of small glyph-like strokes."""
    h, w = size
    bw, bh = rng.uniform(0.3, 0.55) * w, rng.uniform(0.2, 0.4) * h
    x0, y0 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
    box = [x0, y0, x0 + bw, y0 + bh]
    _paint(img, _mask(size, lambda d: d.ellipse(box, fill=255)), (252, 252, 250))
    lw = max(1, int(round(rng.uniform(0.8, 1.8) * s)))
    _paint(img, _mask(size, lambda d: d.ellipse(box, outline=255, width=lw)), line_colour)
    cell = rng.uniform(5.0, 9.0) * s
    stroke_w = max(1, int(round(rng.uniform(0.6, 1.1) * s)))
    cx, cy = x0 + bw / 2, y0 + bh / 2
    rows = max(1, int(0.55 * bh / (cell * 1.3)))
    cols = max(1, int(0.6 * bw / cell))

    def draw(d: ImageDraw.ImageDraw) -> None:
        for r in range(rows):
            gy = cy + (r - (rows - 1) / 2) * cell * 1.3
            for c in range(cols - int(rng.integers(0, 2))):
                gx = cx + (c - (cols - 1) / 2) * cell
                for _ in range(int(rng.integers(2, 5))):  # a glyph: 2-4 short strokes in its cell
                    a = (gx + rng.uniform(-0.4, 0.4) * cell, gy + rng.uniform(-0.4, 0.4) * cell)
                    kind = rng.integers(3)
                    if kind == 0:
                        b = (a[0] + rng.uniform(0.3, 0.7) * cell, a[1])
                    elif kind == 1:
                        b = (a[0], a[1] + rng.uniform(0.3, 0.7) * cell)
                    else:
                        b = (a[0] + rng.uniform(-0.5, 0.5) * cell, a[1] + rng.uniform(-0.5, 0.5) * cell)
                    d.line([a, b], fill=255, width=stroke_w)

    _paint(img, _mask(size, draw), (20, 20, 25))


def make_image(seed: int = 0, size: tuple[int, int] = (128, 128), *, index: int = 0, split: str = "train") -> np.ndarray:
    """One anime-style image, ``[H, W, 3]`` uint8, a pure function of ``(seed, split, index, size)``."""
    rng = _rng(seed, split, index)
    s = SUPERSAMPLE
    big = (int(size[0]) * s, int(size[1]) * s)
    img = _gradient_background(rng, *big)
    line_colour = _LINE_COLOURS[rng.integers(len(_LINE_COLOURS))]
    shapes = []
    for _ in range(int(rng.integers(3, 7))):
        shapes.append(_cel_shape(rng, img, big, line_colour, s))
        if rng.random() < 0.35:  # screentone on part of the last shape
            _screentone(rng, img, big, shapes[-1] * _shift(shapes[-1], big[0] // 12, 0), s)
    if rng.random() < 0.5:  # a free screentone patch on the background
        h, w = big
        y0, x0 = rng.uniform(0, 0.6 * h), rng.uniform(0, 0.6 * w)
        rect = (x0, y0, x0 + rng.uniform(0.2, 0.4) * w, y0 + rng.uniform(0.2, 0.4) * h)
        _screentone(rng, img, big, _mask(big, lambda d: d.rectangle(rect, fill=255)), s)
    for _ in range(int(rng.integers(2, 7))):
        _stroke(rng, img, big, line_colour, s)
    if rng.random() < 0.6:
        _speech_bubble(rng, img, big, line_colour, s)
    pil = Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8))
    return np.asarray(pil.resize((int(size[1]), int(size[0])), Image.BOX))


def make_images(count: int, size: tuple[int, int] = (128, 128), seed: int = 0, split: str = "train") -> list[np.ndarray]:
    """``count`` images of ``split`` (``train``/``val``/``test`` never share an image for one seed)."""
    return [make_image(seed, size, index=i, split=split) for i in range(count)]


def write_images(out_dir: str | Path, count: int, size: tuple[int, int] = (128, 128), seed: int = 0, split: str = "train") -> list[Path]:
    """Write ``count`` images as ``{split}_{index:05d}.png`` into ``out_dir``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, arr in enumerate(make_images(count, size, seed, split)):
        p = out / f"{split}_{i:05d}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Write procedurally generated anime-style images as PNG files.")
    ap.add_argument("out_dir")
    ap.add_argument("--count", type=int, default=32)
    ap.add_argument("--size", type=int, nargs=2, default=(192, 192), metavar=("H", "W"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", choices=sorted(SPLITS), default="train")
    a = ap.parse_args(argv)
    paths = write_images(a.out_dir, a.count, tuple(a.size), a.seed, a.split)
    print(f"wrote {len(paths)} images to {a.out_dir}")


if __name__ == "__main__":
    main()

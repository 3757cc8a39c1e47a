"""Does an image look JPEG-compressed? How well its luma fits one 8x8 grid, so the upscale node can say so and
point to a model made for such images.

JPEG codes 8x8 blocks independently and quantises each block's DCT coefficients. Decoded, the image still
shows it on the encoder's grid and nowhere else; :func:`blockiness` tries all 64 placements of the grid and
asks how far the best one stands above the *second* best (periodic drawing such as pixel art scaled 2x fits
several placements alike and scores ~0), by two measures on the luma's 8x8 DCT:

- the share of near-zero high-frequency coefficients in textured blocks (what light compression, quality
  90-95, leaves: detail is kept but rounded to the quantiser's steps, many small coefficients become 0);
- one minus the ratio of the high-frequency energy of the best placement to the second best (what strong
  compression leaves: smooth blocks whose edges jump; any other placement cuts through those jumps).

The score is the larger of the two (the second weighted 0.4, so both share one threshold): ~0 for clean
images, clearly positive for JPEG'd ones, whatever the crop offset.

:data:`JPEG_THRESHOLD` was chosen on the art set's validation split; ``python bench/bench_jpeg_detect.py``
reports the accuracy on its test split, quality 60..95 against clean images. Pure torch, no model.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: blockiness at or above this: "looks JPEG-compressed" (bench/bench_jpeg_detect.py, chosen on the val split).
JPEG_THRESHOLD = 0.012
#: Images with fewer pixels than this on a side are not judged (too few blocks to tell).
MIN_SIDE = 32
#: The measure looks at a centre crop of at most this many pixels a side (~0.2 s on one CPU thread).
MAX_SIDE = 512
#: A block counts as textured when the energy of its AC coefficients exceeds this (8-bit levels squared).
ACTIVE_ENERGY = 200.0
#: |coefficient| below this counts as quantised to zero (decoding rounds pixels to 8 bits: ~0.3 of noise).
NEAR_ZERO = 0.75
#: Each high-frequency coefficient's energy is capped here, so strong drawn edges weigh alike at every placement.
ENERGY_CAP = 400.0
#: Weight of the energy measure (its clean images reach ~0.03, the zero-share measure's ~0.01).
ENERGY_WEIGHT = 0.4


def _dct_matrix(n: int = 8) -> Tensor:
    k = torch.arange(n, dtype=torch.float32)
    d = torch.cos(math.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n)) * math.sqrt(2 / n)
    d[0] /= math.sqrt(2)
    return d  # orthonormal DCT-II


_D = _dct_matrix()
_K = torch.arange(8)
_HIGH = (_K[:, None] + _K[None, :]) >= 5  # the high frequencies JPEG quantises hardest (zero-share measure)
_UPPER = (_K[:, None] + _K[None, :]) >= 4  # the band whose energy the grid's edges add to (energy measure)


def luma(image: Tensor) -> Tensor:
    """BT.601 luma (0..255) of a ComfyUI IMAGE ``[H, W, C]`` (grey, RGB or RGBA; alpha ignored)."""
    x = image.float()
    if x.shape[-1] >= 3:
        return 255.0 * (0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2])
    return 255.0 * x[..., 0]


def grid_fit(y: Tensor) -> tuple[Tensor, Tensor]:
    """For each of the 64 grid offsets (dy, dx) of luma ``y`` ``[H, W]`` (0..255): the share of near-zero
    high-frequency DCT coefficients over the textured 8x8 blocks (0 where too few are textured), and the mean
    capped high-frequency energy over all blocks. Two ``[64]`` tensors."""
    H, W = y.shape
    zeros, energy = torch.zeros(64), torch.zeros(64)
    y = y - 128.0
    for oy in range(8):
        for ox in range(8):
            h, w = (H - oy) // 8 * 8, (W - ox) // 8 * 8
            blocks = y[oy:oy + h, ox:ox + w].reshape(h // 8, 8, w // 8, 8).permute(0, 2, 1, 3).reshape(-1, 8, 8)
            c = _D @ blocks @ _D.T
            energy[oy * 8 + ox] = c[:, _UPPER].square().clamp_max(ENERGY_CAP).sum(1).mean()
            active = (c.square().sum((1, 2)) - c[:, 0, 0].square()) > ACTIVE_ENERGY
            if int(active.sum()) >= 8:
                zeros[oy * 8 + ox] = (c[active][:, _HIGH].abs() < NEAR_ZERO).float().mean()
    return zeros, energy


def blockiness(image: Tensor) -> float:
    """How strongly one image ``[H, W, C]`` (0..1) fits a single 8x8 JPEG grid: ~0 when clean, at least
    :data:`JPEG_THRESHOLD` when JPEG'd (see the module's description)."""
    y = luma(image)
    H, W = y.shape
    if min(H, W) < MIN_SIDE:
        return 0.0
    top, left = max(0, (H - MAX_SIDE) // 2), max(0, (W - MAX_SIDE) // 2)
    zeros, energy = grid_fit(y[top:top + MAX_SIDE, left:left + MAX_SIDE])
    best = zeros.topk(2).values
    by_zeros = float(best[0] - best[1])
    low = energy.topk(2, largest=False).values
    by_energy = float(1 - low[0] / low[1]) if low[1] > 0.5 else 0.0
    return max(by_zeros, ENERGY_WEIGHT * by_energy)


def looks_jpeg(images: Tensor, threshold: float = JPEG_THRESHOLD, max_images: int = 4) -> tuple[bool, float]:
    """(whether a batch ``[B, H, W, C]`` looks JPEG-compressed, its largest blockiness over the first
    ``max_images`` images)."""
    score = max((blockiness(img) for img in images[:max_images]), default=0.0)
    return score >= threshold, score


#: The pack's models trained on JPEG'd and otherwise degraded images, by scale.
REAL_WORLD_MODELS = {2: "FlexSR_anime_real_x2", 4: "FlexSR_anime_real_x4"}


def jpeg_note(images: Tensor, scale: int, model_source: str = "") -> str:
    """The upscale node's line on its input: whether it looks JPEG-compressed and, when it does and the model
    is not one made for such images, which of the pack's models is."""
    looks, score = looks_jpeg(images)
    if not looks:
        return f"input looks clean (JPEG grid fit {score:.3f} < {JPEG_THRESHOLD})"
    text = f"input looks JPEG-compressed (grid fit {score:.3f} ≥ {JPEG_THRESHOLD})"
    if "real" in model_source.lower():
        return text + ": this model is made for such images"
    suggestion = REAL_WORLD_MODELS.get(scale)
    if suggestion:
        return text + f": {suggestion} is made for such images (cleaner lines, no 8×8 blocks)"
    return text + ": a model trained on JPEG'd images will do better"

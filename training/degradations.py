"""Degradations that turn HR patches into LR inputs on the fly: downscale, blur, noise, JPEG.

All functions take ``[B, C, H, W]`` float tensors in 0..1 and draw every random choice from the
``torch.Generator`` they are given, so a batch is a pure function of the generator's seed.

Order (the classic one): optional Gaussian blur of the HR image -> downscale by ``scale`` with one
mode for the whole batch -> optional Gaussian noise -> optional JPEG round trip (pillow) -> clip.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

DOWNSCALE_MODES = ("bilinear", "bicubic", "area")


def downscale(hr: torch.Tensor, scale: int, mode: str = "bicubic") -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, C, H // scale, W // scale]``.

    ``bicubic`` is antialiased (like MATLAB's imresize / PIL's BICUBIC), ``area`` averages
    ``scale x scale`` blocks, ``bilinear`` is plain bilinear sampling (no antialias filter).
    """
    if mode not in DOWNSCALE_MODES:
        raise ValueError(f"unknown downscale mode {mode!r}; choose from {DOWNSCALE_MODES}")
    h, w = hr.shape[-2] // scale, hr.shape[-1] // scale
    if h < 1 or w < 1:
        raise ValueError(f"image of {tuple(hr.shape[-2:])} is smaller than the scale {scale}")
    hr = hr[..., : h * scale, : w * scale]
    if mode == "area":
        return F.interpolate(hr, size=(h, w), mode="area")
    out = F.interpolate(hr, size=(h, w), mode=mode, align_corners=False, antialias=(mode == "bicubic"))
    return out.clamp(0, 1)


def gaussian_kernel(sigma: float, radius: int | None = None) -> torch.Tensor:
    """Normalised 1-D Gaussian kernel of ``2 * radius + 1`` taps (radius defaults to ceil(3 sigma))."""
    radius = max(1, math.ceil(3 * sigma)) if radius is None else radius
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[B, C, H, W]`` with reflect padding (identity for sigma <= 0)."""
    if sigma <= 0:
        return img
    k = gaussian_kernel(sigma).to(img)
    r = k.numel() // 2
    c = img.shape[1]
    mode = "reflect" if min(img.shape[-2:]) > r else "replicate"
    x = F.pad(img, (r, r, r, r), mode=mode)
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def add_noise(img: torch.Tensor, sigma: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Add Gaussian noise of per-image std ``sigma`` ([B], in 0..1 units), then clip to 0..1."""
    noise = torch.randn(img.shape, generator=generator, dtype=torch.float32)
    return (img + noise.to(img) * sigma.view(-1, 1, 1, 1).to(img)).clamp(0, 1)


def jpeg(img: torch.Tensor, quality: list[int]) -> torch.Tensor:
    """JPEG round trip through pillow at per-image ``quality`` (4:2:0 chroma, like most encoders)."""
    out = []
    for x, q in zip(img, quality):
        arr = (x.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=int(q))
        buf.seek(0)
        with Image.open(buf) as im:
            dec = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        out.append(torch.from_numpy(dec).permute(2, 0, 1))
    return torch.stack(out).to(img)


@dataclass
class Degradation:
    """Settings of the LR pipeline; ``apply`` draws every random choice from a generator.

    ``modes``: downscale modes, one drawn per batch. ``blur``: maximum Gaussian sigma (HR pixels)
    drawn uniformly in [0.2, blur] with probability ``blur_prob`` per image (0 disables). ``noise``:
    maximum noise std in 8-bit levels, drawn in [0, noise] with probability ``noise_prob``.
    ``jpeg``: lowest JPEG quality, drawn in [jpeg, 95] with probability ``jpeg_prob`` (0 disables).
    """

    scale: int = 2
    modes: tuple[str, ...] = DOWNSCALE_MODES
    blur: float = 0.0
    blur_prob: float = 0.5
    noise: float = 0.0
    noise_prob: float = 0.5
    jpeg: int = 0
    jpeg_prob: float = 0.5

    def __post_init__(self) -> None:
        bad = [m for m in self.modes if m not in DOWNSCALE_MODES]
        if bad or not self.modes:
            raise ValueError(f"downscale modes must be a non-empty subset of {DOWNSCALE_MODES}, got {self.modes}")
        if self.jpeg and not 1 <= self.jpeg <= 95:
            raise ValueError(f"--jpeg is the lowest JPEG quality, 1..95 (0 = off); got {self.jpeg}")

    def apply(self, hr: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """HR ``[B, C, H, W]`` -> (LR ``[B, C, H/s, W/s]``, a dict describing what was drawn)."""
        b = hr.shape[0]
        u = lambda n=b: torch.rand(n, generator=generator, dtype=torch.float64).tolist()  # noqa: E731
        info: dict = {}
        x = hr
        if self.blur > 0:
            on, amount = u(), u()
            sigmas = [0.2 + a * (self.blur - 0.2) if o < self.blur_prob else 0.0 for o, a in zip(on, amount)]
            x = torch.cat([gaussian_blur(x[i : i + 1], s) for i, s in enumerate(sigmas)])
            info["blur"] = sigmas
        mode = self.modes[int(torch.randint(len(self.modes), (1,), generator=generator))]
        info["mode"] = mode
        x = downscale(x, self.scale, mode)
        if self.noise > 0:
            on, amount = u(), u()
            sig = [a * self.noise / 255.0 if o < self.noise_prob else 0.0 for o, a in zip(on, amount)]
            x = add_noise(x, torch.tensor(sig), generator)
            info["noise"] = sig
        if self.jpeg > 0:
            on, amount = u(), u()
            qs = [int(round(self.jpeg + a * (95 - self.jpeg))) if o < self.jpeg_prob else 0 for o, a in zip(on, amount)]
            idx = [i for i, q in enumerate(qs) if q > 0]
            if idx:
                x = x.clone()
                x[idx] = jpeg(x[idx], [qs[i] for i in idx])
            info["jpeg"] = qs
        return x.clamp(0, 1), info

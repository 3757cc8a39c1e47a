"""Evaluation in the protocol of SR papers' tables (BasicSR / the EIMN paper).

Images are clipped to [0, 1] and rounded to 8-bit levels; PSNR and SSIM are computed on the
BT.601 luma (Y of YCbCr, 16..235) after cropping ``border`` pixels (= the scale) on each side; SSIM
uses an 11x11 Gaussian window with sigma 1.5 over the valid region. Inputs are float tensors in 0..1,
``[3, H, W]`` or ``[B, 3, H, W]`` (RGB); batched inputs give the mean over the batch.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

_Y_WEIGHTS = (65.481, 128.553, 24.966)


def quantize(img: torch.Tensor) -> torch.Tensor:
    """Clip to [0, 1] and round to the 256 levels of an 8-bit image (still 0..1 float64)."""
    return torch.round(img.detach().double().clamp(0, 1) * 255.0) / 255.0


def rgb_to_y(img: torch.Tensor) -> torch.Tensor:
    """``[..., 3, H, W]`` RGB in 0..1 -> ``[..., 1, H, W]`` BT.601 luma in 16..235 (float64)."""
    if img.shape[-3] == 1:
        return img.double() * 219.0 + 16.0
    w = torch.tensor(_Y_WEIGHTS, dtype=torch.float64, device=img.device).view(3, 1, 1)
    return (img.double() * w).sum(dim=-3, keepdim=True) + 16.0


def _prepare(sr: torch.Tensor, hr: torch.Tensor, border: int) -> tuple[torch.Tensor, torch.Tensor]:
    if sr.shape != hr.shape:
        raise ValueError(f"SR and HR shapes differ: {tuple(sr.shape)} vs {tuple(hr.shape)}")
    if sr.dim() == 3:
        sr, hr = sr.unsqueeze(0), hr.unsqueeze(0)
    y_sr, y_hr = rgb_to_y(quantize(sr)), rgb_to_y(quantize(hr))
    if border > 0:
        y_sr = y_sr[..., border:-border, border:-border]
        y_hr = y_hr[..., border:-border, border:-border]
    if y_sr.shape[-1] < 1 or y_sr.shape[-2] < 1:
        raise ValueError(f"image too small for border {border}: {tuple(sr.shape)}")
    return y_sr, y_hr


def psnr_y(sr: torch.Tensor, hr: torch.Tensor, border: int = 0) -> float:
    """Y-channel PSNR in dB (peak 255), mean over the batch."""
    y_sr, y_hr = _prepare(sr, hr, border)
    mse = (y_sr - y_hr).pow(2).flatten(1).mean(dim=1)
    values = [float("inf") if m == 0 else 10.0 * math.log10(255.0**2 / float(m)) for m in mse]
    return float(np.mean(values))


def _gaussian_1d(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def _gaussian_filter(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The 2-D Gaussian window (outer product of ``g``) over ``[B, 1, H, W]``, valid region, as two
    1-D passes (the same sums to ~1e-13, five times faster than one 11x11 convolution in float64)."""
    n = g.numel()
    return F.conv2d(F.conv2d(x, g.view(1, 1, n, 1)), g.view(1, 1, 1, n))


def ssim_y(sr: torch.Tensor, hr: torch.Tensor, border: int = 0) -> float:
    """Y-channel SSIM (11x11 Gaussian, sigma 1.5, valid region, 8-bit constants), mean over the batch."""
    y_sr, y_hr = _prepare(sr, hr, border)
    g = _gaussian_1d().to(y_sr.device)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu1, mu2 = _gaussian_filter(y_sr, g), _gaussian_filter(y_hr, g)
    s11 = _gaussian_filter(y_sr * y_sr, g) - mu1**2
    s22 = _gaussian_filter(y_hr * y_hr, g) - mu2**2
    s12 = _gaussian_filter(y_sr * y_hr, g) - mu1 * mu2
    ssim_map = ((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) / ((mu1**2 + mu2**2 + c1) * (s11 + s22 + c2))
    return float(ssim_map.flatten(1).mean(dim=1).mean())


def load_image(path: str | Path) -> torch.Tensor:
    """Read an image file as ``[3, H, W]`` float32 RGB in 0..1."""
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def bicubic_upscale(lr: torch.Tensor, scale: int) -> torch.Tensor:
    """Bicubic baseline: ``[B, C, h, w]`` -> ``[B, C, h*scale, w*scale]`` (torch bicubic, clipped)."""
    return F.interpolate(lr, scale_factor=scale, mode="bicubic", align_corners=False).clamp(0, 1)


@torch.inference_mode()
def evaluate_pairs(upscale, pairs, scale: int) -> dict[str, float]:
    """Mean Y-PSNR/SSIM of ``upscale`` and of bicubic over ``(name, lr, hr)`` pairs of ``[3, H, W]`` tensors.

    ``upscale`` maps ``[1, 3, h, w]`` -> ``[1, 3, h*scale, w*scale]`` (e.g. a spandrel descriptor).
    Returns ``{"psnr", "ssim", "bicubic_psnr", "bicubic_ssim", "n"}`` plus per-image PSNRs keyed by name.
    """
    rows = {"psnr": [], "ssim": [], "bicubic_psnr": [], "bicubic_ssim": []}
    per_image = {}
    for name, lr, hr in pairs:
        lr1 = lr.unsqueeze(0)
        sr = upscale(lr1).float().cpu()[..., : hr.shape[-2], : hr.shape[-1]]
        bic = bicubic_upscale(lr1, scale)[..., : hr.shape[-2], : hr.shape[-1]]
        hr1 = hr.unsqueeze(0)
        rows["psnr"].append(psnr_y(sr, hr1, scale))
        rows["ssim"].append(ssim_y(sr, hr1, scale))
        rows["bicubic_psnr"].append(psnr_y(bic, hr1, scale))
        rows["bicubic_ssim"].append(ssim_y(bic, hr1, scale))
        per_image[f"psnr/{name}"] = rows["psnr"][-1]
    out = {k: float(np.mean(v)) for k, v in rows.items()}
    out["n"] = len(rows["psnr"])
    out.update(per_image)
    return out


def set5_pairs(root: str | Path, scale: int):
    """Yield ``(name, lr, hr)`` for the Set5 layout ``GTmod12/`` + ``LRbicx{scale}/``."""
    root = Path(root)
    for hr_path in sorted((root / "GTmod12").glob("*.png")):
        lr_path = root / f"LRbicx{scale}" / hr_path.name
        yield hr_path.stem, load_image(lr_path), load_image(hr_path)

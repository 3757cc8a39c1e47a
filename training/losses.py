"""Losses: plain L1, edge-weighted L1 (Sobel magnitude of the HR patch), and GAN losses.

Edge-weighted L1 (the DaViT-style SR transformer's training loss): per channel, the Sobel
responses of the HR patch in [0, 1] with ``gx = [[1, 0, -1], [2, 0, -2], [1, 0, -1]]`` and
``gy = gx^T`` (cross-correlation, replicate padding so the image border is not an edge) give
``E = sqrt(gx^2 + gy^2)``; the loss is ``sum(|SR - HR| * E) / (sum(E) + eps)`` over the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SOBEL_X = ((1.0, 0.0, -1.0), (2.0, 0.0, -2.0), (1.0, 0.0, -1.0))
GAN_LOSSES = ("hinge", "nonsaturating")


def sobel_magnitude(img: torch.Tensor) -> torch.Tensor:
    """Per-channel Sobel gradient magnitude of ``[B, C, H, W]`` (same shape; replicate padding).

    Computed separably from shifted copies (smooth across, difference along), which equals the
    3x3 cross-correlation with ``SOBEL_X`` and its transpose, and gives exact zeros on flat regions.
    """
    p = F.pad(img, (1, 1, 1, 1), mode="replicate")
    smooth_y = p[..., :-2, :] + 2 * p[..., 1:-1, :] + p[..., 2:, :]  # [B, C, H, W + 2]
    gx = smooth_y[..., :-2] - smooth_y[..., 2:]  # left minus right: kernel columns (1, 0, -1)
    smooth_x = p[..., :-2] + 2 * p[..., 1:-1] + p[..., 2:]  # [B, C, H + 2, W]
    gy = smooth_x[..., :-2, :] - smooth_x[..., 2:, :]  # top minus bottom: kernel rows (1, 0, -1)
    return torch.sqrt(gx * gx + gy * gy)


def edge_weighted_l1(sr: torch.Tensor, hr: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``sum(|sr - hr| * E) / (sum(E) + eps)`` with ``E = sobel_magnitude(hr)`` (no gradient through E)."""
    with torch.no_grad():
        e = sobel_magnitude(hr.float().clamp(0, 1))
    return ((sr.float() - hr.float()).abs() * e).sum() / (e.sum() + eps)


def edge_mask(img: torch.Tensor, fraction: float = 0.1) -> torch.Tensor:
    """Boolean ``[B, 1, H, W]``: the ``fraction`` of pixels with the largest Sobel magnitude of each
    image's luma (mean of the channels' 0..1 values), ties included."""
    luma = img.float().mean(dim=1, keepdim=True)
    mag = sobel_magnitude(luma).flatten(1)
    k = max(1, int(round(fraction * mag.shape[1])))
    thresh = mag.topk(k, dim=1).values[:, -1:]
    return (mag >= thresh).view_as(luma)


@dataclass
class PixelLoss:
    """Plain L1 while ``edge_on`` is False (the warm-up), then ``w * edge_L1 + (1 - w) * L1``."""

    edge_weight: float = 1.0
    eps: float = 1e-8

    def __call__(self, sr: torch.Tensor, hr: torch.Tensor, edge_on: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        l1 = F.l1_loss(sr.float(), hr.float())
        parts = {"l1": l1.detach()}
        if not edge_on or self.edge_weight <= 0:
            return l1, parts
        edge = edge_weighted_l1(sr, hr, self.eps)
        parts["edge_l1"] = edge.detach()
        w = self.edge_weight
        loss = edge if w == 1 else w * edge + (1 - w) * l1
        return loss, parts


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """Hinge: ``E[relu(1 - D(real))] + E[relu(1 + D(fake))]``; non-saturating: ``E[softplus(-D(real))]
    + E[softplus(D(fake))]``."""
    real, fake = real_logits.float(), fake_logits.float()
    if kind == "hinge":
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    if kind == "nonsaturating":
        return F.softplus(-real).mean() + F.softplus(fake).mean()
    raise ValueError(f"unknown GAN loss {kind!r}; choose from {GAN_LOSSES}")


def generator_adversarial_loss(fake_logits: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """Hinge: ``-E[D(fake)]``; non-saturating: ``E[softplus(-D(fake))]``."""
    fake = fake_logits.float()
    if kind == "hinge":
        return -fake.mean()
    if kind == "nonsaturating":
        return F.softplus(-fake).mean()
    raise ValueError(f"unknown GAN loss {kind!r}; choose from {GAN_LOSSES}")

"""Discriminators for the optional GAN loss: a conv patch discriminator, and the ViT family from ``archs``.

``make_discriminator("patch", image_size)`` is the PatchGAN-style conv net below (one realness logit
per receptive-field patch). ``vit``, ``cait``, ``crossformer`` and ``crossvit`` come from
``archs.discriminator.make_discriminator`` (one realness logit per image). All take ``[B, 3, H, W]``
images in 0..1.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

VIT_KINDS = ("vit", "cait", "crossformer", "crossvit")
KINDS = (*VIT_KINDS, "patch")


class PatchDiscriminator(nn.Module):
    """PatchGAN-style discriminator: strided 4x4 convs with LeakyReLU, ``[B, 3, H, W]`` -> ``[B, 1, h, w]``.

    ``num_layers`` stride-2 stages double the width up to ``8 * base``; spectral normalisation on
    every conv when ``spectral_norm`` (the usual choice with the hinge loss).
    """

    def __init__(self, *, in_channels: int = 3, base: int = 64, num_layers: int = 3, spectral_norm: bool = True):
        super().__init__()
        sn = nn.utils.spectral_norm if spectral_norm else (lambda m: m)
        layers: list[nn.Module] = [sn(nn.Conv2d(in_channels, base, 4, 2, 1)), nn.LeakyReLU(0.2, True)]
        ch = base
        for i in range(1, num_layers):
            nxt = base * min(2**i, 8)
            layers += [sn(nn.Conv2d(ch, nxt, 4, 2, 1)), nn.LeakyReLU(0.2, True)]
            ch = nxt
        layers += [sn(nn.Conv2d(ch, ch, 3, 1, 1)), nn.LeakyReLU(0.2, True), sn(nn.Conv2d(ch, 1, 3, 1, 1))]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x * 2 - 1)


def make_discriminator(kind: str, image_size: int, spectral_norm: bool = False, **overrides) -> nn.Module:
    """A discriminator of ``kind`` for ``image_size`` x ``image_size`` patches."""
    kind = kind.lower()
    if kind == "patch":
        opts = {"spectral_norm": True, **overrides}
        if spectral_norm:
            opts["spectral_norm"] = True
        return PatchDiscriminator(**opts)
    if kind not in VIT_KINDS:
        raise ValueError(f"unknown discriminator {kind!r}; choose from {', '.join(KINDS)}")
    try:
        module = importlib.import_module("archs.discriminator")
    except ImportError as e:
        raise ValueError(
            f"--gan {kind} needs archs/discriminator.py (the ViT-family discriminators), which this copy of "
            f"FlexSR does not have; use --gan patch."
        ) from e
    return module.make_discriminator(kind, image_size, spectral_norm=spectral_norm, **overrides)

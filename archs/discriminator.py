"""GAN discriminators for SR training from the ViT family (ViT, CaiT, CrossFormer, CrossViT).

:func:`make_discriminator` builds one of the four classifiers with ``num_classes=1`` and small
defaults for SR training patches (64-128 px) and wraps it in :class:`ViTFamilyDiscriminator`:

* input: images ``[B, C, H, W]`` in 0..1 (SR outputs or HR crops); they are mapped to -1..1 inside;
* output: one raw realness logit per image, shape ``[B]`` (no sigmoid: use it with
  ``BCEWithLogitsLoss``, hinge or relativistic losses);
* any size: ViT, CaiT and CrossViT resize their position embeddings bicubically for patch grids other
  than the one of ``image_size`` (the training patch size); sizes that are not a multiple of
  :attr:`ViTFamilyDiscriminator.size_multiple` (the patch size, or CrossFormer's window/stride
  multiple) are reflect-padded on the bottom/right first;
* ``spectral_norm=True`` puts ``torch.nn.utils.parametrizations.spectral_norm`` on every Linear and
  Conv2d (state-dict keys then read ``...parametrizations.weight.original``).
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor, nn
from torch.nn.utils import parametrizations

from .blocks import pad_to_multiple
from .cait import CaiT
from .cross_vit import CrossViT
from .crossformer import CrossFormer
from .errors import BadImageError
from .vit import ViT, pair

#: Small defaults per kind, for 64-128 px training patches (override any of them by keyword).
DISCRIMINATOR_DEFAULTS: dict[str, dict[str, Any]] = {
    "vit": dict(patch_size=8, dim=192, depth=6, heads=3, dim_head=64, mlp_dim=384, pool="cls", dropout=0.0, emb_dropout=0.0),
    "cait": dict(
        patch_size=8, dim=192, depth=6, cls_depth=2, heads=3, dim_head=64, mlp_dim=384,
        dropout=0.0, emb_dropout=0.0, layer_dropout=0.05,
    ),
    "crossformer": dict(
        dim=(32, 64, 128, 256),
        depth=(1, 1, 2, 1),
        global_window_size=(4, 2, 2, 1),
        local_window_size=(4, 4, 2, 1),
        cross_embed_kernel_sizes=((4, 8, 16, 32), (2, 4), (2, 4), (2, 4)),
        cross_embed_strides=(4, 2, 2, 2),
        attn_dropout=0.0,
        ff_dropout=0.0,
    ),
    "crossvit": dict(
        sm_dim=96, sm_patch_size=8, sm_enc_depth=1, sm_enc_heads=3, sm_enc_mlp_dim=192, sm_enc_dim_head=32,
        lg_dim=192, lg_patch_size=16, lg_enc_depth=2, lg_enc_heads=3, lg_enc_mlp_dim=384, lg_enc_dim_head=64,
        cross_attn_depth=1, cross_attn_heads=3, cross_attn_dim_head=64, depth=2, dropout=0.0, emb_dropout=0.0,
    ),
}

_BUILDERS = {"vit": ViT, "cait": CaiT, "crossformer": CrossFormer, "crossvit": CrossViT}


def apply_spectral_norm(module: nn.Module) -> nn.Module:
    """Put spectral normalisation on every ``nn.Linear`` and ``nn.Conv2d`` inside ``module`` (in place)."""
    for m in list(module.modules()):
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            parametrizations.spectral_norm(m)
    return module


class ViTFamilyDiscriminator(nn.Module):
    """One realness logit per image from a ViT-family classifier built with ``num_classes=1``.

    ``forward``: ``[B, channels, H, W]`` in 0..1 -> ``[B]`` raw logits. The image is reflect-padded to
    a multiple of ``size_multiple`` if needed and mapped to -1..1 before the backbone.
    """

    def __init__(self, backbone: nn.Module, *, kind: str, size_multiple: int, channels: int = 3):
        super().__init__()
        self.backbone = backbone
        self.kind = kind
        self.size_multiple = size_multiple
        self.channels = channels

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.channels or 0 in x.shape[-2:]:
            raise BadImageError(
                f"{self.kind} discriminator expects images [B, {self.channels}, H, W] in 0..1; "
                f"got a tensor of shape {tuple(x.shape)}."
            )
        x = pad_to_multiple(x, self.size_multiple, mode="reflect")
        return self.backbone(x * 2.0 - 1.0).squeeze(-1)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, size_multiple={self.size_multiple}"


def make_discriminator(
    kind: str,
    image_size: int | tuple[int, int] = 64,
    *,
    spectral_norm: bool = False,
    channels: int = 3,
    **overrides: Any,
) -> ViTFamilyDiscriminator:
    """A ViT-family GAN discriminator for training patches of ``image_size`` (other sizes work too).

    ``kind`` is ``"vit"``, ``"cait"``, ``"crossformer"`` or ``"crossvit"``; ``overrides`` replace
    entries of :data:`DISCRIMINATOR_DEFAULTS` (the model's own keyword arguments). ``image_size`` sets
    the native patch grid of the position embeddings (CrossFormer has none and ignores it).
    """
    if kind not in _BUILDERS:
        raise ValueError(f"unknown discriminator kind {kind!r}; choose one of {', '.join(_BUILDERS)}.")
    if "num_classes" in overrides:
        raise ValueError("a discriminator has one output (num_classes=1); do not pass num_classes.")
    config = {**DISCRIMINATOR_DEFAULTS[kind], **overrides, "num_classes": 1, "channels": channels}
    if kind != "crossformer":
        config["image_size"] = image_size
    backbone = _BUILDERS[kind](**config)

    if kind in ("vit", "cait"):
        multiple = math.lcm(*pair(config["patch_size"]))
    else:
        multiple = backbone.size_multiple
    if spectral_norm:
        apply_spectral_norm(backbone)
    return ViTFamilyDiscriminator(backbone, kind=kind, size_multiple=multiple, channels=channels)

"""FlexSR architectures: models, their spandrel descriptors, the registry and reparameterization.

Pure torch + einops + spandrel; no ComfyUI. ``import archs`` works with the pack root on ``sys.path``.
"""

from .errors import (
    BadImageError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    DamagedWeightsError,
    FlexSRError,
    IncompatibleWeightsError,
    NonFiniteOutputError,
    UnsafeCheckpointError,
    UnsupportedModelError,
)
from .reparam import ReparamModule, fusable_modules, fuse
from .interpolate import InterpolationError, interpolate_descriptors, interpolate_models, interpolate_state_dicts
from .compile import CompiledModel, compiled
from .registry import (
    REGISTRY,
    FlexSRArchitecture,
    canonical_state_dict,
    closest_families,
    combined_registry,
    install,
    load_model,
    read_state_dict,
)
from .flexnet import FlexNet, FlexNetArch, MetaFlexNet  # after .registry (it builds REGISTRY from the families)
from .transformer_sr import SR, TransformerSR, load_transformer_sr
from .eimn import EIMN, EIMN_A, EIMN_L, EIMNArch

# Family modules after the registry (which imports them while it builds REGISTRY).
from .lmlt import LMLT, LMLT_base, LMLT_large, LMLT_tiny  # noqa: E402
from .lamnet import LAMNet, LAMNet_base, LAMNet_large, LAMNetArch  # noqa: E402

# ViT family (classifiers / GAN discriminators, not upscalers: not in the spandrel registry)
from .cait import CaiT
from .cross_vit import CrossViT
from .crossformer import CrossFormer
from .discriminator import ViTFamilyDiscriminator, make_discriminator
from .vit import ViT

__all__ = [
    "LMLT",
    "LMLT_tiny",
    "LMLT_base",
    "LMLT_large",
    "BadImageError",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "DamagedWeightsError",
    "FlexSRError",
    "IncompatibleWeightsError",
    "NonFiniteOutputError",
    "UnsafeCheckpointError",
    "UnsupportedModelError",
    "EIMN",
    "EIMN_A",
    "EIMN_L",
    "EIMNArch",
    "ReparamModule",
    "fusable_modules",
    "fuse",
    "InterpolationError",
    "interpolate_descriptors",
    "interpolate_models",
    "interpolate_state_dicts",
    "CompiledModel",
    "compiled",
    "FlexNet",
    "FlexNetArch",
    "MetaFlexNet",
    "REGISTRY",
    "FlexSRArchitecture",
    "canonical_state_dict",
    "closest_families",
    "combined_registry",
    "install",
    "load_model",
    "read_state_dict",
    "SR",
    "TransformerSR",
    "load_transformer_sr",
    "ViT",
    "CaiT",
    "CrossFormer",
    "CrossViT",
    "ViTFamilyDiscriminator",
    "make_discriminator",
    "LAMNet",
    "LAMNet_base",
    "LAMNet_large",
    "LAMNetArch",
]

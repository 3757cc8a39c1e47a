"""FlexSR architectures: models, their spandrel descriptors, the registry and reparameterization.

Pure torch + einops + spandrel; no ComfyUI. ``import archs`` works with the pack root on ``sys.path``.
"""

from .errors import (
    BadImageError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    FlexSRError,
    IncompatibleWeightsError,
    UnsafeCheckpointError,
    UnsupportedModelError,
)
from .reparam import ReparamModule, fusable_modules, fuse
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
from .lamnet import LAMNet, LAMNet_base, LAMNet_large, LAMNetArch  # after .registry, which imports the families

__all__ = [
    "BadImageError",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "FlexSRError",
    "IncompatibleWeightsError",
    "UnsafeCheckpointError",
    "UnsupportedModelError",
    "ReparamModule",
    "fusable_modules",
    "fuse",
    "REGISTRY",
    "FlexSRArchitecture",
    "canonical_state_dict",
    "closest_families",
    "combined_registry",
    "install",
    "load_model",
    "read_state_dict",
    "LAMNet",
    "LAMNet_base",
    "LAMNet_large",
    "LAMNetArch",
]

"""Which models the trainer can build, load, re-scale and export.

Presets (``--arch`` names): in each family module of ``archs``, the public model classes (decorated
with spandrel's ``store_hyperparameters``, with a scale argument: ``scale``, ``upscale``,
``upscaling_factor`` or ``factor``) and the preset functions (callable without arguments, returning
such a model), plus spandrel's built-in ``Compact`` and ``ESRGAN`` for comparison.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import archs
from archs.errors import UnsupportedModelError
from archs.files import safetensors_metadata

log = logging.getLogger("flexsr")

#: Names under which architectures take their upscale factor.
SCALE_KEYS = ("scale", "upscale", "upscaling_factor", "factor", "upscale_factor")


@dataclass(frozen=True)
class Preset:
    """A named way to build a model: ``build(**{scale_key: scale, **overrides})``."""

    name: str
    family: str
    build: Callable[..., nn.Module]
    scale_key: str


def _spandrel_presets() -> dict[str, Preset]:
    from spandrel.architectures.Compact import Compact
    from spandrel.architectures.ESRGAN import ESRGAN

    return {
        "Compact": Preset("Compact", "spandrel", Compact, "upscale"),
        "ESRGAN": Preset("ESRGAN", "spandrel", ESRGAN, "scale"),
    }


def _parameters(fn: Callable) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return {}


def _class_scale_key(cls: type) -> str | None:
    """Scale keyword of a model class decorated with spandrel's ``store_hyperparameters``."""
    wrapped = getattr(cls.__init__, "__wrapped__", None)
    if wrapped is None:
        return None
    params = _parameters(wrapped)
    return next((k for k in SCALE_KEYS if k in params), None)


def _function_scale_key(fn: Callable) -> str | None:
    """Scale keyword of a preset function (callable with no arguments, returns a model that records
    its hyperparameters), or None if ``fn`` is not one."""
    params = _parameters(fn)
    if not params and not callable(fn):
        return None
    if any(p.default is p.empty and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in params.values()):
        return None
    own = next((k for k in SCALE_KEYS if k in params), None)
    try:
        with torch.device("meta"):
            model = fn()
    except Exception:  # noqa: BLE001 - not buildable without arguments: not a preset
        return None
    hp = getattr(model, "hyperparameters", None) if isinstance(model, nn.Module) else None
    if not isinstance(hp, dict):
        return None
    return own or next((k for k in SCALE_KEYS if k in hp), None)


def _family_presets(module_name: str) -> dict[str, Preset]:
    module = importlib.import_module(f"archs.{module_name}")
    names = getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")]
    found = {}
    for n in names:
        obj = getattr(module, n, None)
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj):
            key = _class_scale_key(obj) if issubclass(obj, nn.Module) else None
        elif inspect.isfunction(obj):
            key = _function_scale_key(obj)
        else:
            continue
        if key is not None:
            found[n] = Preset(n, module_name, obj, key)
    return found


def available_presets() -> dict[str, Preset]:
    """Every model ``--arch`` accepts, by name: each family's model classes and preset functions
    (FlexSR's families first), then spandrel's ``Compact`` and ``ESRGAN``."""
    from archs.registry import FAMILY_MODULES

    presets: dict[str, Preset] = {}
    for module_name in FAMILY_MODULES:
        try:
            presets.update(_family_presets(module_name))
        except ImportError as e:  # pragma: no cover - a broken family must not hide the others
            log.warning("archs.%s could not be imported: %s", module_name, e)
    for n, p in _spandrel_presets().items():
        presets.setdefault(n, p)
    return presets


def find_preset(name: str) -> Preset:
    presets = available_presets()
    by_lower = {n.lower(): p for n, p in presets.items()}
    preset = presets.get(name) or by_lower.get(name.lower())
    if preset is None:
        raise UnsupportedModelError(f"Unknown --arch '{name}'. Available: {', '.join(presets)}.")
    return preset


def build_preset(name: str, scale: int, overrides: dict | None = None) -> nn.Module:
    """Build preset ``name`` at ``scale`` with keyword ``overrides`` (random weights, current RNG)."""
    preset = find_preset(name)
    kwargs = {**(overrides or {}), preset.scale_key: scale}
    try:
        return preset.build(**kwargs)
    except TypeError as e:
        raise ValueError(f"--arch {preset.name} cannot be built with --arch-args {overrides or {}}: {e}") from e


def model_scale(model: nn.Module) -> int | None:
    hp = getattr(model, "hyperparameters", {}) or {}
    key = next((k for k in SCALE_KEYS if k in hp), None)
    return int(hp[key]) if key else None


@dataclass
class LoadedModel:
    """A model to train and what happened to its weights."""

    model: nn.Module
    scale: int
    architecture: str
    reinitialized: list[str]  # state-dict keys that got fresh weights (the new tail)
    kept: list[str]  # keys loaded from the pretrained file (the body)


def load_pretrained(path: str | Path, scale: int | None = None) -> LoadedModel:
    """Load any checkpoint ``archs.load_model`` reads; with a different ``scale``, rebuild the model
    at that scale and keep every weight whose name and shape still fit (the new tail starts fresh)."""
    desc = archs.load_model(path)
    model, old = desc.model, int(desc.scale)
    arch_name = desc.architecture.name
    keys = list(model.state_dict())
    if scale is None or scale == old:
        return LoadedModel(model.train(), old, arch_name, [], keys)
    hp = getattr(model, "hyperparameters", None)
    key = next((k for k in SCALE_KEYS if k in (hp or {})), None)
    if key is None:
        raise UnsupportedModelError(
            f"{Path(path).name} is a x{old} {arch_name} model whose class does not record its hyperparameters; "
            f"it cannot be rebuilt at x{scale}. Fine-tune it at --scale {old}."
        )
    fresh = type(model)(**{**hp, key: scale})
    old_sd, new_sd = model.state_dict(), fresh.state_dict()
    kept = [k for k, v in new_sd.items() if k in old_sd and old_sd[k].shape == v.shape]
    reinit = [k for k in new_sd if k not in kept]
    fresh.load_state_dict({k: old_sd[k] for k in kept}, strict=False)
    if not reinit:
        log.info("x%d -> x%d: every weight of %s fits both scales; nothing re-initialized.", old, scale, arch_name)
    else:
        log.info("x%d -> x%d: re-initialized %d tensors of the tail (%s).", old, scale, len(reinit), ", ".join(reinit[:6]))
    return LoadedModel(fresh.train(), scale, arch_name, reinit, kept)


def bilinear_kernel(scale: int) -> torch.Tensor:
    """``[scale, scale, 3, 3]``: for each sub-pixel (i, j), the 3x3 LR taps of bilinear upsampling
    (align_corners=False), so conv + PixelShuffle with these weights is bilinear interpolation."""
    k = torch.zeros(scale, scale, 3, 3)
    for i in range(scale):
        oy = (i + 0.5) / scale - 0.5
        wy = torch.tensor([max(0.0, -oy), 1 - abs(oy), max(0.0, oy)])
        for j in range(scale):
            ox = (j + 0.5) / scale - 0.5
            wx = torch.tensor([max(0.0, -ox), 1 - abs(ox), max(0.0, ox)])
            k[i, j] = wy[:, None] * wx[None, :]
    return k


@torch.no_grad()
def init_as_bilinear(model: nn.Module, feature_gain: float = 0.1) -> bool:
    """Start a FlexNet with a pixel-shuffle tail as bilinear upsampling plus a small learned part.

    The short-cut ConvBlock's conv branch is zeroed and its 1x1 branch passes RGB through; the tail
    conv maps those channels to the bilinear sub-pixel taps, and its weights on the transformer
    features are scaled by ``feature_gain``. Training then learns a residual over bilinear from step 0
    instead of first learning to interpolate. Returns False (nothing done) for other models.
    """
    to_img, short_cut = getattr(model, "to_img", None), getattr(model, "short_cut", None)
    hp = getattr(model, "hyperparameters", {}) or {}
    if not (isinstance(to_img, nn.Sequential) and isinstance(getattr(to_img, "1", None), nn.PixelShuffle)):
        return False
    conv, conv11 = to_img[0], getattr(short_cut, "conv11", None)
    block = getattr(short_cut, "block", None)
    scale, cin, cout = int(hp.get("scale", 0)), int(hp.get("inp_channels", 3)), int(hp.get("out_channels", 3))
    dim = conv.in_channels // 2
    if not isinstance(conv, nn.Conv2d) or conv11 is None or block is None or cin != cout or conv.out_channels != cout * scale**2:
        return False
    last = [m for m in block if isinstance(m, nn.Conv2d)][-1]
    last.weight.zero_()
    last.bias.zero_()
    conv11.weight.zero_()
    conv11.bias.zero_()
    conv11.weight[:cin, :, 0, 0] = torch.eye(cin)
    conv.weight.mul_(feature_gain)
    conv.bias.zero_()
    k = bilinear_kernel(scale).reshape(scale * scale, 3, 3)
    for c in range(cout):
        conv.weight[c * scale * scale : (c + 1) * scale * scale, dim : dim + cin].zero_()
        conv.weight[c * scale * scale : (c + 1) * scale * scale, dim + c] = k
    return True


def freeze_norm_statistics(model: nn.Module) -> int:
    """Put every batch-norm layer in eval mode: it normalises with its stored running statistics and stops
    updating them, while its affine weights still train. Fine-tuning a converged model (EIMN has 28 such
    layers) on small batches otherwise re-learns around batch statistics and overwrites the running ones.
    Returns how many layers were frozen."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.eval()
    return len(norms)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


#: File-name tokens for load options that some architectures cannot read from the weights
#: (the DaViT-style transformer's window size and heads: ``..._w4_h16.safetensors``).


def _detected_spec(state_dict: dict):
    for support in archs.combined_registry().architectures("detection"):
        try:
            if support.detect(state_dict):
                return support.architecture
        except Exception:  # noqa: BLE001
            continue
    return None


def export_name(model: nn.Module, name: str) -> str:
    """``name``, plus the file-name hints (``_w4_h2``) the loader needs for hyperparameters that leave
    no trace in the weights, when the model's architecture reads such hints."""
    spec = _detected_spec(model.state_dict())
    hp = getattr(model, "hyperparameters", {}) or {}
    letters = getattr(spec, "filename_hints", {}) or {}
    wanted = {k: hp[k] for k in letters if k in hp}
    if not wanted:
        return name
    if spec.hints_from_filename(name + ".safetensors") == wanted:
        return name
    candidate = name + "".join(f"_{letters[k]}{v}" for k, v in wanted.items())
    return candidate if spec.hints_from_filename(candidate + ".safetensors") == wanted else name


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def export_safetensors(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write ``model``'s weights as .safetensors atomically, then read the file back through
    ``archs.load_model`` (what the loader node does) and check it rebuilds the same model."""
    from safetensors.torch import save

    from .checkpoint import atomic_write

    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    data = save(tensors, metadata={k: str(v) for k, v in (metadata or {}).items()})  # bytes: a full disk is an OSError
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
    desc = archs.load_model(path)  # raises if the loader could not read what we wrote
    want = {k: _plain(v) for k, v in (getattr(model, "hyperparameters", {}) or {}).items()}
    got = {k: _plain(v) for k, v in (getattr(desc.model, "hyperparameters", {}) or {}).items()}
    if want and got and type(desc.model) is type(model) and want != got:
        diff = {k: (want.get(k), got.get(k)) for k in set(want) | set(got) if want.get(k) != got.get(k)}
        log.warning("%s loads as a %s with other settings than trained (trained, loaded): %s", path.name,
                    type(desc.model).__name__, diff)
    return path


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def lineage(path: str | Path, prefix: str) -> dict[str, str]:
    """What a model made from the file at ``path`` records of it: ``{prefix: "name sha256=..."}`` and, for a
    .safetensors file that carries provenance (a fine-tune or a blend made here), its metadata under
    ``prefix_`` names, so a chain of fine-tunes and blends stays readable from the last file alone."""
    path = Path(path)
    record = {prefix: f"{path.name} sha256={file_sha256(path)}"}
    try:
        meta = safetensors_metadata(path)
    except Exception:  # noqa: BLE001 - metadata is a courtesy; the weights were loaded elsewhere
        meta = {}
    record.update({f"{prefix}_{k}": v for k, v in meta.items() if k not in ("flexsr_architecture", "scale")})
    return record


"""Loading, describing, fusing and saving upscale models (the work behind the model nodes)."""

from __future__ import annotations

import copy
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Optional

import torch
from spandrel import ImageModelDescriptor

from ..archs import FlexSRError, fusable_modules, fuse, load_model
from . import host
from .engine import alignment, parameter_count

log = logging.getLogger("flexsr")

META_ARCH = "flexsr.architecture"
META_SCALE = "flexsr.scale"
META_FUSED = "flexsr.fused"
META_CHANNELS = "flexsr.channels"
SAFETENSORS = ".safetensors"
_NAME = re.compile(r"^[\w\-+()\[\],. ]+$")


class InvalidNameError(FlexSRError, ValueError):
    """A save name that is not a plain file name (separators, '..', odd characters)."""


class ModelExistsError(FlexSRError, FileExistsError):
    """Saving would replace an existing file and overwriting was not asked for."""


def load(path: str | os.PathLike) -> ImageModelDescriptor:
    """``archs.load_model`` plus FlexSR's own metadata: a model saved fused is fused again."""
    model = load_model(path)
    if str(path).lower().endswith(SAFETENSORS) and read_metadata(path).get(META_FUSED) == "1":
        fuse(model)
    return model


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except Exception:  # metadata is a convenience: a file without it loads the same
        return {}


def describe(model: ImageModelDescriptor) -> str:
    """One line per fact: architecture, scale, parameters, channels, size needs, precisions."""
    req = model.size_requirements
    needs = []
    if req.minimum:
        needs.append(f"at least {req.minimum} px")
    if req.multiple_of > 1:
        needs.append(f"multiple of {req.multiple_of} px")
    if req.square:
        needs.append("square")
    sizes = ", ".join(needs) + " (padded automatically)" if needs else "any (≥ 1×1)"
    unit = alignment(model)
    precisions = ["fp32"] + (["fp16"] if model.supports_half else []) + (["bf16"] if model.supports_bfloat16 else [])
    fusable = fusable_modules(model)
    lines = [
        f"architecture: {arch_label(model)}",
        f"purpose: {model.purpose}, scale: {model.scale}×",
        f"parameters: {parameter_count(model):,}",
        f"channels: {model.input_channels} → {model.output_channels}",
        f"sizes: {sizes}" + (f"; tile grid {unit} px" if unit > 1 else ""),
        f"precision: {', '.join(precisions)}",
    ]
    if model.tags:
        lines.append(f"tags: {', '.join(map(str, model.tags))}")
    if fusable:
        fused = sum(1 for m in fusable if m.fused)
        lines.append(f"OmniShift: {len(fusable)} modules, {fused} fused")
    return "\n".join(lines)


def arch_label(model: ImageModelDescriptor) -> str:
    """The architecture's name, with its spandrel id in brackets only when that says something more."""
    name, arch_id = str(model.architecture.name), str(model.architecture.id)
    return name if arch_id.lower() == name.lower() else f"{name} ({arch_id})"


_described: dict[str, tuple[tuple[int, int], str]] = {}


def describe_file(path: str | os.PathLike) -> str:
    """:func:`describe` of the model in ``path``, cached per file (path, size and modification time).

    Loads the weights on the CPU (no forward pass) the first time; a changed file is read again.
    """
    path = Path(path)
    st = path.stat()
    stamp = (st.st_mtime_ns, st.st_size)
    key = str(path.resolve())
    hit = _described.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    text = describe(load(path))
    _described[key] = (stamp, text)
    return text


def copy_descriptor(model: ImageModelDescriptor, tags: Optional[list[str]] = None) -> ImageModelDescriptor:
    """A new descriptor around a deep copy of ``model``'s module (same architecture and facts)."""
    module = copy.deepcopy(model.model)
    return ImageModelDescriptor(
        module,
        module.state_dict(),
        architecture=model.architecture,
        purpose=model.purpose,
        tags=list(model.tags if tags is None else tags),
        supports_half=model.supports_half,
        supports_bfloat16=model.supports_bfloat16,
        scale=model.scale,
        input_channels=model.input_channels,
        output_channels=model.output_channels,
        size_requirements=copy.copy(model.size_requirements),
        tiling=model.tiling,
        call_fn=getattr(model, "_call_fn", None),
    )


def fused_copy(model: ImageModelDescriptor) -> tuple[ImageModelDescriptor, int]:
    """(a fused copy, number of modules fused); ``model`` itself when nothing needs fusing."""
    todo = [m for m in fusable_modules(model) if not m.fused]
    if not todo:
        return model, 0
    tags = list(model.tags) + ([] if "fused" in model.tags else ["fused"])
    result = copy_descriptor(model, tags).eval()
    fuse(result)
    return result, len(todo)


def check_name(name: str) -> str:
    """``name`` as a plain ``.safetensors`` file name, or :class:`InvalidNameError`."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidNameError("Give the model a file name, e.g. 'my_model'.")
    name = name.strip()
    if "/" in name or "\\" in name or os.sep in name or (os.altsep and os.altsep in name):
        raise InvalidNameError(
            f"'{name}' contains a path separator; give a plain file name (models are saved in the "
            f"upscale_models folder)."
        )
    if ".." in name or name.startswith("."):
        raise InvalidNameError(f"'{name}' contains '..' or starts with '.'; give a plain file name.")
    if not _NAME.match(name):
        raise InvalidNameError(
            f"'{name}' has characters a file name should not have; use letters, digits, spaces and - _ + ( ) [ ] , ."
        )
    if not name.lower().endswith(SAFETENSORS):
        name += SAFETENSORS
    return name


def save(model: ImageModelDescriptor, name: str, overwrite: bool = False,
         folder: Optional[Path] = None) -> Path:
    """Write ``model``'s weights to ``<upscale_models>/<name>.safetensors`` atomically; return the path.

    The name is checked first and an existing file is refused unless ``overwrite``: on any error
    nothing is written. The file holds the state dict (hyperparameters stay derivable from shapes)
    and metadata naming the architecture, scale, channels and whether it was fused.
    """
    from safetensors.torch import save_file

    filename = check_name(name)
    folder = Path(folder) if folder is not None else host.model_folders()[0]
    target = folder / filename
    if target.exists() and not overwrite:
        raise ModelExistsError(f"'{target}' already exists; choose another name or turn on overwrite.")
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.model.state_dict().items()}
    fusable = fusable_modules(model)
    metadata = {
        "format": "pt",
        META_ARCH: model.architecture.id,
        META_SCALE: str(model.scale),
        META_CHANNELS: f"{model.input_channels}->{model.output_channels}",
        META_FUSED: "1" if fusable and all(m.fused for m in fusable) else "0",
    }
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".flexsr-", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; a model file is an ordinary file
        if overwrite:
            os.replace(tmp, target)
        else:
            _publish_new(Path(tmp), target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("FlexSR: saved %s", target)
    return target


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publish_new(tmp: Path, target: Path) -> None:
    """Move ``tmp`` to ``target`` without ever replacing a file that appeared meanwhile."""
    try:
        os.link(tmp, target)  # atomic, fails if target exists
    except FileExistsError:
        raise ModelExistsError(f"'{target}' already exists; choose another name or turn on overwrite.") from None
    except OSError:  # no hard links on this file system
        if target.exists():
            raise ModelExistsError(f"'{target}' already exists; choose another name or turn on overwrite.") from None
        os.replace(tmp, target)

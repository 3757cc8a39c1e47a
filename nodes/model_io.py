"""Loading, describing, fusing and saving upscale models (the work behind the model nodes)."""

from __future__ import annotations

import copy
import errno
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Optional

import torch
from spandrel import ImageModelDescriptor

from ..archs import FlexSRError, fusable_modules, fuse, interpolate_descriptors, load_model
from ..archs.errors import DiskFullError, is_no_room
from ..archs.files import safetensors_metadata
from . import host
from .engine import alignment, parameter_count

log = logging.getLogger("flexsr")

META_ARCH = "flexsr.architecture"
META_SCALE = "flexsr.scale"
META_FUSED = "flexsr.fused"
META_CHANNELS = "flexsr.channels"
#: What a model is for, in a sentence (the pack's shipped models carry it; the loader's panel shows it).
META_USE = "flexsr_use"
SAFETENSORS = ".safetensors"
_NAME = re.compile(r"^[\w\-+()\[\],. ]+$")
#: Names Windows reserves for devices, with any extension and in any case (a pack saved on Linux is
#: opened on Windows).
RESERVED = frozenset(
    ["CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$", "CLOCK$"]
    + [f"{d}{i}" for d in ("COM", "LPT") for i in list("123456789") + ["\u00b9", "\u00b2", "\u00b3", "0"]]
)
#: Longest file name (bytes, UTF-8) common file systems accept.
MAX_NAME_BYTES = 255


class InvalidNameError(FlexSRError, ValueError):
    """A save name that is not a plain file name (separators, '..', odd characters)."""


class ModelExistsError(FlexSRError, FileExistsError):
    """Saving would replace an existing file and overwriting was not asked for."""


class ModelSaveError(FlexSRError, OSError):
    """The file system refused to write the model (permissions, full disk, a directory in the way)."""


def load(path: str | os.PathLike) -> ImageModelDescriptor:
    """``archs.load_model`` plus FlexSR's own metadata: a model saved fused is fused again."""
    model = load_model(path)
    model.flexsr_source = Path(path).name  # named in errors (the engine's NaN/Inf check)
    if str(path).lower().endswith(SAFETENSORS) and read_metadata(path).get(META_FUSED) == "1":
        fuse(model)
    return model


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The file's FlexSR metadata, or ``{}``: metadata is a convenience, a file without it (or one the loader
    will refuse for its own reasons) loads the same."""
    try:
        return safetensors_metadata(path)
    except (FlexSRError, OSError):
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


_described: dict[str, tuple[tuple[int, int], str | FlexSRError]] = {}


def describe_file(path: str | os.PathLike) -> str:
    """:func:`describe` of the model in ``path``, cached per file (path, size and modification time).

    Loads the weights on the CPU (no forward pass) the first time; a changed file is read again. A file that
    fails to load is cached too (its error is raised again without reading the file again), so requests for a
    crafted file cost its refusal once.
    """
    path = Path(path)
    st = path.stat()
    stamp = (st.st_mtime_ns, st.st_size)
    key = str(path.resolve())
    hit = _described.get(key)
    if hit is not None and hit[0] == stamp:
        if isinstance(hit[1], FlexSRError):
            raise hit[1]
        return hit[1]
    try:
        text = describe(load(path))
    except FlexSRError as e:
        _described[key] = (stamp, e)
        raise
    use = read_metadata(path).get(META_USE, "").strip() if str(path).lower().endswith(SAFETENSORS) else ""
    if use:  # what the file says it is for (the pack's own models: clean drawn art, or JPEG'd images)
        text = f"for: {use}\n{text}"
    _described[key] = (stamp, text)
    return text


def copy_descriptor(model: ImageModelDescriptor, tags: Optional[list[str]] = None,
                    module: Optional[torch.nn.Module] = None) -> ImageModelDescriptor:
    """A new descriptor around a deep copy of ``model``'s module (or around ``module``, a module of the same
    architecture), with the same architecture and facts."""
    module = copy.deepcopy(model.model) if module is None else module
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


def interpolated(a: ImageModelDescriptor, b: ImageModelDescriptor, alpha: float) -> ImageModelDescriptor:
    """A new model whose weights are ``(1 - alpha) * a + alpha * b`` (same architecture, scale and channels;
    :class:`archs.InterpolationError` otherwise). The inputs are left as they are."""
    module = interpolate_descriptors(a, b, alpha, ("model A", "model B")).eval()
    tags = [t for t in a.tags if t != "interpolated"] + ["interpolated"]
    return copy_descriptor(a, tags, module)


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
    name = name.rstrip(". ")  # Windows drops trailing dots and spaces; 'name.' must not become 'name..safetensors'
    if not name:
        raise InvalidNameError("Give the model a file name, e.g. 'my_model'.")
    if not name.lower().endswith(SAFETENSORS):
        name += SAFETENSORS
    base = name.split(".")[0].rstrip(" ").upper()
    if base in RESERVED:
        raise InvalidNameError(
            f"'{name}' starts with '{name.split('.')[0]}', a device name Windows reserves (CON, PRN, AUX, NUL, "
            f"COM1-9, LPT1-9), so the file could not be opened there; choose another name."
        )
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise InvalidNameError(
            f"The name is {len(name.encode('utf-8'))} bytes long with its extension; file systems accept at most "
            f"{MAX_NAME_BYTES}. Choose a shorter name."
        )
    return name


def save(model: ImageModelDescriptor, name: str, overwrite: bool = False,
         folder: Optional[Path] = None) -> Path:
    """Write ``model``'s weights to ``<upscale_models>/<name>.safetensors`` atomically; return the path.

    The name is checked first: a plain name, not one of the pack's shipped models (a file of that name would
    hide the shipped one from every loader), and an existing file is refused unless ``overwrite``. On any error
    nothing is written, and the message names the file, never a server path. The file holds the state dict
    (hyperparameters stay derivable from shapes) and metadata naming the architecture, scale, channels and
    whether it was fused.
    """
    from safetensors.torch import save as serialise

    filename = check_name(name)
    if filename in host.SHIPPED_FIRST:
        raise ModelExistsError(
            f"'{Path(filename).stem}' is the name of a model that comes with FlexSR; a file of that name would hide "
            f"it from every loader. Choose another name (e.g. '{Path(filename).stem}_mine').")
    folder = Path(folder) if folder is not None else host.model_folders()[0]
    where = folder.name or str(folder)
    target = folder / filename
    if folder.exists() and not folder.is_dir():
        raise ModelSaveError(f"Cannot save '{filename}': the models folder '{where}' is a file, not a folder. "
                             f"Nothing was written.")
    if target.is_dir() or (target.is_symlink() and not target.exists()):
        raise ModelExistsError(f"'{filename}' in '{where}' is a {'folder' if target.is_dir() else 'broken link'}; "
                               f"choose another name.")
    if target.exists() and not overwrite:
        raise ModelExistsError(f"'{filename}' already exists in '{where}'; choose another name or turn on overwrite.")
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.model.state_dict().items()}
    fusable = fusable_modules(model)
    metadata = {
        "format": "pt",
        META_ARCH: model.architecture.id,
        META_SCALE: str(model.scale),
        META_CHANNELS: f"{model.input_channels}->{model.output_channels}",
        META_FUSED: "1" if fusable and all(m.fused for m in fusable) else "0",
    }
    data = serialise(tensors, metadata=metadata)  # bytes: writing them is plain file I/O, whose errors say what failed
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(folder)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=TEMP_PREFIX, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; a model file is an ordinary file
        if overwrite:
            os.replace(tmp, target)
        else:
            _publish_new(Path(tmp), target)
    except FlexSRError:
        raise
    except OSError as e:
        if is_no_room(e):
            raise DiskFullError(f"No room to save '{filename}' in '{where}' ({e.strerror or e}); free some space. "
                                f"Nothing was written.") from None
        if e.errno in (errno.ENAMETOOLONG, errno.EINVAL, errno.EILSEQ):
            raise InvalidNameError(f"The file system refuses the name '{filename}': {e.strerror}.") from None
        if e.errno == errno.EISDIR:
            raise ModelExistsError(f"'{filename}' in '{where}' is a folder; choose another name.") from None
        if e.errno in (errno.ENOTDIR, errno.EEXIST):
            raise ModelSaveError(f"Cannot save '{filename}': the models folder '{where}' is not a folder "
                                 f"({e.strerror}). Nothing was written.") from None
        raise ModelSaveError(f"Could not save '{filename}' in '{where}': {e.strerror or e}. Nothing was written.") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    log.info("FlexSR: saved %s", target)
    return target


TEMP_PREFIX = ".flexsr-"
#: A temporary file older than this is a leftover of a save that was killed; newer ones may be live.
STALE_SECONDS = 3600


def _remove_stale_temporaries(folder: Path) -> None:
    """Delete leftovers of saves killed mid-write (``.flexsr-*.tmp`` untouched for an hour)."""
    import time

    now = time.time()
    for leftover in folder.glob(TEMP_PREFIX + "*.tmp"):
        try:
            if leftover.is_file() and not leftover.is_symlink() and now - leftover.stat().st_mtime > STALE_SECONDS:
                leftover.unlink()
                log.info("FlexSR: removed %s, left by an interrupted save", leftover.name)
        except OSError:
            pass


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publish_new(tmp: Path, target: Path) -> None:
    """Move ``tmp`` to ``target`` without ever replacing a file that appeared meanwhile."""
    try:
        os.link(tmp, target)  # atomic, fails if target exists
    except FileExistsError:
        raise ModelExistsError(f"'{target.name}' already exists in '{target.parent.name}'; choose another name or "
                               f"turn on overwrite.") from None
    except OSError:  # no hard links on this file system
        if target.exists():
            raise ModelExistsError(f"'{target.name}' already exists in '{target.parent.name}'; choose another name "
                                   f"or turn on overwrite.") from None
        os.replace(tmp, target)

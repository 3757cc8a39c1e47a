"""FlexSR's architecture registry, spandrel integration and the safe checkpoint loader."""

from __future__ import annotations

import importlib
import logging
import os
import pickle
import re
from pathlib import Path, PurePath
from typing import Iterable, Mapping

import torch
from spandrel import (
    MAIN_REGISTRY,
    ArchRegistry,
    ArchSupport,
    Architecture,
    ImageModelDescriptor,
    canonicalize_state_dict,
)
from spandrel import UnsupportedModelError as _SpandrelUnsupported

from .errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompatibleWeightsError,
    UnsafeCheckpointError,
    UnsupportedModelError,
)

log = logging.getLogger("flexsr")

StateDict = dict[str, torch.Tensor]

#: Family modules of ``archs`` that define upscaling architectures; each exposes ``ARCHITECTURES``.
FAMILY_MODULES: tuple[str, ...] = ("flexnet", "lmlt", "lamnet", "transformer_sr", "eimn")

CHECKPOINT_EXTENSIONS = (".pth", ".pt", ".ckpt", ".bin", ".safetensors")


class FlexSRArchitecture(Architecture):
    """A spandrel ``Architecture`` that can also describe its own key layout.

    Subclasses implement ``load`` and ``signature_model()`` (any small instance, built on the meta
    device, whose state-dict keys show the family's layout); the latter lets an unknown checkpoint's
    error message name the closest families.

    ``load_options`` names the keyword options ``load`` takes for what the weights cannot show (a
    window size, say); ``archs.load_model(path, **options)`` passes them, and fills them first from
    ``hints_from_filename(file name)`` where the architecture reads hints from names.
    """

    load_options: tuple[str, ...] = ()
    #: ``{option: letter}``: integer options a file name may carry as ``_<letter><N>`` tokens.
    filename_hints: dict[str, str] = {}

    def hints_from_filename(self, name: str) -> dict:
        """Values for some of ``load_options`` read from a checkpoint's file name (see ``filename_hints``)."""
        return int_hints_from_filename(name, self.filename_hints)

    def signature_model(self) -> torch.nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def signature_keys(self) -> set[str]:
        with torch.device("meta"):
            model = self.signature_model()
        return {_key_pattern(k) for k in model.state_dict()}


def int_hints_from_filename(name: str | os.PathLike, letters: Mapping[str, str]) -> dict[str, int]:
    """Integer options named in a file name: ``..._w4_h16.pt`` with ``{"window_size": "w", "num_heads": "h"}``
    -> ``{"window_size": 4, "num_heads": 16}``.

    Reads separate ``<letter><N>`` tokens (split at ``_``, ``-``, ``.``, spaces; any case) of the file's
    stem. A token that appears with two different values is ignored. Returns only what it found.
    """
    tokens = re.split(r"[^0-9a-z]+", PurePath(str(name)).stem.lower())
    hints: dict[str, int] = {}
    for option, letter in letters.items():
        values = {int(t[len(letter):]) for t in tokens if re.fullmatch(re.escape(letter) + r"\d+", t)}
        if len(values) == 1 and (value := values.pop()) > 0:
            hints[option] = value
    return hints


def _key_pattern(key: str) -> str:
    return re.sub(r"\.\d+(?=\.|$)", ".#", key)


def _build_registry() -> ArchRegistry:
    registry = ArchRegistry()
    for name in FAMILY_MODULES:
        module = importlib.import_module(f".{name}", __package__)
        registry.add(*(ArchSupport.from_architecture(a) for a in module.ARCHITECTURES))
    return registry


REGISTRY: ArchRegistry = _build_registry()


def install(registry: ArchRegistry | None = None) -> ArchRegistry:
    """Add FlexSR's architectures to spandrel's ``MAIN_REGISTRY`` (or ``registry``); idempotent.

    Safe to call after ComfyUI (or anything else) added spandrel's extra architectures: ours are
    added beside them, nothing is replaced. Returns the registry.
    """
    target = MAIN_REGISTRY if registry is None else registry
    target.add(*REGISTRY.architectures("insertion"), ignore_duplicates=True)
    return target


def combined_registry() -> ArchRegistry:
    """A fresh registry with FlexSR's architectures first, then everything spandrel knows now."""
    registry = REGISTRY.copy()
    registry.add(*MAIN_REGISTRY.architectures("insertion"), ignore_duplicates=True)
    return registry


# --------------------------------------------------------------------------------------------------
# Reading checkpoint files


def read_state_dict(path: str | os.PathLike) -> StateDict:
    """Read a checkpoint file into a canonical state dict without executing code.

    Supports .pth/.pt/.ckpt/.bin (torch pickles, read with ``weights_only=True``) and .safetensors.
    Unwraps ``params_ema`` (preferred), ``params``, ``state_dict``, ``model`` and ``module.`` prefixes.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"Checkpoint not found: '{path}' does not exist or is not a file.")
    if path.stat().st_size == 0:
        raise CorruptCheckpointError(f"Checkpoint '{path.name}' is empty (0 bytes); download it again.")
    ext = path.suffix.lower()
    if ext == ".safetensors":
        raw = _read_safetensors(path)
    elif ext in CHECKPOINT_EXTENSIONS:
        raw = _read_torch_pickle(path)
    else:
        raise CorruptCheckpointError(
            f"'{path.name}' has extension '{ext}', which is not a checkpoint format FlexSR reads "
            f"({', '.join(CHECKPOINT_EXTENSIONS)})."
        )
    return canonical_state_dict(raw, source=path.name)


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CorruptCheckpointError(
            f"'{path.name}' is not a readable .safetensors file (truncated or corrupt): {e}"
        ) from e


def _read_torch_pickle(path: Path) -> object:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Unsupported global" in msg or "GLOBAL" in msg or "Unsupported operand" in msg:
            raise UnsafeCheckpointError(
                f"Refused to load '{path.name}': it is a pickle that imports objects beyond plain tensors "
                f"(it could run code). Nothing from it was executed. Only load it if you trust its source, "
                f"and convert it to .safetensors. Detail: {msg.splitlines()[0] if msg else ''}"
            ) from e
        raise CorruptCheckpointError(f"'{path.name}' is not a valid PyTorch checkpoint: {msg[:300]}") from e
    except Exception as e:  # the weights-only unpickler fails in many ways on damaged or foreign files
        raise CorruptCheckpointError(
            f"'{path.name}' is truncated or is not a PyTorch checkpoint ({type(e).__name__}: {str(e)[:300]})."
        ) from e


def canonical_state_dict(raw: object, source: str = "state dict") -> StateDict:
    """Unwrap the usual containers (``params_ema`` > ``params``, ``state_dict``, ``model``, ``module.``)."""
    if not isinstance(raw, Mapping):
        raise CorruptCheckpointError(f"{source} holds a {type(raw).__name__}, not a dict of tensors.")
    sd = canonicalize_state_dict(dict(raw))
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CorruptCheckpointError(f"{source} contains no tensors; it is not a model checkpoint.")
    return tensors


# --------------------------------------------------------------------------------------------------
# Loading models


def load_model(source: str | os.PathLike | Mapping[str, torch.Tensor], **options) -> ImageModelDescriptor:
    """Load a checkpoint (path or state dict) of any FlexSR or spandrel architecture.

    ``options`` go to the detected architecture's ``load`` (only those in its ``load_options``; others
    raise ``TypeError``); for a file, hints the architecture reads from the file name come first and
    ``options`` override them. Returns a spandrel ``ImageModelDescriptor`` in eval mode on the CPU. Raises one of
    :mod:`archs.errors`' types for every kind of bad input; never writes anything.
    """
    if isinstance(source, Mapping):
        state_dict = canonical_state_dict(source)
        name = "state dict"
    else:
        state_dict = read_state_dict(source)
        name = Path(source).name
    registry = combined_registry()
    arch = next((a for a in registry.architectures("detection") if _detects(a, state_dict)), None)
    if arch is None:
        raise UnsupportedModelError(_unknown_message(name, state_dict))
    spec = arch.architecture
    accepted = getattr(spec, "load_options", ())
    if set(options) - set(accepted):
        raise TypeError(
            f"load_model: {spec.name} takes no option(s) {sorted(set(options) - set(accepted))}"
            f" (it takes: {', '.join(accepted) or 'none'})."
        )
    if not isinstance(source, Mapping) and isinstance(spec, FlexSRArchitecture):
        hints = {k: v for k, v in spec.hints_from_filename(name).items() if k in accepted}
        options = {**hints, **options}
    try:
        descriptor = spec.load(dict(state_dict), **options)
    except IncompatibleWeightsError:
        raise
    except (RuntimeError, KeyError, IndexError, ValueError, TypeError, AssertionError) as e:
        raise IncompatibleWeightsError(
            f"{name} looks like a {arch.architecture.name} checkpoint, but its weights do not fit that "
            f"architecture ({type(e).__name__}: {_short(e)}). The file may be "
            f"damaged or from an incompatible variant."
        ) from e
    if not isinstance(descriptor, ImageModelDescriptor):
        raise UnsupportedModelError(
            f"{name} is a {arch.architecture.name} model ({descriptor.purpose}), not an image-to-image model."
        )
    return descriptor.eval()


def _short(e: Exception, limit: int = 1200) -> str:
    text = " ".join(line.strip() for line in str(e).strip().splitlines() if line.strip())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _detects(arch: ArchSupport, state_dict: StateDict) -> bool:
    try:
        return bool(arch.detect(state_dict))
    except Exception:  # a detector that trips over unusual keys simply does not claim the file
        return False


def closest_families(state_dict: Iterable[str], top: int = 3) -> list[tuple[str, float]]:
    """FlexSR families ranked by key-pattern overlap (Jaccard) with ``state_dict``'s keys."""
    keys = {_key_pattern(k) for k in state_dict}
    scores = []
    for support in REGISTRY.architectures("insertion"):
        arch = support.architecture
        if isinstance(arch, FlexSRArchitecture):
            ref = arch.signature_keys()
            union = keys | ref
            scores.append((arch.name, len(keys & ref) / len(union) if union else 0.0))
    scores.sort(key=lambda s: -s[1])
    return scores[:top]


def _unknown_message(name: str, state_dict: StateDict) -> str:
    ranked = [f"{n} ({s:.0%} key overlap)" for n, s in closest_families(state_dict) if s > 0]
    hint = f" Closest FlexSR families: {', '.join(ranked)}." if ranked else ""
    sample = ", ".join(list(state_dict)[:4])
    return (
        f"{name}: no known architecture (FlexSR's or spandrel's) matches its {len(state_dict)} keys "
        f"(first: {sample}).{hint}"
    )


__all__ = [
    "REGISTRY",
    "FAMILY_MODULES",
    "FlexSRArchitecture",
    "install",
    "combined_registry",
    "load_model",
    "read_state_dict",
    "canonical_state_dict",
    "closest_families",
    "_SpandrelUnsupported",
]

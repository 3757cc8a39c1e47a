"""FlexSR's architecture registry, spandrel integration, state-dict checks and the loader (files are read by
:mod:`archs.files`)."""

from __future__ import annotations

import functools
import gc
import importlib
import logging
import os
import re
import threading
import warnings
from pathlib import Path, PurePath
from typing import Iterable, Mapping

import torch
from spandrel import (
    MAIN_REGISTRY,
    ArchRegistry,
    ArchSupport,
    Architecture,
    ImageModelDescriptor,
)
from spandrel import UnsupportedModelError as _SpandrelUnsupported

from .files import check_views, read_checkpoint
from .errors import (
    FlexSRError,
    CorruptCheckpointError,
    DamagedWeightsError,
    IncompatibleWeightsError,
    UnsupportedModelError,
)

log = logging.getLogger("flexsr")

StateDict = dict[str, torch.Tensor]

#: Family modules of ``archs`` that define upscaling architectures; each exposes ``ARCHITECTURES``.
FAMILY_MODULES: tuple[str, ...] = ("flexnet", "lmlt", "lamnet", "transformer_sr", "eimn")



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

    def __init_subclass__(cls, **kwargs) -> None:
        # Every family's ``load`` is reached by archs.load_model, by spandrel's ModelLoader after
        # install() (ComfyUI's own loader) and by training's --pretrained: guard it where it is defined.
        super().__init_subclass__(**kwargs)
        load = cls.__dict__.get("load")
        if load is not None and not getattr(load, "_flexsr_guarded", False):
            cls.load = _guarded_load(load)

    def hints_from_filename(self, name: str) -> dict:
        """Values for some of ``load_options`` read from a checkpoint's file name (see ``filename_hints``)."""
        return int_hints_from_filename(name, self.filename_hints)

    def signature_model(self) -> torch.nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def sr_descriptor(self, model: torch.nn.Module, state_dict: StateDict, *, scale: int, tags: list[str],
                      input_channels: int, output_channels: int) -> ImageModelDescriptor:
        """The descriptor every SR family of the pack returns: "SR" above ×1, else "Restoration"; fp16
        and bf16 supported (the engine still picks per device and family)."""
        return ImageModelDescriptor(
            model,
            state_dict,
            architecture=self,
            purpose="SR" if scale > 1 else "Restoration",
            tags=tags,
            supports_half=True,
            supports_bfloat16=True,
            scale=scale,
            input_channels=input_channels,
            output_channels=output_channels,
        )

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


# --------------------------------------------------------------------------------------------------
# Guarded loading: nothing is allocated beyond what the file holds

#: A numbered child (``blocks.7``) may sit this far beyond twice the count of its numbered siblings
#: (gaps of param-less layers in a Sequential) before the key is refused as a claim of absent blocks.
_INDEX_SLACK = 8
#: Modules a build may create per state-dict key (published models: 0.6-1.1) plus a constant.
_MODULES_PER_KEY, _MODULES_EXTRA = 2, 64
#: Parameters and buffers a build may register beyond the file's keys (non-persistent buffers): a
#: strict load needs a key for every other one, so a build past this cannot succeed.
_TENSORS_EXTRA = 64
#: A group of more than this many numbered blocks must average at least half the keys of its fullest block
#: (published models: 72% or more), see check_block_indices.
_GROUP_CHECKED = 8
#: Tensor elements (parameters and buffers) a build may hold beyond the file's own.
_EXTRA_ELEMENTS = 1 << 22

_guard_state = threading.local()


def _guarded_load(load):
    @functools.wraps(load)
    def guarded(self, state_dict, *args, **kwargs):
        if getattr(_guard_state, "probing", False):  # a nested load inside a meta probe
            return load(self, state_dict, *args, **kwargs)
        family = getattr(self, "name", type(self).__name__)
        check_state_dict(state_dict, family)
        check_block_indices(state_dict, family)
        probe = _meta_probe(load, self, state_dict, args, kwargs, family)
        _check_probe(probe, state_dict, family)
        del probe
        return load(self, state_dict, *args, **kwargs)

    guarded._flexsr_guarded = True  # type: ignore[attr-defined]
    return guarded


def _keys_named(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(f"'{k}'" for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def check_state_dict(state_dict: Mapping, source: str = "state dict") -> None:
    """Damaged weights, named: non-string keys, non-tensor values, zero-size dimensions, NaN/Inf.

    Raises :class:`CorruptCheckpointError` (non-string keys) or :class:`DamagedWeightsError`.
    """
    bad_keys = [repr(k) for k in state_dict if not isinstance(k, str)]
    if bad_keys:
        raise CorruptCheckpointError(
            f"{source}: {len(bad_keys)} key(s) are not strings ({', '.join(bad_keys[:5])}); a state dict maps "
            f"parameter names to tensors. The file is damaged or not a model checkpoint."
        )
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CorruptCheckpointError(f"{source}: {_keys_named(not_tensors)} hold no tensor.")
    check_views(state_dict, source)  # before any value is read: a stride-0 view can pose as 2^32 elements
    empty = [k for k, v in state_dict.items() if v.numel() == 0 and v.is_floating_point()]
    if empty:
        shapes = ", ".join(f"'{k}' {list(state_dict[k].shape)}" for k in empty[:5])
        raise DamagedWeightsError(
            f"{source}: {len(empty)} tensor(s) have a zero-size dimension ({shapes}); the weights are damaged."
        )
    odd = [k for k, v in state_dict.items() if v.is_complex() or v.is_quantized or v.is_sparse
           or v.layout != torch.strided]
    if odd:
        raise DamagedWeightsError(f"{source}: {_keys_named(odd)} are complex, quantized or sparse tensors.")
    nonfinite = [k for k, v in state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if nonfinite:
        raise DamagedWeightsError(
            f"{source}: {_keys_named(nonfinite)} contain NaN or Inf values; a model with them outputs NaN. "
            f"The weights are damaged (a diverged training run or a broken download)."
        )


def check_block_indices(state_dict: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
    """Numbered children (``feats.<i>.…``) must not claim more blocks than the file holds.

    Run before anything is built: a single key ``blocks.5000000.x`` would otherwise make a loader
    that counts blocks by their highest index build five million of them.
    """
    seen: dict[str, set[int]] = {}
    top_index: dict[str, int] = {}
    example: dict[str, str] = {}
    for key in state_dict:
        parts = key.split(".")
        for i, part in enumerate(parts):
            if part.isdigit():
                if len(part) > 9:
                    raise IncompatibleWeightsError(
                        f"{source}: key '{key[:200]}' has the block index {part[:20]}…, which no model has; "
                        f"the checkpoint is crafted or damaged."
                    )
                prefix = ".".join(parts[:i])
                index = int(part)
                seen.setdefault(prefix, set()).add(index)
                if index >= top_index.get(prefix, -1):
                    top_index[prefix], example[prefix] = index, key
    for prefix, indices in seen.items():
        top = top_index[prefix]
        if top > 2 * len(indices) + _INDEX_SLACK:
            raise IncompatibleWeightsError(
                f"{source}: key '{example[prefix][:200]}' numbers a block {top} under '{prefix}', but the file "
                f"holds only {len(indices)} numbered entries there; the checkpoint claims blocks it does not "
                f"contain (crafted or damaged)."
            )
    # Blocks that are nearly empty: loaders build every block in full, so many blocks holding one key
    # each would make a small file build a large model (refused later, but only after the build).
    counts: dict[str, dict[int, int]] = {}
    for key in state_dict:
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            if part.isdigit():
                group = counts.setdefault(".".join(parts[:i]), {})
                group[int(part)] = group.get(int(part), 0) + 1
    for prefix, members in counts.items():
        n, fullest = len(members), max(members.values())
        if n > _GROUP_CHECKED and sum(members.values()) * 2 < n * fullest:  # published models: >= 0.72
            sparse = sum(1 for c in members.values() if c * 2 < fullest)
            raise IncompatibleWeightsError(
                f"{source}: {sparse} of the {n} blocks under '{prefix}' hold far fewer keys than the fullest "
                f"({fullest}); the checkpoint names blocks it does not contain (crafted or damaged)."
            )


class _BuildBudget:
    """Module-registration hooks that stop a meta build creating more modules or elements than allowed."""

    def __init__(self, max_modules: int, max_elements: int, max_tensors: int, family: str):
        self.max_modules, self.max_elements, self.max_tensors = max_modules, max_elements, max_tensors
        self.family = family
        self.modules = self.elements = self.tensors = 0
        self.owner = threading.get_ident()
        self.handles: list = []

    def __enter__(self):
        from torch.nn.modules import module as m

        self.handles = [
            m.register_module_module_registration_hook(self._module),
            m.register_module_parameter_registration_hook(self._tensor),
            m.register_module_buffer_registration_hook(self._tensor),
        ]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()

    def _module(self, parent, name, module):
        if threading.get_ident() == self.owner:
            self.modules += 1
            if self.modules > self.max_modules:
                raise IncompatibleWeightsError(
                    f"{self.family}: the keys and shapes describe a model of more than {self.max_modules} "
                    f"modules, far more than the file's weights fill; the checkpoint is crafted or damaged."
                )

    def _tensor(self, module, name, tensor):
        if threading.get_ident() == self.owner and tensor is not None:
            self.tensors += 1
            if self.tensors > self.max_tensors:
                raise IncompatibleWeightsError(
                    f"{self.family}: the model read from the keys has more than {self.max_tensors} weight tensors, "
                    f"more than the file holds; the checkpoint is crafted or damaged."
                )
            if tensor.device.type != "meta":
                self.elements += tensor.numel()
                if self.elements > self.max_elements:
                    raise IncompatibleWeightsError(
                        f"{self.family}: building the model would allocate more than the file holds "
                        f"({self.elements:,} elements); the checkpoint is crafted or damaged."
                    )


def _state_elements(state_dict: Mapping[str, torch.Tensor]) -> int:
    return sum(v.numel() for v in state_dict.values())


def _meta_probe(load, arch, state_dict, args, kwargs, family: str):
    """Run ``load`` with every new tensor on the meta device: shapes and keys are compared (strict
    ``load_state_dict``), nothing is allocated. Returns the meta descriptor."""
    keys = len(state_dict)
    budget = _BuildBudget(_MODULES_PER_KEY * keys + _MODULES_EXTRA, 2 * _state_elements(state_dict) + _EXTRA_ELEMENTS,
                          keys + keys // 8 + _TENSORS_EXTRA, family)
    _guard_state.probing = True
    collecting = gc.isenabled()
    gc.disable()  # thousands of short-lived modules: collection passes over a large heap would dominate
    try:
        with warnings.catch_warnings(), torch.device("meta"), budget:
            warnings.simplefilter("ignore")  # "copying from a non-meta parameter ... is a no-op"
            return load(arch, dict(state_dict), *args, **kwargs)
    except FlexSRError:
        raise
    except TypeError as e:
        if "unexpected keyword" in str(e) or "positional argument" in str(e):
            raise
        raise _incompatible(family, e) from e
    except (RuntimeError, KeyError, IndexError, ValueError, AssertionError, ArithmeticError,
            NotImplementedError, AttributeError) as e:
        raise _incompatible(family, e) from e
    finally:
        _guard_state.probing = False
        if collecting:
            gc.enable()


def _incompatible(family: str, e: Exception) -> IncompatibleWeightsError:
    return IncompatibleWeightsError(
        f"The weights do not fit the {family} architecture read from their keys and shapes "
        f"({type(e).__name__}: {_short(e, 600)}). The file may be damaged or from an incompatible variant."
    )


def _check_probe(probe, state_dict: Mapping[str, torch.Tensor], family: str) -> None:
    model = getattr(probe, "model", None)
    if not isinstance(model, torch.nn.Module):
        return
    own = _state_elements(state_dict)
    total = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    if total > 2 * own + _EXTRA_ELEMENTS:
        raise IncompatibleWeightsError(
            f"{family}: the model read from the keys holds {total:,} elements, the file only {own:,}; "
            f"the checkpoint is crafted or damaged."
        )
    expected = model.state_dict()
    wrong = [
        f"'{k}' ({state_dict[k].dtype})"
        for k, t in expected.items()
        if k in state_dict and t.is_floating_point() and not state_dict[k].is_floating_point()
    ]
    if wrong:
        raise DamagedWeightsError(
            f"{family}: {', '.join(wrong[:5])}{' …' if len(wrong) > 5 else ''} hold integer or bool values "
            f"where the model has floating-point weights; the weights are damaged."
        )


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
    """Read a checkpoint file into a canonical state dict without executing code, within bounds
    (:mod:`archs.files`).

    Supports .pth/.pt/.ckpt/.bin (torch pickles, read with ``weights_only=True``) and .safetensors.
    Unwraps ``params_ema`` (preferred), ``params``, ``state_dict``, ``model`` and ``module.`` prefixes.
    """
    return canonical_state_dict(read_checkpoint(path), source=Path(path).name)


#: Containers of a state dict, most preferred first (EMA weights over raw ones).
CONTAINER_KEYS = ("params_ema", "params-ema", "params", "state_dict", "model_state_dict", "model", "net_g",
                  "net", "generator")
PREFIXES = ("module.", "_orig_mod.", "netG.")


def _holds_tensors(value: object) -> bool:
    return isinstance(value, Mapping) and any(isinstance(v, torch.Tensor) for v in value.values())


def canonical_state_dict(raw: object, source: str = "state dict") -> StateDict:
    """The state dict inside the usual containers, with wrapper prefixes removed.

    Containers, first found wins: ``params_ema`` > ``params`` > ``state_dict`` / ``model`` / ``net_g``
    (other entries beside them, such as ``iter`` or ``optimizer``, are ignored); a dict with a single
    dict inside is unwrapped. ``module.`` (DataParallel) and ``_orig_mod.`` (torch.compile) prefixes
    shared by all keys are stripped. Non-string keys and non-tensor entries in the state dict itself
    are errors naming them.
    """
    for _ in range(4):
        if not isinstance(raw, Mapping):
            raise CorruptCheckpointError(f"{source} holds a {type(raw).__name__}, not a dict of tensors.")
        bad = [repr(k)[:60] for k in raw if not isinstance(k, str)]
        if bad:
            raise CorruptCheckpointError(
                f"{source}: {len(bad)} key(s) are not strings ({', '.join(bad[:5])}); a state dict maps "
                f"parameter names to tensors. The file is damaged or not a model checkpoint."
            )
        inner = next((raw[k] for k in CONTAINER_KEYS if k in raw and _holds_tensors(raw[k])), None)
        if inner is None and len(raw) == 1 and isinstance(next(iter(raw.values())), Mapping):
            inner = next(iter(raw.values()))
        if inner is None:
            break
        raw = inner
    sd = {k: v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise CorruptCheckpointError(f"{source} contains no tensors; it is not a model checkpoint.")
    check_views(sd, source)
    stripped = True
    while stripped and sd:
        stripped = False
        for prefix in PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                stripped = True
    return sd


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
    if not isinstance(spec, FlexSRArchitecture):  # FlexSR's families check in their own (guarded) load
        check_state_dict(state_dict, name)
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
    except FlexSRError as e:
        if str(e).startswith(name):
            raise
        raise type(e)(f"{name}: {e}") from e
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

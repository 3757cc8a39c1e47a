"""Structural reparameterization: modules with a training form and an equivalent fused inference form."""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import nn

T = TypeVar("T")


class ReparamModule(nn.Module):
    """A module that can be fused into a cheaper, numerically equivalent form for inference.

    Subclasses implement ``_refresh_fused()`` (recompute the fused weights from the training
    weights, called under ``no_grad``) and use ``self.fused`` in ``forward``. The fused weights are
    recomputed after every ``load_state_dict`` and whenever the module is switched to eval mode,
    so they can never go stale after loading or training.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fused = False
        self.register_load_state_dict_post_hook(_refresh_after_load)

    def _refresh_fused(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def refresh_fused(self) -> None:
        self._refresh_fused()

    def fuse(self) -> None:
        """Switch to the fused form (idempotent)."""
        self.refresh_fused()
        self.fused = True

    def train(self, mode: bool = True):
        was_training = self.training
        super().train(mode)
        if self.fused and was_training and not mode:
            self.refresh_fused()
        return self


def inference_path(module: nn.Module) -> bool:
    """True where a module may take its inference-only fast path: eval mode and no autograd.

    Under ``torch.no_grad()`` / ``torch.inference_mode()`` nothing needs the training form's graph, so
    weights may be folded (see :func:`derived`) and activations overwritten in place.
    """
    return not module.training and not torch.is_grad_enabled()


def derived(module: nn.Module, name: str, sources, compute):
    """``compute()`` (a tensor or tuple of tensors derived from ``sources``), cached on ``module``.

    The cache is keyed by every source tensor's storage, version counter, dtype and device, so it is
    recomputed after any in-place change (``load_state_dict``, an optimizer step, ``copy_``) and after
    ``.to()``: a folded weight can never go stale. Inference tensors (weights created under
    ``torch.inference_mode()``) carry no version counter and are folded on every call instead. Computed
    under ``no_grad``; the cache is a plain attribute (not a buffer), so state dicts are unchanged.
    Under ``torch.compile`` the fold is traced into the compiled graph (computed on every call, a
    negligible cost beside the model's): the cache's bookkeeping is not traceable.
    """
    if torch.compiler.is_compiling():
        with torch.no_grad():
            return compute()
    if any(t.is_inference() for t in sources):
        # weights made under torch.inference_mode() (ComfyUI loads models that way) have no version
        # counter, so a change to them could not be seen: fold them afresh on every call
        with torch.no_grad():
            return compute()
    key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in sources)
    cache = module.__dict__.setdefault("_derived_cache", {})
    hit = cache.get(name)
    if hit is not None and hit[0] == key:
        return hit[1]
    with torch.no_grad():
        value = compute()
    cache[name] = (key, value)
    return value


def _refresh_after_load(module: nn.Module, incompatible_keys) -> None:
    if getattr(module, "fused", False):
        module.refresh_fused()


def fusable_modules(model) -> list[ReparamModule]:
    """Every reparameterizable module inside ``model`` (an ``nn.Module`` or a spandrel descriptor)."""
    module = getattr(model, "model", model)
    return [m for m in module.modules() if isinstance(m, ReparamModule)]


def fuse(model: T) -> T:
    """Fuse every reparameterizable module of ``model`` in place and return ``model``.

    Works on any ``nn.Module`` or spandrel ``ModelDescriptor``; idempotent; a model with nothing to fuse
    is returned unchanged. The result equals the unfused model to float rounding (max abs diff <= 1e-5 fp32).
    """
    for m in fusable_modules(model):
        m.fuse()
    return model

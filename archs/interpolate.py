"""Network interpolation: the weights of two models of one architecture, blended.

``(1 - alpha) * A + alpha * B`` for every floating-point tensor (ESRGAN's "network interpolation",
chaiNNer's "Interpolate Models"); integer buffers (batch norm's ``num_batches_tracked``) come from ``A``.
A fine-tune and the checkpoint it started from blend well: ``alpha`` trades what the fine-tune gained
on its own material against what the original was better at.
"""

from __future__ import annotations

import copy
import math
from typing import Mapping

import torch
from torch import nn

from .errors import FlexSRError
from .reparam import fusable_modules


class InterpolationError(FlexSRError, ValueError):
    """The two models cannot be blended (other architecture, scale, tensors or shapes), or alpha is out of range."""


def check_alpha(alpha: float, names: tuple[str, str] = ("A", "B")) -> float:
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or not 0.0 <= alpha <= 1.0:
        raise InterpolationError(f"alpha must be in 0..1 (0 = {names[0]}, 1 = {names[1]}), got {alpha}")
    return float(alpha)


def interpolate_state_dicts(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], alpha: float,
                            names: tuple[str, str] = ("A", "B")) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * a + alpha * b`` for floating-point tensors (computed in float64, stored in ``a``'s
    dtype); other tensors are copied from ``a``."""
    return _along(a, b, check_alpha(alpha, names), names)


def unblend_state_dicts(a: Mapping[str, torch.Tensor], blend: Mapping[str, torch.Tensor], alpha: float,
                        names: tuple[str, str] = ("A", "the blend")) -> dict[str, torch.Tensor]:
    """The ``b`` that ``blend = (1 - alpha) * a + alpha * b`` was made from: ``(blend - (1 - alpha) * a) / alpha``
    (the same line, followed past ``blend``; float64, stored in ``a``'s dtype, so exact to that dtype's
    rounding times ``1 / alpha``); other tensors are copied from ``blend``."""
    alpha = check_alpha(alpha, names)
    if alpha == 0.0:
        raise InterpolationError(f"{names[1]} at alpha 0 is {names[0]} itself: it keeps nothing to recover")
    return _along(a, blend, 1.0 / alpha, names, other_from=1)


def _along(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], weight: float,
           names: tuple[str, str], other_from: int = 0) -> dict[str, torch.Tensor]:
    """``a + weight * (b - a)`` for floating-point tensors; other tensors from ``a`` (or ``b``: ``other_from=1``)."""
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a or only_b:
        raise InterpolationError(f"{names[0]} and {names[1]} hold other tensors: only in {names[0]}: "
                                 f"{only_a[:5]}{' ...' if len(only_a) > 5 else ''}; only in {names[1]}: "
                                 f"{only_b[:5]}{' ...' if len(only_b) > 5 else ''}")
    out = {}
    for key, ta in a.items():
        tb = b[key]
        if ta.shape != tb.shape:
            raise InterpolationError(f"tensor {key!r} has shape {tuple(ta.shape)} in {names[0]} but "
                                     f"{tuple(tb.shape)} in {names[1]}")
        if ta.is_floating_point() and tb.is_floating_point():
            out[key] = torch.lerp(ta.detach().double(), tb.detach().to(ta.device).double(), weight).to(ta.dtype)
        else:
            out[key] = (tb if other_from else ta).detach().clone()
    return out


def check_same_architecture(a: nn.Module, b: nn.Module, names: tuple[str, str] = ("A", "B")) -> None:
    """:class:`InterpolationError` unless ``a`` and ``b`` are modules of one class."""
    if type(a) is not type(b):
        raise InterpolationError(f"{names[0]} is a {type(a).__name__}, {names[1]} a {type(b).__name__}: "
                                 "only models of one architecture can be blended")


def _blend(a: nn.Module, b: nn.Module, alpha: float, names: tuple[str, str], combine=None) -> nn.Module:
    blended = (combine or interpolate_state_dicts)(a.state_dict(), b.state_dict(), alpha, names)
    result = copy.deepcopy(a)
    result.load_state_dict(blended, strict=True)
    for m in fusable_modules(result):
        m.refresh_fused()
    return result


def interpolate_models(a: nn.Module, b: nn.Module, alpha: float, names: tuple[str, str] = ("A", "B")) -> nn.Module:
    """A new module: a deep copy of ``a`` holding the blend of ``a``'s and ``b``'s weights (the inputs are left
    as they are; stored fused kernels follow the blended branches)."""
    check_same_architecture(a, b, names)
    return _blend(a, b, alpha, names)


def interpolate_descriptors(a, b, alpha: float, names: tuple[str, str] = ("A", "B"), unblend: bool = False) -> nn.Module:
    """:func:`interpolate_models` for two loaded models (spandrel ``ImageModelDescriptor``s, as
    :func:`archs.load_model` returns them): they must also agree in scale and channels. Returns the blended
    module (``a.model``'s class); :class:`InterpolationError` names what differs. With ``unblend``, ``b`` is a
    blend of ``a`` at ``alpha`` and the result is the model it was blended with (:func:`unblend_state_dicts`)."""
    check_same_architecture(a.model, b.model, names)
    if a.scale != b.scale:
        raise InterpolationError(f"{names[0]} upscales x{a.scale}, {names[1]} x{b.scale}: blend models of one scale")
    if (a.input_channels, a.output_channels) != (b.input_channels, b.output_channels):
        raise InterpolationError(f"{names[0]} maps {a.input_channels} to {a.output_channels} channels, {names[1]} "
                                 f"{b.input_channels} to {b.output_channels}")
    return _blend(a.model, b.model, alpha, names, unblend_state_dicts if unblend else None)

"""Channel and alpha adaptation between an image and a model.

An image has 1 (grey), 3 (RGB) or 4 (RGBA) channels; a model takes ``in_nc`` and returns ``out_nc``.
:func:`plan_channels` turns that pair into *jobs*: each job feeds some image channels through the model
(``pre`` makes the model's input from them, ``post`` turns the model's output into output channels) or
through plain resampling. The output keeps the image's channel layout when the model maps like to like.

Rules:
- grey image, RGB model: grey is repeated to RGB, the result is turned back to grey (Rec. 601 luma).
- RGB/RGBA image, grey model: every colour channel runs through the model on its own (colour is kept).
- RGB image, RGBA model: an opaque alpha is added and the model's alpha dropped.
- RGBA image, RGB model: RGB through the model; alpha by ``alpha_mode``: "model" (alpha repeated to
  the model's channels, result averaged), "bicubic" (antialiased bicubic resampling) or "discard".
  A constant alpha is simply filled in.
- A model whose input and output channel counts differ gets the image converted to ``in_nc`` and
  returns its own ``out_nc`` channels (plus alpha for RGBA images when ``out_nc`` is 3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from ..archs.errors import BadImageError

LUMA = (0.299, 0.587, 0.114)
ALPHA_MODES = ("model", "bicubic", "discard")

Transform = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Job:
    """Image channels ``src`` -> output channels ``dst`` by ``kind``: 'model', 'resample' or 'fill'."""

    kind: str
    src: tuple[int, ...]
    dst: tuple[int, ...]
    pre: Optional[Transform] = None
    post: Optional[Transform] = None
    fill: float = 0.0


def to_luma(x: Tensor) -> Tensor:
    """[N, 3, H, W] -> [N, 1, H, W]."""
    w = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x[:, :3] * w).sum(1, keepdim=True)


def repeat_to(n: int) -> Transform:
    return lambda x: x.expand(x.shape[0], n, *x.shape[2:])


def add_opaque_alpha(x: Tensor) -> Tensor:
    return torch.cat([x, torch.ones_like(x[:, :1])], 1)


def channel_mean(x: Tensor) -> Tensor:
    return x.mean(1, keepdim=True)


def _compose(*fns: Optional[Transform]) -> Optional[Transform]:
    fns = tuple(f for f in fns if f is not None)
    if not fns:
        return None

    def run(x: Tensor) -> Tensor:
        for f in fns:
            x = f(x)
        return x

    return run


def _take(idx: tuple[int, ...]) -> Transform:
    return lambda x: x[:, list(idx)]


def _convert(src_c: int, dst_c: int) -> Optional[Transform]:
    """Convert 1/3/4-channel model input or output to another of 1/3/4 channels."""
    if src_c == dst_c:
        return None
    if dst_c == 1:
        return to_luma if src_c >= 3 else None
    if dst_c == 3:
        return repeat_to(3) if src_c == 1 else _take((0, 1, 2))
    if dst_c == 4:
        return _compose(repeat_to(3) if src_c == 1 else None, add_opaque_alpha)
    raise BadImageError(f"cannot convert {src_c} channels to {dst_c}")


def output_channels(image_c: int, in_nc: int, out_nc: int, alpha_mode: str) -> int:
    return len({d for job in plan_channels(image_c, in_nc, out_nc, alpha_mode) for d in job.dst})


def plan_channels(
    image_c: int, in_nc: int, out_nc: int, alpha_mode: str = "model", alpha_value: float | None = None
) -> list[Job]:
    """The jobs that upscale an ``image_c``-channel image with an ``in_nc`` -> ``out_nc`` model.

    ``alpha_value``: the image's alpha when it is constant (then it is filled in, not computed).
    """
    if alpha_mode not in ALPHA_MODES:
        raise ValueError(f"alpha_mode must be one of {ALPHA_MODES}, not {alpha_mode!r}")
    if image_c not in (1, 3, 4):
        raise BadImageError(
            f"The image has {image_c} channels; FlexSR upscales grey (1), RGB (3) and RGBA (4) images."
        )
    if in_nc not in (1, 3, 4) or out_nc not in (1, 3, 4):
        raise BadImageError(
            f"The model maps {in_nc} -> {out_nc} channels, which does not match a {image_c}-channel image: "
            f"FlexSR adapts grey, RGB and RGBA images to 1-, 3- and 4-channel models only. Use a model made "
            f"for this kind of image."
        )

    has_alpha = image_c == 4
    colour = (0,) if image_c == 1 else (0, 1, 2)
    jobs: list[Job] = []

    if in_nc == out_nc == 4:
        if image_c == 4:
            return [Job("model", (0, 1, 2, 3), (0, 1, 2, 3))]
        return [Job("model", colour, colour, pre=_convert(len(colour), 4), post=_convert(4, len(colour)))]

    if in_nc == out_nc == 1:
        jobs = [Job("model", (c,), (c,)) for c in colour]
    elif in_nc == out_nc:  # RGB model (4-channel models handled above)
        jobs = [Job("model", colour, colour, pre=_convert(len(colour), 3), post=_convert(3, len(colour)))]
    else:  # the model changes the channel count: feed it what it takes, return what it gives
        rgb_out = min(out_nc, 3)
        jobs = [Job("model", colour, tuple(range(rgb_out)), pre=_convert(len(colour), in_nc),
                    post=_convert(out_nc, rgb_out))]
        if not (has_alpha and rgb_out == 3):
            return jobs

    if has_alpha:
        a_dst = (max(d for j in jobs for d in j.dst) + 1,)
        if alpha_mode == "discard":
            return jobs
        if alpha_value is not None:
            jobs.append(Job("fill", (3,), a_dst, fill=alpha_value))
        elif alpha_mode == "bicubic":
            jobs.append(Job("resample", (3,), a_dst))
        else:
            post = channel_mean if out_nc > 1 else None
            jobs.append(Job("model", (3,), a_dst, pre=repeat_to(in_nc) if in_nc > 1 else None, post=post))
    return jobs

"""Degradations that turn HR patches into LR inputs on the fly: downscale, blur, noise, JPEG, and the
real-world pipeline that chains them in two rounds.

All functions take ``[B, C, H, W]`` float tensors in 0..1 and draw every random choice from the
``torch.Generator`` they are given, so a batch is a pure function of the generator's seed.

``Degradation`` is the classic order: optional Gaussian blur of the HR image -> downscale by ``scale``
with one mode for the whole batch -> optional Gaussian noise -> optional JPEG round trip (pillow) -> clip.

``RealWorldDegradation`` is what images met in the wild went through (Real-ESRGAN's second-order idea, with
the ranges of drawn art on the web): per image, round one = mild blur -> a downscale by one of the editors'
filters (MATLAB/PIL bicubic, Lanczos, box, bilinear with or without antialiasing), sometimes through an
intermediate size -> noise -> JPEG at 4:2:0 with a random 8x8 grid offset; round two (sometimes) = blur ->
a small rescale and back -> noise -> JPEG again; a share of images stays clean (bicubic only). The LR is
rounded to 8 bits, as a saved image is.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .imresize import imresize

#: Every downscaler by name. ``matlab``: MATLAB ``imresize`` bicubic (what SR papers' LR images are);
#: ``bicubic``: torch's antialiased bicubic; ``pil-bicubic`` / ``lanczos`` / ``box`` / ``pil-bilinear``:
#: pillow's resize filters (antialiased; what editors and thumbnailers use; on 8-bit images); ``area``:
#: mean of ``scale x scale`` blocks; ``bilinear``: plain bilinear sampling, no antialias filter (aliased).
DOWNSCALE_MODES = ("bilinear", "bicubic", "area", "matlab", "pil-bicubic", "lanczos", "box", "pil-bilinear")
#: ``--downscale``'s default (the embedded default run's draws depend on it).
DEFAULT_DOWNSCALE = ("bilinear", "bicubic", "area")
_PIL_FILTERS = {"pil-bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
                "box": Image.Resampling.BOX, "pil-bilinear": Image.Resampling.BILINEAR}


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """``[C, H, W]`` float 0..1 -> ``[H, W, C]`` uint8, rounded (what saving the image keeps)."""
    return (img.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()


def from_uint8(arr: np.ndarray) -> torch.Tensor:
    """``[H, W, C]`` uint8 -> ``[C, H, W]`` float 0..1."""
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32) / 255.0).permute(2, 0, 1)


def pil_resize(img: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize ``[B, C, H, W]`` to ``size`` = (h, w) with pillow's filter ``mode`` (see :data:`_PIL_FILTERS`),
    on the 8-bit image, per channel-interleaved RGB (or per grey channel)."""
    out = []
    for x in img:
        arr = to_uint8(x)
        pil = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
        res = np.asarray(pil.resize((size[1], size[0]), _PIL_FILTERS[mode]))
        out.append(from_uint8(res[..., None] if res.ndim == 2 else res))
    return torch.stack(out).to(img)


def resize_to(img: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize ``[B, C, H, W]`` to ``size`` = (h, w), down or up, with a :data:`DOWNSCALE_MODES` filter."""
    h, w = size
    if mode not in DOWNSCALE_MODES:
        raise ValueError(f"unknown downscale mode {mode!r}; choose from {DOWNSCALE_MODES}")
    if mode in _PIL_FILTERS:
        return pil_resize(img, size, mode)
    if mode == "matlab":
        return imresize(img.double(), size=(h, w)).to(img.dtype).clamp(0, 1)
    if mode == "area":
        if h <= img.shape[-2] and w <= img.shape[-1]:
            return F.interpolate(img, size=(h, w), mode="area")
        mode = "bilinear"
    aa = mode == "bicubic" and (h < img.shape[-2] or w < img.shape[-1])
    return F.interpolate(img, size=(h, w), mode=mode, align_corners=False, antialias=aa).clamp(0, 1)


def downscale(hr: torch.Tensor, scale: int, mode: str = "bicubic") -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, C, H // scale, W // scale]`` by one of :data:`DOWNSCALE_MODES`.

    ``bicubic`` is antialiased (like MATLAB's imresize / PIL's BICUBIC), ``area`` averages
    ``scale x scale`` blocks, ``bilinear`` is plain bilinear sampling (no antialias filter); the pillow
    modes work on the 8-bit image and return it rounded to 8 bits.
    """
    if mode not in DOWNSCALE_MODES:
        raise ValueError(f"unknown downscale mode {mode!r}; choose from {DOWNSCALE_MODES}")
    h, w = hr.shape[-2] // scale, hr.shape[-1] // scale
    if h < 1 or w < 1:
        raise ValueError(f"image of {tuple(hr.shape[-2:])} is smaller than the scale {scale}")
    hr = hr[..., : h * scale, : w * scale]
    if mode == "matlab":
        return imresize(hr.double(), 1.0 / scale).to(hr.dtype).clamp(0, 1)
    return resize_to(hr, (h, w), mode)


def gaussian_kernel(sigma: float, radius: int | None = None) -> torch.Tensor:
    """Normalised 1-D Gaussian kernel of ``2 * radius + 1`` taps (radius defaults to ceil(3 sigma))."""
    radius = max(1, math.ceil(3 * sigma)) if radius is None else radius
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[B, C, H, W]`` with reflect padding (identity for sigma <= 0)."""
    if sigma <= 0:
        return img
    k = gaussian_kernel(sigma).to(img)
    r = k.numel() // 2
    c = img.shape[1]
    mode = "reflect" if min(img.shape[-2:]) > r else "replicate"
    x = F.pad(img, (r, r, r, r), mode=mode)
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def add_noise(img: torch.Tensor, sigma: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Add Gaussian noise of per-image std ``sigma`` ([B], in 0..1 units), then clip to 0..1."""
    noise = torch.randn(img.shape, generator=generator, dtype=torch.float32)
    return (img + noise.to(img) * sigma.view(-1, 1, 1, 1).to(img)).clamp(0, 1)


def jpeg(img: torch.Tensor, quality: list[int], offsets: list[tuple[int, int]] | None = None) -> torch.Tensor:
    """JPEG round trip through pillow at per-image ``quality``, 4:2:0 chroma (what most encoders and the web
    use). ``offsets``: per image (dy, dx) in 0..15, where the encoder's 8x8 / 16x16 grid starts inside the
    image (the image is edge-padded at the top and left before encoding and cropped back after), so a
    model does not learn one grid position; default (0, 0)."""
    out = []
    for i, (x, q) in enumerate(zip(img, quality)):
        dy, dx = offsets[i] if offsets else (0, 0)
        if dy or dx:
            x = F.pad(x[None], (dx, 0, dy, 0), mode="replicate")[0]
        arr = to_uint8(x)
        grey = arr.shape[-1] == 1
        buf = io.BytesIO()
        Image.fromarray(arr[..., 0] if grey else arr).save(buf, format="JPEG", quality=int(q), subsampling=2)
        buf.seek(0)
        with Image.open(buf) as im:
            dec = np.asarray(im.convert("L" if grey else "RGB"))
        dec = dec[..., None] if grey else dec
        out.append(from_uint8(dec[dy:, dx:]))
    return torch.stack(out).to(img)


@dataclass
class Degradation:
    """Settings of the LR pipeline; ``apply`` draws every random choice from a generator.

    ``modes``: downscale modes, one drawn per batch. ``blur``: maximum Gaussian sigma (HR pixels)
    drawn uniformly in [0.2, blur] with probability ``blur_prob`` per image (0 disables). ``noise``:
    maximum noise std in 8-bit levels, drawn in [0, noise] with probability ``noise_prob``.
    ``jpeg``: lowest JPEG quality, drawn in [jpeg, 95] with probability ``jpeg_prob`` (0 disables).
    """

    scale: int = 2
    modes: tuple[str, ...] = DEFAULT_DOWNSCALE
    blur: float = 0.0
    blur_prob: float = 0.5
    noise: float = 0.0
    noise_prob: float = 0.5
    jpeg: int = 0
    jpeg_prob: float = 0.5

    def __post_init__(self) -> None:
        bad = [m for m in self.modes if m not in DOWNSCALE_MODES]
        if bad or not self.modes:
            raise ValueError(f"downscale modes must be a non-empty subset of {DOWNSCALE_MODES}, got {self.modes}")
        if self.jpeg and not 1 <= self.jpeg <= 95:
            raise ValueError(f"--jpeg is the lowest JPEG quality, 1..95 (0 = off); got {self.jpeg}")

    def apply(self, hr: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """HR ``[B, C, H, W]`` -> (LR ``[B, C, H/s, W/s]``, a dict describing what was drawn)."""
        b = hr.shape[0]
        u = lambda n=b: torch.rand(n, generator=generator, dtype=torch.float64).tolist()  # noqa: E731
        info: dict = {}
        x = hr
        if self.blur > 0:
            on, amount = u(), u()
            sigmas = [0.2 + a * (self.blur - 0.2) if o < self.blur_prob else 0.0 for o, a in zip(on, amount)]
            x = torch.cat([gaussian_blur(x[i : i + 1], s) for i, s in enumerate(sigmas)])
            info["blur"] = sigmas
        mode = self.modes[int(torch.randint(len(self.modes), (1,), generator=generator))]
        info["mode"] = mode
        x = downscale(x, self.scale, mode)
        if self.noise > 0:
            on, amount = u(), u()
            sig = [a * self.noise / 255.0 if o < self.noise_prob else 0.0 for o, a in zip(on, amount)]
            x = add_noise(x, torch.tensor(sig), generator)
            info["noise"] = sig
        if self.jpeg > 0:
            on, amount = u(), u()
            qs = [int(round(self.jpeg + a * (95 - self.jpeg))) if o < self.jpeg_prob else 0 for o, a in zip(on, amount)]
            idx = [i for i, q in enumerate(qs) if q > 0]
            if idx:
                x = x.clone()
                x[idx] = jpeg(x[idx], [qs[i] for i in idx])
            info["jpeg"] = qs
        return x.clamp(0, 1), info


#: The real-world pipeline's downscale filters and how often each is drawn.
REAL_MODES = {"matlab": 0.25, "pil-bicubic": 0.2, "lanczos": 0.2, "box": 0.15, "bilinear": 0.1, "pil-bilinear": 0.1}


@dataclass
class RealWorldDegradation:
    """The LR a user really has: two rounds of resizing, blur, noise and JPEG, drawn per image.

    Stages (each drawn with its probability, per image; ranges are uniform):

    - ``clean``: with ``clean_prob`` the image gets only a MATLAB-bicubic downscale (the papers' LR);
    - round one: ``blur`` (Gaussian sigma in ``blur`` HR pixels) -> ``downscale`` to the LR size by a
      filter of :data:`REAL_MODES`, with ``intermediate_prob`` through an intermediate size (``1/u`` of the
      LR size, ``u`` in ``intermediate``: a picture resized twice, or shrunk below the LR size and blown up
      again) -> ``noise`` (Gaussian std in 8-bit levels, grey with ``grey_noise_prob``) -> ``jpeg`` (quality
      in ``jpeg``, 4:2:0, random grid offset);
    - round two, with ``second_prob``: ``blur2`` (sigma in LR pixels) -> ``rescale2`` (resize by a factor in
      ``rescale2`` and back, random filters) -> ``noise2`` -> ``jpeg2``;
    - the result is rounded to 8 bits.

    ``apply`` returns the LR batch and, per image, the list of stages it went through (names and values).
    """

    scale: int = 2
    clean_prob: float = 0.15
    modes: tuple[tuple[str, float], ...] = tuple(REAL_MODES.items())
    blur_prob: float = 0.2
    blur: tuple[float, float] = (0.2, 1.2)
    intermediate_prob: float = 0.2
    intermediate: tuple[float, float] = (0.75, 1.5)
    noise_prob: float = 0.15
    noise: tuple[float, float] = (1.0, 6.0)
    grey_noise_prob: float = 0.4
    jpeg_prob: float = 0.8
    jpeg: tuple[int, int] = (30, 95)
    second_prob: float = 0.3
    blur2_prob: float = 0.2
    blur2: tuple[float, float] = (0.2, 0.6)
    rescale2_prob: float = 0.3
    rescale2: tuple[float, float] = (0.8, 1.2)
    noise2_prob: float = 0.1
    noise2: tuple[float, float] = (1.0, 4.0)
    jpeg2_prob: float = 0.8
    jpeg2: tuple[int, int] = (50, 95)

    def __post_init__(self) -> None:
        bad = [m for m, _ in self.modes if m not in DOWNSCALE_MODES]
        if bad or not self.modes:
            raise ValueError(f"real-world downscale filters must be among {DOWNSCALE_MODES}, got {bad or 'none'}")
        for name in ("jpeg", "jpeg2"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi <= 100:
                raise ValueError(f"{name} qualities must satisfy 1 <= low <= high <= 100, got {(lo, hi)}")
        if self.scale < 1:
            raise ValueError(f"scale must be at least 1, got {self.scale}")

    def apply(self, hr: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """HR ``[B, C, H, W]`` -> (LR ``[B, C, H/s, W/s]`` rounded to 8 bits, {"stages": [per-image list]})."""
        s = self.scale
        h, w = hr.shape[-2] // s, hr.shape[-1] // s
        if h < 1 or w < 1:
            raise ValueError(f"image of {tuple(hr.shape[-2:])} is smaller than the scale {s}")
        hr = hr[..., : h * s, : w * s]
        out, stages = [], []
        for x in hr:
            lr, done = self._one(x[None], (h, w), generator)
            out.append(lr)
            stages.append(done)
        lr = torch.cat(out)
        return (lr.clamp(0, 1) * 255).round() / 255, {"stages": stages}

    # -- one image ----------------------------------------------------------------------------------
    def _one(self, x: torch.Tensor, size: tuple[int, int], g: torch.Generator) -> tuple[torch.Tensor, list]:
        u = lambda: float(torch.rand((), generator=g, dtype=torch.float64))  # noqa: E731
        span = lambda r: r[0] + u() * (r[1] - r[0])  # noqa: E731
        done: list = []
        if u() < self.clean_prob:
            done.append(("downscale", "matlab"))
            return resize_to(x, size, "matlab"), done
        if u() < self.blur_prob:
            sigma = span(self.blur)
            x = gaussian_blur(x, sigma)
            done.append(("blur", round(sigma, 3)))
        if u() < self.intermediate_prob:
            k = span(self.intermediate)
            mid = (max(1, round(size[0] * k)), max(1, round(size[1] * k)))
            mode = self._mode(u())
            x = resize_to(x, mid, mode)
            done.append(("intermediate", round(k, 3), mode))
        mode = self._mode(u())
        x = resize_to(x, size, mode)
        done.append(("downscale", mode))
        x, done = self._noise_jpeg(x, g, u, span, done, "")
        if u() < self.second_prob:
            if u() < self.blur2_prob:
                sigma = span(self.blur2)
                x = gaussian_blur(x, sigma)
                done.append(("blur2", round(sigma, 3)))
            if u() < self.rescale2_prob:
                k = span(self.rescale2)
                mid = (max(1, round(size[0] * k)), max(1, round(size[1] * k)))
                m1, m2 = self._mode(u()), self._mode(u())
                x = resize_to(resize_to(x, mid, m1), size, m2)
                done.append(("rescale2", round(k, 3), m1, m2))
            x, done = self._noise_jpeg(x, g, u, span, done, "2")
        return x, done

    def _noise_jpeg(self, x, g, u, span, done, suffix: str):
        if u() < getattr(self, f"noise{suffix}_prob"):
            std = span(getattr(self, f"noise{suffix}")) / 255.0
            grey = u() < self.grey_noise_prob
            n = torch.randn((1, 1 if grey else x.shape[1], *x.shape[-2:]), generator=g, dtype=torch.float32)
            x = (x + n.to(x) * std).clamp(0, 1)
            done.append((f"noise{suffix}", round(std * 255, 2), "grey" if grey else "colour"))
        if u() < getattr(self, f"jpeg{suffix}_prob"):
            lo, hi = getattr(self, f"jpeg{suffix}")
            q = int(round(span((lo, hi))))
            off = (int(u() * 8), int(u() * 8))
            x = jpeg(x, [q], [off])
            done.append((f"jpeg{suffix}", q, off))
        return x, done

    def _mode(self, r: float) -> str:
        total = sum(p for _, p in self.modes)
        acc = 0.0
        for m, p in self.modes:
            acc += p / total
            if r < acc:
                return m
        return self.modes[-1][0]


def parse_lr_spec(spec: str) -> tuple[str, int]:
    """``"<mode>[+jpeg<Q>]"`` -> (downscale mode, JPEG quality or 0), e.g. ``"matlab+jpeg75"``."""
    mode, _, rest = spec.partition("+")
    q = 0
    if rest:
        if not rest.startswith("jpeg") or not rest[4:].isdigit() or not 1 <= int(rest[4:]) <= 100:
            raise ValueError(f"LR spec {spec!r}: after '+' give jpeg<quality 1..100>, e.g. matlab+jpeg75")
        q = int(rest[4:])
    if mode not in DOWNSCALE_MODES:
        raise ValueError(f"LR spec {spec!r}: unknown downscale {mode!r}; choose from {', '.join(DOWNSCALE_MODES)}")
    return mode, q


def make_lr(hr: torch.Tensor, scale: int, spec: str) -> torch.Tensor:
    """The 8-bit LR a user would have: ``[B, C, H, W]`` HR (sides multiples of ``scale``) downscaled by the
    spec's mode, rounded to 8 bits, then JPEG-compressed at the spec's quality (4:2:0) when it names one.
    ``"matlab"`` is the papers' clean LR; ``"matlab+jpeg75"`` that image saved as a JPEG of quality 75."""
    mode, q = parse_lr_spec(spec)
    lr = (downscale(hr, scale, mode).clamp(0, 1) * 255).round() / 255
    return jpeg(lr, [q] * lr.shape[0]) if q else lr

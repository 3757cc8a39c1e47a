"""Training data: image folders (or in-memory images), random patches, and LR made on the fly.

Sampling is a pure function of ``(seed, step, rank)``: the batch a process trains on at a step does
not depend on anything that happened before, so a resumed run (or a DataLoader worker) draws exactly
the batches an uninterrupted run draws, and DDP ranks draw disjoint random streams.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from archs.errors import BadImageError

from .degradations import Degradation, downscale, make_lr

log = logging.getLogger("flexsr")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
SMALL_IMAGE_POLICIES = ("pad", "skip")
#: SSIM's 11x11 window must fit after the ``scale``-pixel border is cropped on each side.
MIN_VAL_SIDE = 11
#: Training images above this many pixels are skipped (checked from the header before decoding): a 400 KB
#: PNG can declare 12000x12000 (144 MP, 430 MB decoded, more in conversions). 40 MP is 8K x 5K.
MAX_IMAGE_PIXELS = 40_000_000


class DatasetError(BadImageError):
    """A data folder is missing or holds no usable image."""


# --------------------------------------------------------------------------------------------------
# Reading images


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB by the image's mode: 16-bit modes scaled by 65535 (never by their values: a dark 16-bit image
    must stay dark), alpha composited over white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(arr / 65535.0 * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    return im.convert("RGB")


class ImageTooLargeError(BadImageError):
    """An image declares more pixels than :data:`MAX_IMAGE_PIXELS` (checked before decoding)."""


def read_rgb(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode an image file to ``[H, W, 3]`` uint8 RGB (see :func:`to_rgb`); an image declaring more than
    ``max_pixels`` raises :class:`ImageTooLargeError` before anything is decoded."""
    with Image.open(path) as im:
        w, h = im.size
        if max_pixels and w * h > max_pixels:
            raise ImageTooLargeError(f"'{Path(path).name}' is {w}x{h} ({w * h / 1e6:.0f} MP), more than the "
                                     f"{max_pixels / 1e6:.0f} MP an image may have here; downscale it first.")
        im.load()
        return np.array(to_rgb(im), dtype=np.uint8)  # a writable copy (torch.from_numpy warns on read-only)


def _probe(path: Path) -> tuple[int, int]:
    """(H, W) from the header, after a structural check; raises on unreadable files."""
    with Image.open(path) as im:
        w, h = im.size
        if w * h > MAX_IMAGE_PIXELS:  # before verify(), which would decompress it
            raise ImageTooLargeError(f"{w}x{h} = {w * h / 1e6:.0f} MP, more than {MAX_IMAGE_PIXELS / 1e6:.0f} MP; "
                                     f"downscale it first")
        im.verify()
    if w < 1 or h < 1:
        raise ValueError("empty image")
    return h, w


def find_images(folder: str | Path) -> list[Path]:
    """Image files (png, jpg, jpeg, webp; any case) under ``folder``, recursively, sorted."""
    root = Path(folder)
    if not root.is_dir():
        raise DatasetError(f"Data folder '{root}' does not exist or is not a folder.")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _pad_to(arr: np.ndarray, h: int, w: int) -> np.ndarray:
    """Mirror-pad ``[H, W, 3]`` up to at least ``h x w`` (repeats the mirroring for tiny images)."""
    while arr.shape[0] < h or arr.shape[1] < w:
        ph = min(max(0, h - arr.shape[0]), arr.shape[0])
        pw = min(max(0, w - arr.shape[1]), arr.shape[1])
        arr = np.pad(arr, ((0, ph), (0, pw), (0, 0)), mode="symmetric")
    return arr


@dataclass
class ImageSet:
    """The usable training images: file paths (decoded lazily, cached) or in-memory arrays.

    ``min_size``: images smaller than this on a side are mirror-padded to it when used.
    Counters ``unreadable``, ``padded`` and ``skipped_small`` say what the scan found.
    """

    paths: list[Path] = field(default_factory=list)
    arrays: list[np.ndarray] = field(default_factory=list)
    min_size: int = 0
    unreadable: int = 0
    too_large: int = 0
    padded: int = 0
    skipped_small: int = 0
    cache_bytes: int = 1 << 30
    _cache: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _bad: set = field(default_factory=set, repr=False)

    def __len__(self) -> int:
        return len(self.paths) + len(self.arrays)

    def _decode(self, i: int) -> np.ndarray:
        if i >= len(self.paths):
            return self.arrays[i - len(self.paths)]
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        arr = read_rgb(self.paths[i])
        self._cache[i] = arr
        size = sum(a.nbytes for a in self._cache.values())
        while size > self.cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            size -= old.nbytes
        return arr

    def get(self, i: int) -> np.ndarray:
        """Image ``i`` as ``[H, W, 3]`` uint8, padded to ``min_size``; an image that fails to decode
        now (damaged after the scan) is replaced by the next usable one, with one warning."""
        n = len(self)
        for k in range(n):
            j = (i + k) % n
            if j in self._bad:
                continue
            try:
                arr = self._decode(j)
            except Exception as e:  # noqa: BLE001 - any decoder failure means "unusable"
                self._bad.add(j)
                log.warning("Skipping unreadable image '%s' (%s: %s)", self.paths[j], type(e).__name__, e)
                continue
            return _pad_to(arr, self.min_size, self.min_size)
        raise DatasetError("No training image could be decoded (all failed while training).")


def scan_folders(folders: Sequence[str | Path], min_size: int, small: str = "pad", cache_mb: int = 1024) -> ImageSet:
    """Collect the usable images under ``folders`` (recursive).

    Unreadable files are skipped with one warning each and counted. Images with a side smaller
    than ``min_size`` are padded (``small="pad"``) or skipped (``"skip"``); the log says which and
    how many. Raises ``DatasetError`` when no usable image is left.
    """
    if small not in SMALL_IMAGE_POLICIES:
        raise ValueError(f"small-image policy must be one of {SMALL_IMAGE_POLICIES}, got {small!r}")
    found: list[Path] = []
    for folder in folders:
        found += find_images(folder)
    where = ", ".join(f"'{f}'" for f in folders)
    if not found:
        raise DatasetError(
            f"No image files ({', '.join(IMAGE_EXTENSIONS)}) found in {where}. Point --data at folders "
            f"holding training images (searched recursively)."
        )
    images = ImageSet(min_size=min_size, cache_bytes=cache_mb << 20)
    for p in found:
        try:
            h, w = _probe(p)
        except ImageTooLargeError as e:
            images.too_large += 1
            log.warning("Skipping image '%s': %s.", p, e)
            continue
        except Exception as e:  # noqa: BLE001
            images.unreadable += 1
            log.warning("Skipping unreadable image '%s' (%s: %s)", p, type(e).__name__, str(e)[:200])
            continue
        if min(h, w) < min_size:
            if small == "skip":
                images.skipped_small += 1
                continue
            images.padded += 1
        images.paths.append(p)
    if images.unreadable:
        log.warning("%d of %d image files in %s were unreadable and skipped.", images.unreadable, len(found), where)
    if images.skipped_small:
        log.info("Skipped %d images smaller than the %d px patch (--small-images skip).", images.skipped_small, min_size)
    if images.padded:
        log.info("%d images smaller than the %d px patch will be mirror-padded (--small-images pad).", images.padded, min_size)
    if not images.paths:
        reasons = []
        if images.unreadable:
            reasons.append(f"{images.unreadable} unreadable")
        if images.skipped_small:
            reasons.append(f"{images.skipped_small} smaller than the {min_size} px patch (use --small-images pad)")
        raise DatasetError(f"No usable training image in {where}: {len(found)} files, {', '.join(reasons)}.")
    log.info("Training images: %d usable in %s.", len(images.paths), where)
    return images


# --------------------------------------------------------------------------------------------------
# Sampling


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The 63-bit seed of the generator that draws batch ``step`` of process ``rank``."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step), int(rank)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def augment(patch: np.ndarray, code: int) -> np.ndarray:
    """One of the 8 dihedral transforms of ``[H, W, C]``: ``code & 3`` quarter turns, bit 2 = h-flip."""
    out = np.rot90(patch, k=code & 3, axes=(0, 1))
    if code & 4:
        out = out[:, ::-1]
    return out


@dataclass
class PatchSampler:
    """Batches of (LR, HR) patches: ``batch(step, rank)`` is a pure function of (seed, step, rank).

    ``patch_size`` is the HR patch side (a multiple of ``degradation.scale``); ``batch_size`` is per
    process. Augmentation: random crop, flips and 90° rotations.

    ``anchors`` > 0 appends that many more patches to every batch, drawn after the degraded ones (so the first
    ``batch_size`` are the same with or without them), each with the clean MATLAB-bicubic LR of the papers: the
    patches ``--distill`` scores against a frozen model's output instead of the HR.
    """

    images: ImageSet
    patch_size: int
    batch_size: int
    degradation: Degradation
    seed: int = 0
    augment: bool = True
    anchors: int = 0

    def __post_init__(self) -> None:
        s = self.degradation.scale
        if self.patch_size % s or self.patch_size < s:
            raise ValueError(f"--patch-size {self.patch_size} must be a positive multiple of the scale {s}")
        if self.anchors < 0:
            raise ValueError(f"anchors must be at least 0, got {self.anchors}")

    def batch(self, step: int, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(LR ``[B + A, 3, P/s, P/s]``, HR ``[B + A, 3, P, P]``) float32 in 0..1 for ``step`` of ``rank``
        (B = ``batch_size``, A = ``anchors``: the last A have clean MATLAB-bicubic LR)."""
        g = torch.Generator().manual_seed(step_seed(self.seed, step, rank))
        hr = self._patches(g, self.batch_size)
        lr, _ = self.degradation.apply(hr, g)
        if self.anchors:
            hr_a = self._patches(g, self.anchors)
            lr, hr = torch.cat([lr, make_lr(hr_a, self.degradation.scale, "matlab")]), torch.cat([hr, hr_a])
        return lr.contiguous(), hr

    def _patches(self, g: torch.Generator, count: int) -> torch.Tensor:
        """``count`` random HR crops ``[count, 3, P, P]`` (0..1), augmented, drawn from ``g``."""
        p, n = self.patch_size, len(self.images)
        patches = []
        for _ in range(count):
            img = self.images.get(int(torch.randint(n, (1,), generator=g)))
            h, w = img.shape[:2]
            top = int(torch.randint(h - p + 1, (1,), generator=g))
            left = int(torch.randint(w - p + 1, (1,), generator=g))
            crop = img[top : top + p, left : left + p]
            if self.augment:
                crop = augment(crop, int(torch.randint(8, (1,), generator=g)))
            patches.append(np.ascontiguousarray(crop))
        return torch.from_numpy(np.stack(patches)).permute(0, 3, 1, 2).float().div_(255.0).contiguous()


class StepBatches(torch.utils.data.Dataset):
    """Map-style dataset over steps ``start..end-1`` of one rank, for a DataLoader with workers."""

    def __init__(self, sampler: PatchSampler, start: int, end: int, rank: int = 0):
        self.sampler, self.start, self.end, self.rank = sampler, start, end, rank

    def __len__(self) -> int:
        return max(0, self.end - self.start)

    def __getitem__(self, i: int):
        return self.sampler.batch(self.start + i, self.rank)


# --------------------------------------------------------------------------------------------------
# Validation


def val_pairs_from_arrays(images: Sequence[tuple[str, np.ndarray]], scale: int, crop: int = 0,
                          lr_specs: Sequence[str] = ("bicubic",)):
    """``(name, lr, hr)`` tensors from ``[H, W, 3]`` uint8 arrays: HR cropped to a multiple of the
    scale (and to a centred ``crop`` square when ``crop > 0``), LR by antialiased bicubic.

    ``lr_specs`` other than the default make one pair per image and spec (``training.degradations.make_lr``:
    8-bit LR, e.g. ``"matlab+jpeg75"``), named ``<image>@<spec>``."""
    pairs = []
    for name, arr in images:
        hr = torch.from_numpy(np.array(arr, dtype=np.float32)).permute(2, 0, 1) / 255.0
        if crop > 0:
            h, w = hr.shape[-2:]
            ch, cw = min(crop, h), min(crop, w)
            top, left = (h - ch) // 2, (w - cw) // 2
            hr = hr[:, top : top + ch, left : left + cw]
        h, w = (hr.shape[-2] // scale) * scale, (hr.shape[-1] // scale) * scale
        if min(h, w) < MIN_VAL_SIDE + 2 * scale:
            log.warning("Validation image '%s' (%dx%d) is too small to score at x%d (needs %d px a side); skipped.",
                        name, hr.shape[-1], hr.shape[-2], scale, MIN_VAL_SIDE + 2 * scale)
            continue
        hr = hr[:, :h, :w].contiguous()
        if bool((hr == hr[:, :1, :1]).all()):  # every method is exact on one colour: PSNR would be infinite
            log.warning("Validation image '%s' is one colour%s; skipped.", name, " in its centre crop" if crop > 0 else "")
            continue
        if tuple(lr_specs) == ("bicubic",):
            pairs.append((name, downscale(hr.unsqueeze(0), scale, "bicubic")[0], hr))
            continue
        for spec in lr_specs:
            pairs.append((f"{name}@{spec}", make_lr(hr.unsqueeze(0), scale, spec)[0], hr))
    return pairs


def val_pairs_from_folder(folder: str | Path, scale: int, crop: int = 0, limit: int = 0,
                          lr_specs: Sequence[str] = ("bicubic",)):
    """Validation pairs from the HR images of ``folder`` (LR made by antialiased bicubic, or by each of
    ``lr_specs``)."""
    found = find_images(folder)
    if limit > 0:
        found = found[:limit]
    arrays, unreadable = [], 0
    for p in found:
        try:
            arrays.append((p.stem, read_rgb(p)))
        except Exception as e:  # noqa: BLE001
            unreadable += 1
            log.warning("Skipping unreadable validation image '%s' (%s: %s)", p, type(e).__name__, str(e)[:200])
    if not arrays:
        raise DatasetError(f"No usable validation image in '{folder}' ({len(found)} files, {unreadable} unreadable).")
    return val_pairs_from_arrays(arrays, scale, crop, lr_specs)

"""The upscale node's JPEG check (nodes/quality.py) and the self-ensemble (8 flips/turns averaged)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from spandrel.architectures.Compact import Compact

from packutil import pack  # noqa: F401  (session fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def drawn(size: int = 160, seed: int = 0) -> np.ndarray:
    """A drawn-looking RGB image: a soft gradient, shaded shapes, black outlines and some texture."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([200 * xx + 30, 150 * yy + 60, 120 + 80 * xx * yy], -1)
    img = Image.fromarray(np.clip(base + rng.normal(0, 3, base.shape), 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for k in range(6):
        x, y = rng.integers(0, size - 40, 2)
        d.ellipse((x, y, x + 30 + 3 * k, y + 25 + 2 * k), fill=tuple(int(v) for v in rng.integers(0, 255, 3)),
                  outline=(10, 10, 10), width=2)
    return np.asarray(img)


def as_image(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(arr, dtype=np.float32) / 255.0)


def jpeg(arr: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality, subsampling=2)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def test_jpeg_check_tells_jpegd_images_from_clean_ones_whatever_the_crop(pack):
    q = pack.nodes.quality
    for seed in range(3):
        clean = drawn(seed=seed)
        assert q.blockiness(as_image(clean)) < q.JPEG_THRESHOLD
        for quality in (60, 80, 95):
            j = jpeg(clean, quality)
            assert q.blockiness(as_image(j)) >= q.JPEG_THRESHOLD, (seed, quality)
            assert q.blockiness(as_image(j[3:, 5:])) >= q.JPEG_THRESHOLD  # a crop moves the grid
    # periodic drawing is not a JPEG grid: pixel art scaled 2x (nearest) and an 8 px checkerboard
    pixel_art = np.kron(drawn(80, seed=4), np.ones((2, 2, 1), dtype=np.uint8))
    assert q.blockiness(as_image(pixel_art)) < q.JPEG_THRESHOLD
    checker = ((np.indices((128, 128)).sum(0) // 8) % 2 * 255).astype(np.uint8)[..., None].repeat(3, -1)
    assert q.blockiness(as_image(checker)) < q.JPEG_THRESHOLD
    assert q.blockiness(torch.rand(16, 16, 3)) == 0.0  # too small to judge
    looks, score = q.looks_jpeg(torch.stack([as_image(drawn()), as_image(jpeg(drawn(), 70))]))
    assert looks and score >= q.JPEG_THRESHOLD


def test_jpeg_note_points_to_the_real_world_model(pack):
    q = pack.nodes.quality
    jpegd = as_image(jpeg(drawn(), 70))[None]
    assert "FlexSR_anime_real_x2 is made for such images" in q.jpeg_note(jpegd, 2, "FlexSR_anime_x2.safetensors")
    assert "this model is made for such images" in q.jpeg_note(jpegd, 4, "FlexSR_anime_real_x4.safetensors")
    assert q.jpeg_note(as_image(drawn())[None], 2).startswith("input looks clean")


def nearest_model(pack, scale: int = 2):
    """Compact with zero weights: its output is the nearest-neighbour upscale, which every flip and turn
    commutes with."""
    m = Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=1, upscale=scale)
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
    return pack.archs.load_model(m.state_dict())


def test_every_view_is_undone_exactly(pack):
    e = pack.nodes.engine
    x = torch.rand(2, 5, 7, 4)
    views = [e.dihedral(x, v) for v in range(e.ENSEMBLE_VIEWS)]
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8  # 8 different views
    for v in range(e.ENSEMBLE_VIEWS):
        assert torch.equal(e.undo_dihedral(e.dihedral(x, v), v), x)


def test_ensemble_of_an_equivariant_model_is_the_plain_result_and_keeps_alpha(pack):
    e = pack.nodes.engine
    model = nearest_model(pack)
    rgba = torch.rand(1, 12, 9, 4)
    plain, _ = e.upscale_image(model, rgba, device="cpu")
    ens, report = e.upscale_image(model, rgba, device="cpu", ensemble=True)
    assert torch.allclose(ens, plain, atol=1e-6) and ens.shape == (1, 24, 18, 4)  # the sum of 8 rounds
    assert "ensemble: 8 flips/turns averaged" in report.text()
    mask = torch.zeros(1, 12, 9)
    mask[:, 3:9, 2:7] = 1.0
    with_mask, _ = e.upscale_image(model, rgba[..., :3], mask=mask, device="cpu", ensemble=True, tile_size=8,
                                   overlap=8)  # tiled too
    plain_mask, _ = e.upscale_image(model, rgba[..., :3], mask=mask, device="cpu", tile_size=8, overlap=8)
    assert torch.allclose(with_mask[..., 3], plain_mask[..., 3], atol=1e-6)


def test_ensemble_averages_the_views_of_any_model_turned_back(pack):
    e = pack.nodes.engine
    torch.manual_seed(0)
    model = pack.archs.load_model(Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=2).state_dict())
    img = torch.rand(1, 10, 14, 3)
    ens, _ = e.upscale_image(model, img, device="cpu", ensemble=True)
    want = sum(e.undo_dihedral(e.upscale_image(model, e.dihedral(img, v), device="cpu")[0], v) for v in range(8)) / 8
    plain, _ = e.upscale_image(model, img, device="cpu")
    assert torch.allclose(ens, want, atol=1e-6) and not torch.allclose(ens, plain, atol=1e-4)
    seen = []
    e.upscale_image(model, img, device="cpu", ensemble=True, progress=lambda d, t: seen.append((d, t)))
    assert seen[-1][0] == seen[-1][1] and len({t for _, t in seen}) == 1  # one bar over the 8 views
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))

"""Degradations (shapes, modes, blur/noise/JPEG, determinism) and the data pipeline (folders, bad files,
small images, the (seed, step, rank) sampler)."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from training.data import (
    DatasetError,
    ImageSet,
    PatchSampler,
    StepBatches,
    augment,
    find_images,
    scan_folders,
    val_pairs_from_arrays,
)
from training.degradations import (
    DEFAULT_DOWNSCALE, DOWNSCALE_MODES, Degradation, RealWorldDegradation, add_noise, downscale, gaussian_blur, jpeg,
    make_lr, parse_lr_spec,
)
from training.metrics import quantize


def _rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------
# Degradations


@pytest.mark.parametrize("mode", DOWNSCALE_MODES)
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_downscale_shapes_and_range(mode, scale):
    hr = _rand(2, 3, 24, 36)
    lr = downscale(hr, scale, mode)
    assert lr.shape == (2, 3, 24 // scale, 36 // scale)
    assert lr.min() >= 0 and lr.max() <= 1
    flat = torch.full((1, 3, 12, 12), 0.25)
    eight_bit = mode in ("pil-bicubic", "lanczos", "box", "pil-bilinear")  # pillow works on the 8-bit image
    want = torch.full_like(downscale(flat, scale, mode), round(0.25 * 255) / 255 if eight_bit else 0.25)
    assert torch.allclose(downscale(flat, scale, mode), want, atol=1e-6)


def test_downscale_modes_are_what_they_say():
    hr = _rand(1, 3, 24, 24)
    assert torch.allclose(downscale(hr, 3, "area"), F.avg_pool2d(hr, 3), atol=1e-6)
    aa = F.interpolate(hr, size=(8, 8), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    assert torch.allclose(downscale(hr, 3, "bicubic"), aa)
    plain = F.interpolate(hr, size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.allclose(downscale(hr, 3, "bilinear"), plain)
    outs = {m: downscale(hr, 3, m) for m in DOWNSCALE_MODES}
    distinct = [m for m in DOWNSCALE_MODES if m not in ("box", "pil-bicubic")]
    assert all((outs[a] - outs[b]).abs().max() > 1e-2 for i, a in enumerate(distinct) for b in distinct[i + 1 :])
    # pillow's bicubic is torch's antialiased bicubic (Keys a = -0.5) on the 8-bit image
    assert (outs["pil-bicubic"] - quantize(outs["bicubic"]).float()).abs().max() <= 1 / 255 + 1e-6
    # box is the block mean on the 8-bit image; matlab is MATLAB's imresize
    assert (outs["box"] - F.avg_pool2d(quantize(hr).float(), 3)).abs().max() <= 1 / 255 + 1e-6  # fixed-point rounding
    from training.imresize import imresize
    assert torch.allclose(outs["matlab"], imresize(hr.double(), 1 / 3).float().clamp(0, 1), atol=1e-6)
    # antialiasing: a 1-px checkerboard becomes (nearly) flat grey with bicubic-AA, not with plain bilinear
    checker = ((torch.arange(24)[:, None] + torch.arange(24)[None, :]) % 2).float().expand(1, 3, 24, 24)
    assert downscale(checker, 3, "bicubic").std() < 0.05 < downscale(checker, 3, "bilinear").std()
    with pytest.raises(ValueError):
        downscale(hr, 2, "nearest")


def test_blur_noise_and_jpeg_change_the_image_and_keep_it_in_range():
    img = _rand(2, 3, 32, 32)
    blurred = gaussian_blur(img, 1.5)
    assert blurred.shape == img.shape and (blurred - img).abs().mean() > 0.05
    assert blurred.std() < img.std()  # low-pass
    assert torch.allclose(blurred.mean(), img.mean(), atol=0.01)
    assert torch.equal(gaussian_blur(img, 0.0), img)
    noisy = add_noise(img, torch.tensor([0.05, 0.0]), torch.Generator().manual_seed(0))
    assert (noisy[0] - img[0]).abs().mean() > 0.02 and torch.allclose(noisy[1], img[1])
    assert noisy.min() >= 0 and noisy.max() <= 1
    smooth = F.interpolate(_rand(2, 3, 8, 8), size=(32, 32), mode="bilinear")
    low, high = jpeg(smooth, [10, 10]), jpeg(smooth, [95, 95])
    err_low, err_high = (low - smooth).abs().mean(), (high - smooth).abs().mean()
    assert err_low > err_high > 0  # lower quality, larger error
    assert low.shape == smooth.shape and low.min() >= 0 and low.max() <= 1


def test_degradation_is_a_pure_function_of_the_generator_seed():
    deg = Degradation(scale=2, blur=2.0, blur_prob=0.5, noise=10, noise_prob=0.5, jpeg=30, jpeg_prob=0.5)
    hr = _rand(6, 3, 32, 32)
    a, info_a = deg.apply(hr, torch.Generator().manual_seed(7))
    b, info_b = deg.apply(hr, torch.Generator().manual_seed(7))
    c, _ = deg.apply(hr, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and info_a == info_b
    assert not torch.equal(a, c)
    assert a.shape == (6, 3, 16, 16)
    assert info_a["mode"] in DOWNSCALE_MODES and len(info_a["blur"]) == 6 and len(info_a["jpeg"]) == 6


def test_one_downscale_mode_per_batch_and_all_modes_get_drawn():
    deg = Degradation(scale=2)
    hr = _rand(3, 3, 16, 16)
    seen = set()
    for s in range(30):
        lr, info = deg.apply(hr, torch.Generator().manual_seed(s))
        assert torch.allclose(lr, downscale(hr, 2, info["mode"]))  # no blur/noise/JPEG: just the mode
        seen.add(info["mode"])
    assert seen == set(DEFAULT_DOWNSCALE)
    only_area = Degradation(scale=2, modes=("area",))
    assert only_area.apply(hr, torch.Generator().manual_seed(0))[1]["mode"] == "area"
    with pytest.raises(ValueError):
        Degradation(modes=("nearest",))


def _line_art(size: int = 64) -> torch.Tensor:
    """Anti-aliased black curves on white, [1, 3, size, size] (drawn at 4x, then LANCZOS)."""
    from PIL import Image, ImageDraw

    big = Image.new("RGB", (size * 4, size * 4), "white")
    d = ImageDraw.Draw(big)
    for k in range(5):
        d.ellipse((20 + 9 * k, 12 + 7 * k, 180 + 11 * k, 130 + 17 * k), outline=(20, 20, 20), width=6 + k)
    d.line((0, 250, 255, 10), fill=(200, 40, 40), width=9)
    small = np.asarray(big.resize((size, size), Image.Resampling.LANCZOS))
    return torch.from_numpy(small.copy()).permute(2, 0, 1)[None].float() / 255


def test_jpeg_really_compresses_at_420_and_shifts_its_grid():
    from PIL import Image

    img = _line_art(64)
    a = jpeg(img, [30])
    assert (a - img).abs().mean() > 0.01  # lossy
    # the round trip is what pillow's own 4:2:0 encoder at that quality gives
    buf = io.BytesIO()
    Image.fromarray((img[0] * 255).round().byte().permute(1, 2, 0).numpy()).save(buf, "JPEG", quality=30, subsampling=2)
    ref = torch.from_numpy(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")).copy()).permute(2, 0, 1)
    assert torch.equal((a[0] * 255).round().byte(), ref)
    # 8x8 block edges sit where the grid says: a shifted grid moves the blockiness
    shifted = jpeg(img, [30], [(3, 5)])
    assert shifted.shape == img.shape and not torch.equal(shifted, a)

    def edge_energy(x: torch.Tensor, dx: int) -> float:  # mean jump across columns dx, dx+8, dx+16, ...
        cols = torch.arange(dx + 7, x.shape[-1] - 1, 8)
        return float((x[..., cols + 1] - x[..., cols]).abs().mean())

    # the error's strongest block edges move with the grid offset (dx 5: columns 4, 12, ... instead of 7, 15, ...)
    assert max(range(8), key=lambda d: edge_energy(shifted - img, d)) != max(range(8), key=lambda d: edge_energy(a - img, d))


def test_each_lr_spec_is_8_bit_and_names_its_parts():
    hr = _line_art(48)
    assert parse_lr_spec("matlab") == ("matlab", 0) and parse_lr_spec("lanczos+jpeg75") == ("lanczos", 75)
    for bad in ("nearest", "matlab+jpeg", "matlab+jpeg0", "matlab+png75"):
        with pytest.raises(ValueError):
            parse_lr_spec(bad)
    clean = make_lr(hr, 2, "matlab")
    assert clean.shape == (1, 3, 24, 24) and torch.equal(clean, (clean * 255).round() / 255)
    j90, j75 = make_lr(hr, 2, "matlab+jpeg90"), make_lr(hr, 2, "matlab+jpeg75")
    assert 0 < (j90 - clean).abs().mean() < (j75 - clean).abs().mean()  # lower quality, more damage


def test_real_world_degradation_is_seeded_per_image_and_covers_its_stages():
    deg = RealWorldDegradation(scale=2)
    hr = _line_art(32).expand(8, 3, 32, 32).contiguous()
    a, info_a = deg.apply(hr, torch.Generator().manual_seed(3))
    b, info_b = deg.apply(hr, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and info_a == info_b  # a pure function of the seed
    assert a.shape == (8, 3, 16, 16) and torch.equal(a, (a * 255).round() / 255)  # 8-bit, like a saved image
    seen: dict[str, int] = {}
    modes: set[str] = set()
    for seed in range(60):
        _, info = deg.apply(hr[:4], torch.Generator().manual_seed(seed))
        for stages in info["stages"]:
            for st in stages:
                seen[st[0]] = seen.get(st[0], 0) + 1
                if st[0] == "downscale":
                    modes.add(st[1])
    for stage in ("downscale", "blur", "intermediate", "noise", "jpeg", "blur2", "rescale2", "noise2", "jpeg2"):
        assert seen.get(stage, 0) > 0, f"stage {stage} never drawn in 240 images"
    assert modes == {"matlab", "pil-bicubic", "lanczos", "box", "bilinear", "pil-bilinear"}
    assert 0.6 < seen["jpeg"] / 240 < 0.8  # 85% not clean x 80% JPEG
    # a clean draw is exactly the papers' LR
    clean = RealWorldDegradation(scale=2, clean_prob=1.0)
    lr, info = clean.apply(hr[:2], torch.Generator().manual_seed(0))
    assert info["stages"] == [[("downscale", "matlab")]] * 2
    assert torch.equal(lr, make_lr(hr[:2], 2, "matlab"))
    with pytest.raises(ValueError):
        RealWorldDegradation(jpeg=(0, 95))


def test_training_with_real_world_degradations_and_jpeg_validation(tmp_path):
    from training import finetune

    folder = tmp_path / "art"
    folder.mkdir()
    arr = (_line_art(48)[0].permute(1, 2, 0) * 255).round().byte().numpy()
    for i in range(3):
        Image.fromarray(np.roll(arr, 7 * i, axis=1)).save(folder / f"a{i}.png")
    out = tmp_path / "run"
    argv = ["--arch", "Compact", "--arch-args", '{"num_feat": 8, "num_conv": 1}', "--data", str(folder), "--val",
            str(folder), "--val-lr", "matlab", "matlab+jpeg75", "--degradation", "real", "--patch-size", "16",
            "--batch-size", "2", "--steps", "2", "--threads", "1", "--no-progress", "--no-tensorboard", "--out", str(out)]
    assert finetune.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_n"] == 6 and "val_psnr[matlab+jpeg75]" in summary
    assert summary["val_psnr[matlab]"] > summary["val_psnr[matlab+jpeg75]"]
    with pytest.raises(SystemExit):  # the real pipeline draws its own JPEG: --jpeg beside it is a usage error
        finetune.parse_args([*argv[:-2], "--jpeg", "50", "--out", str(tmp_path / "other")])




# --------------------------------------------------------------------------------------------------
# Folders


def _write(path, size=(40, 48), seed=0):
    arr = (np.random.default_rng(seed).random((size[0], size[1], 3)) * 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return arr


def _bad_files(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "garbage.png").write_bytes(b"this is not an image at all")
    good = folder / "tmp_full.jpg"
    _write(good)
    data = good.read_bytes()
    good.unlink()
    (folder / "truncated.jpg").write_bytes(data[:40])
    (folder / "empty.webp").write_bytes(b"")
    return 3


def test_find_images_is_recursive_and_takes_png_jpg_webp_in_any_case(tmp_path):
    _write(tmp_path / "a.png")
    _write(tmp_path / "sub" / "deeper" / "b.JPG")
    _write(tmp_path / "sub" / "c.webp")
    (tmp_path / "notes.txt").write_text("x")
    names = [p.name for p in find_images(tmp_path)]
    assert sorted(names) == ["a.png", "b.JPG", "c.webp"]


def test_empty_or_missing_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(DatasetError, match="No image files"):
        scan_folders([tmp_path / "empty"], 32)
    with pytest.raises(DatasetError, match="does not exist"):
        scan_folders([tmp_path / "nope"], 32)


def test_only_unreadable_files_is_a_clear_error(tmp_path, caplog):
    n_bad = _bad_files(tmp_path / "bad")
    with caplog.at_level(logging.WARNING, logger="flexsr"), pytest.raises(DatasetError, match=f"{n_bad} unreadable"):
        scan_folders([tmp_path / "bad"], 32)


def test_some_unreadable_files_are_skipped_with_one_warning_each_and_counted(tmp_path, caplog):
    n_bad = _bad_files(tmp_path / "mixed")
    for i in range(2):
        _write(tmp_path / "mixed" / f"ok{i}.png", seed=i)
    with caplog.at_level(logging.WARNING, logger="flexsr"):
        images = scan_folders([tmp_path / "mixed"], 32)
    assert len(images) == 2 and images.unreadable == n_bad
    per_file = [r for r in caplog.records if r.getMessage().startswith("Skipping unreadable image")]
    assert sorted(r.getMessage().split("'")[1].rsplit("/", 1)[-1] for r in per_file) == ["empty.webp", "garbage.png", "truncated.jpg"]
    assert any(f"{n_bad} of 5 image files" in r.getMessage() for r in caplog.records)


def test_small_images_are_padded_or_skipped_and_the_log_says_which(tmp_path, caplog):
    _write(tmp_path / "big.png", (64, 64))
    _write(tmp_path / "small.png", (20, 70), seed=1)
    with caplog.at_level(logging.INFO, logger="flexsr"):
        padded = scan_folders([tmp_path], 48, small="pad")
    assert len(padded) == 2 and padded.padded == 1
    assert any("mirror-padded" in r.getMessage() for r in caplog.records)
    assert padded.get(1).shape[:2] == (48, 70)  # 20 rows mirrored up to the patch
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="flexsr"):
        skipped = scan_folders([tmp_path], 48, small="skip")
    assert len(skipped) == 1 and skipped.skipped_small == 1
    assert any("Skipped 1 images smaller" in r.getMessage() for r in caplog.records)
    (tmp_path / "big.png").unlink()
    with pytest.raises(DatasetError, match="smaller than the 48 px patch"):
        scan_folders([tmp_path], 48, small="skip")


def test_an_image_damaged_after_the_scan_is_replaced_deterministically(tmp_path, caplog):
    _write(tmp_path / "a.png", seed=0)
    _write(tmp_path / "b.png", seed=1)
    images = scan_folders([tmp_path], 16)
    (tmp_path / "a.png").write_bytes(b"broken now")
    with caplog.at_level(logging.WARNING, logger="flexsr"):
        arr = images.get(0)
    assert np.array_equal(arr, np.asarray(Image.open(tmp_path / "b.png").convert("RGB")))
    assert sum("Skipping unreadable image" in r.getMessage() for r in caplog.records) == 1
    images.get(0)
    assert sum("Skipping unreadable image" in r.getMessage() for r in caplog.records) == 1  # warned once


# --------------------------------------------------------------------------------------------------
# Sampling


def _sampler(seed=0, **deg):
    rng = np.random.default_rng(0)
    arrays = [(rng.random((40 + 4 * i, 44, 3)) * 255).astype(np.uint8) for i in range(5)]
    images = ImageSet(arrays=arrays, min_size=16)
    return PatchSampler(images, 16, 4, Degradation(scale=2, **deg), seed=seed)


def test_batches_are_a_pure_function_of_seed_step_and_rank():
    s = _sampler(jpeg=40, noise=5)
    lr, hr = s.batch(3)
    assert lr.shape == (4, 3, 8, 8) and hr.shape == (4, 3, 16, 16)
    assert lr.dtype == hr.dtype == torch.float32 and 0 <= hr.min() and hr.max() <= 1
    lr2, hr2 = _sampler(jpeg=40, noise=5).batch(3)  # a fresh sampler (as after a resume)
    assert torch.equal(lr, lr2) and torch.equal(hr, hr2)
    assert not torch.equal(s.batch(4)[1], hr)
    assert not torch.equal(s.batch(3, rank=1)[1], hr)
    assert not torch.equal(_sampler(seed=1).batch(3)[1], hr)
    ds = StepBatches(s, start=2, end=6)
    assert len(ds) == 4 and torch.equal(ds[1][1], hr)


def test_anchor_patches_follow_the_batch_with_clean_matlab_lr():
    plain = _sampler(jpeg=40, noise=5)
    anchored = _sampler(jpeg=40, noise=5)
    anchored.anchors = 3
    lr0, hr0 = plain.batch(5)
    lr, hr = anchored.batch(5)
    assert lr.shape == (7, 3, 8, 8) and hr.shape == (7, 3, 16, 16)
    assert torch.equal(lr[:4], lr0) and torch.equal(hr[:4], hr0)  # the degraded batch is the one without anchors
    # the anchors: 8-bit MATLAB-bicubic LR of their HR, no noise, no JPEG
    want = (downscale(hr[4:], 2, "matlab").clamp(0, 1) * 255).round() / 255
    assert torch.equal(lr[4:], want)
    assert torch.equal(anchored.batch(5)[0], lr)  # still a pure function of the step
    with pytest.raises(ValueError, match="anchors"):
        PatchSampler(plain.images, 16, 4, plain.degradation, anchors=-1)


def _occurs_in(patch: np.ndarray, img: np.ndarray) -> bool:
    """Whether ``patch`` [p, p, 3] is a crop of ``img`` [H, W, 3] (exact match)."""
    p = patch.shape[0]
    ys, xs = np.nonzero((img[: img.shape[0] - p + 1, : img.shape[1] - p + 1] == patch[0, 0]).all(-1))
    return any(np.array_equal(img[y : y + p, x : x + p], patch) for y, x in zip(ys, xs))


def test_patches_are_crops_of_the_images_under_the_8_dihedral_transforms():
    s = _sampler()
    _, hr = s.batch(0)
    inverse = {c: next(d for d in range(8) if np.array_equal(augment(augment(np.arange(4).reshape(2, 2, 1), c), d),
                                                           np.arange(4).reshape(2, 2, 1))) for c in range(8)}
    for patch in hr:
        arr = (patch.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        hits = [c for c in range(8) for img in s.images.arrays if _occurs_in(augment(arr, inverse[c]), img)]
        assert hits, "a patch is not a (transformed) crop of any image"
    codes = {tuple(augment(np.arange(4).reshape(2, 2, 1), c).ravel()) for c in range(8)}
    assert len(codes) == 8  # the 8 transforms are distinct


def test_validation_pairs_are_mod_cropped_and_bicubic_downscaled():
    arr = (np.random.default_rng(0).random((33, 30, 3)) * 255).astype(np.uint8)
    [(name, lr, hr)] = val_pairs_from_arrays([("x", arr)], 4)
    assert name == "x" and hr.shape == (3, 32, 28) and lr.shape == (3, 8, 7)
    assert torch.allclose(lr, downscale(hr.unsqueeze(0), 4, "bicubic")[0])
    [(_, lr_c, hr_c)] = val_pairs_from_arrays([("x", arr)], 2, crop=16)
    assert hr_c.shape == (3, 16, 16) and lr_c.shape == (3, 8, 8)
    assert val_pairs_from_arrays([("tiny", arr[:12])], 2) == []  # SSIM's window would not fit


def test_an_image_declaring_144_megapixels_is_skipped_before_decoding(tmp_path, caplog):
    """A 400 KB PNG can declare 12000x12000: skipped from its header, one warning, no gigabytes decoded."""
    import struct
    import zlib

    from training.data import ImageTooLargeError, read_rgb

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    w = h = 12000
    z = zlib.compressobj(9)
    row = b"\x00" * (w + 1)  # filter byte + a black grey row
    idat = b"".join(z.compress(row) for _ in range(h)) + z.flush()
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
           + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "huge.png").write_bytes(png)
    _write(folder / "ok.png", size=(40, 48))
    assert (folder / "huge.png").stat().st_size < 1 << 20
    images = scan_folders([folder], 16)
    assert len(images) == 1 and images.too_large == 1
    assert "huge.png" in caplog.text and "144 MP" in caplog.text
    with pytest.raises(ImageTooLargeError, match="12000x12000"):
        read_rgb(folder / "huge.png")

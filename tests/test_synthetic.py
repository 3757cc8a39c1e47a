"""The procedural anime-style generator: deterministic by seed, splits disjoint, and the promised content."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.losses import sobel_magnitude
from training.synthetic import make_image, make_images, write_images


def test_same_seed_same_pixels_and_every_input_of_the_seed_matters():
    a = make_image(3, (48, 40), index=2)
    assert a.shape == (48, 40, 3) and a.dtype == np.uint8
    assert np.array_equal(a, make_image(3, (48, 40), index=2))
    for other in (make_image(4, (48, 40), index=2), make_image(3, (48, 40), index=3), make_image(3, (48, 40), index=2, split="val")):
        assert (a.astype(int) - other).__abs__().mean() > 5


def test_held_out_split_shares_no_image_with_train():
    train = make_images(6, (32, 32), seed=0, split="train")
    val = make_images(3, (32, 32), seed=0, split="val")
    assert all(not np.array_equal(t, v) for t in train for v in val)
    with pytest.raises(ValueError):
        make_image(0, (16, 16), split="validation")


def test_images_have_flat_regions_dark_lines_and_strong_edges():
    imgs = make_images(6, (96, 96), seed=0)
    stack = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255
    luma = stack.mean(1, keepdim=True)
    e = sobel_magnitude(luma)
    flat = (e < 0.02).float().mean().item()
    strong = (e > 1.0).float().mean().item()
    dark = (luma < 0.2).float().mean().item()
    assert flat > 0.3  # cel-shaded regions and gradients: much of the image is (nearly) flat
    assert strong > 0.02  # line art and shape borders: hard edges
    assert 0.01 < dark < 0.5  # dark line art and screentone, not a dark image
    # antialiased, not binary: intermediate values along the edges
    edge_vals = luma[e > 1.0]
    assert ((edge_vals > 0.25) & (edge_vals < 0.75)).float().mean() > 0.1
    assert len({tuple(np.unique(i.reshape(-1, 3), axis=0).shape) for i in imgs}) > 1


def test_write_images_makes_a_data_folder(tmp_path):
    paths = write_images(tmp_path / "syn", 2, (24, 20), seed=1)
    assert [p.name for p in paths] == ["train_00000.png", "train_00001.png"]
    from training.data import read_rgb

    assert np.array_equal(read_rgb(paths[1]), make_image(1, (24, 20), index=1))

"""The evaluation protocol: Y-PSNR and SSIM as SR papers compute them."""

import math

import pytest
import torch

from training.metrics import psnr_y, quantize, rgb_to_y, ssim_y


def test_identical_images_give_infinite_psnr_and_unit_ssim():
    img = torch.rand(3, 32, 32)
    assert psnr_y(img, img) == math.inf
    assert ssim_y(img, img) == pytest.approx(1.0, abs=1e-12)


def test_psnr_matches_hand_computed_value():
    hr = torch.full((3, 20, 20), 100 / 255)
    sr = hr.clone()
    sr[0] = 110 / 255  # red up by 10 levels -> Y up by 65.481*10/255
    dy = 65.481 * 10 / 255
    assert psnr_y(sr, hr) == pytest.approx(10 * math.log10(255**2 / dy**2), rel=1e-9)


def test_border_is_cropped():
    hr = torch.rand(3, 16, 16)
    sr = hr.clone()
    sr[:, :2, :] = 1 - sr[:, :2, :]  # damage only the top two rows
    assert psnr_y(sr, hr, border=2) == math.inf
    assert psnr_y(sr, hr, border=1) < 40


def test_luma_range_is_bt601():
    black, white = torch.zeros(3, 1, 1), torch.ones(3, 1, 1)
    assert float(rgb_to_y(black)) == pytest.approx(16.0)
    assert float(rgb_to_y(white)) == pytest.approx(235.0)


def test_quantization_rounds_to_8bit_levels():
    x = torch.tensor([0.0, 0.5 / 255 - 1e-6, 1.2, -0.3])
    assert torch.equal(quantize(x) * 255, torch.tensor([0.0, 0.0, 255.0, 0.0], dtype=torch.float64))


def test_ssim_falls_with_noise():
    hr = torch.rand(1, 3, 48, 48)
    small = ssim_y((hr + 0.02 * torch.randn_like(hr)), hr)
    big = ssim_y((hr + 0.2 * torch.randn_like(hr)), hr)
    assert 1.0 > small > big


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shapes differ"):
        psnr_y(torch.rand(3, 8, 8), torch.rand(3, 8, 9))

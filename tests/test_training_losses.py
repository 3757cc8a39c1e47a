"""Losses on hand-made inputs: exact Sobel values, edge-weighted L1 = known numbers, warm-up, GAN losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from training.losses import (
    SOBEL_X,
    PixelLoss,
    discriminator_loss,
    edge_mask,
    edge_weighted_l1,
    generator_adversarial_loss,
    sobel_magnitude,
)


def step_edge(h: int = 5, w: int = 6, at: int = 3) -> torch.Tensor:
    """``[1, 1, h, w]``: 0 left of column ``at``, 1 from it on."""
    img = torch.zeros(1, 1, h, w)
    img[..., at:] = 1.0
    return img


def test_sobel_matches_the_3x3_kernels_as_a_convolution():
    torch.manual_seed(0)
    img = torch.rand(2, 3, 9, 11, dtype=torch.float64)
    gx = torch.tensor(SOBEL_X, dtype=torch.float64)
    k = torch.stack([gx, gx.t()]).unsqueeze(1).repeat(3, 1, 1, 1)
    g = F.conv2d(F.pad(img, (1, 1, 1, 1), mode="replicate"), k, groups=3).view(2, 3, 2, 9, 11)
    assert torch.allclose(sobel_magnitude(img), g.pow(2).sum(2).sqrt(), atol=1e-12)


def test_sobel_of_a_vertical_step_edge_is_4_on_the_two_columns_beside_it():
    e = sobel_magnitude(step_edge())
    expected = torch.zeros(1, 1, 5, 6)
    expected[..., 2] = 4.0  # (1 + 2 + 1) * (0 - 1)
    expected[..., 3] = 4.0
    assert torch.equal(e, expected)


def test_sobel_of_a_horizontal_edge_is_the_transpose():
    img = step_edge(5, 6, 3).transpose(-1, -2)  # [1, 1, 6, 5], 1 from row 3 on
    e = sobel_magnitude(img)
    assert torch.equal(e, sobel_magnitude(step_edge(5, 6, 3)).transpose(-1, -2))


def test_sobel_of_a_single_dot_has_the_exact_diagonal_and_axial_values():
    img = torch.zeros(1, 1, 5, 5)
    img[0, 0, 2, 2] = 1.0
    e = sobel_magnitude(img)[0, 0]
    assert e[2, 1] == 2.0 and e[1, 2] == 2.0 and e[2, 3] == 2.0 and e[3, 2] == 2.0  # centre tap weight 2
    assert torch.isclose(e[1, 1], torch.tensor(math.sqrt(2.0)))  # gx = gy = -1
    assert e[2, 2] == 0.0  # symmetric around the dot: both gradients cancel
    assert e[0].abs().sum() == 0 and e[:, 0].abs().sum() == 0  # beyond the 3x3 reach


def test_sobel_is_per_channel_and_the_image_border_is_not_an_edge():
    flat = torch.full((2, 3, 7, 7), 0.7)
    assert sobel_magnitude(flat).abs().max() == 0  # replicate padding: no border response
    img = torch.zeros(1, 3, 5, 6)
    img[:, 1] = step_edge()[0, 0]
    e = sobel_magnitude(img)
    assert e[:, 0].abs().max() == 0 and e[:, 2].abs().max() == 0 and e[:, 1].max() == 4.0


def test_edge_weighted_l1_counts_errors_by_edge_strength():
    hr = step_edge()  # sum(E) = 4 * 5 rows * 2 columns = 40
    sr = hr.clone()
    sr[0, 0, 1, 2] += 0.5  # an error on the edge (E = 4)
    assert torch.isclose(edge_weighted_l1(sr, hr), torch.tensor(0.5 * 4 / 40))
    sr2 = hr.clone()
    sr2[0, 0, 1, 0] += 0.5  # the same error in a flat region costs nothing
    assert edge_weighted_l1(sr2, hr) == 0
    sr3 = hr + 0.25  # a uniform error: exactly 0.25
    assert torch.isclose(edge_weighted_l1(sr3, hr), torch.tensor(0.25))


def test_edge_weighted_l1_has_no_gradient_through_the_weights_and_is_zero_on_a_flat_target():
    hr = step_edge()
    sr = torch.zeros_like(hr, requires_grad=True)
    edge_weighted_l1(sr, hr).backward()
    # d/dsr of sum(|sr - hr| E)/sum(E) = -sign(hr - sr) * E / sum(E): nonzero only on the two edge columns
    expected = torch.zeros_like(hr)
    expected[..., 3] = -4.0 / 40  # hr = 1 > sr = 0 there; column 2 has hr = sr = 0 (sign 0)
    assert torch.allclose(sr.grad, expected)
    flat = torch.full((1, 3, 4, 4), 0.3)
    assert edge_weighted_l1(flat + 0.1, flat) == 0  # sum(E) = 0, eps keeps it finite


def test_pixel_loss_is_plain_l1_during_the_warmup_then_edge_weighted_then_mixed():
    torch.manual_seed(0)
    hr, sr = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    l1, edge = F.l1_loss(sr, hr), edge_weighted_l1(sr, hr)
    assert not torch.isclose(l1, edge)
    pure = PixelLoss(edge_weight=1.0)
    assert torch.equal(pure(sr, hr, edge_on=False)[0], l1)
    assert torch.equal(pure(sr, hr, edge_on=True)[0], edge)
    loss, parts = PixelLoss(edge_weight=0.25)(sr, hr)
    assert torch.isclose(loss, 0.25 * edge + 0.75 * l1)
    assert set(parts) == {"l1", "edge_l1"}
    assert torch.equal(PixelLoss(edge_weight=0.0)(sr, hr)[0], l1)


def test_edge_mask_selects_the_strongest_tenth():
    img = torch.zeros(1, 3, 10, 10)
    img[..., 5:] = 1.0  # edge columns 4 and 5: 20 of 100 pixels tie at the top
    m = edge_mask(img, 0.1)
    assert m.shape == (1, 1, 10, 10)
    assert m[..., 4:6].all() and m.sum() == 20
    torch.manual_seed(1)
    noisy = torch.rand(2, 3, 20, 20)
    assert edge_mask(noisy, 0.1).flatten(1).sum(1).tolist() == [40, 40]


def test_gan_losses_on_known_logits():
    real, fake = torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.5])
    # hinge: mean(relu(1 - real)) = 0.5, mean(relu(1 + fake)) = 0.75
    assert torch.isclose(discriminator_loss(real, fake, "hinge"), torch.tensor(1.25))
    assert torch.isclose(generator_adversarial_loss(fake, "hinge"), torch.tensor(0.75))
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731
    d_ns = (sp(-2.0) + sp(0.0)) / 2 + (sp(-2.0) + sp(0.5)) / 2
    assert math.isclose(float(discriminator_loss(real, fake, "nonsaturating")), d_ns, rel_tol=1e-6)
    assert math.isclose(float(generator_adversarial_loss(fake, "nonsaturating")), (sp(2.0) + sp(-0.5)) / 2, rel_tol=1e-6)
    with pytest.raises(ValueError):
        discriminator_loss(real, fake, "wasserstein")

"""FSA (archs.fsa) against a literal transcription of the reference CUDA kernels' loops.

The reference (zononhzy/LAMNet ``basicsr/ops/fsa/src/cuda/fsa_im2col_cuda.cuh``) runs one thread per
output element; ``_cuda_forward`` below is that thread body as plain Python over every element.
"""

import numpy as np
import pytest
import torch

from archs.fsa import (
    fsa_horizontal,
    fsa_per_tap,
    fsa_prefix_sum,
    fsa_spatial,
    fsa_vertical,
    normalize_kernel_map,
)

RELEASE_MAP = [[-8, 4], [-6, 2], [-4, 2], [-3, 1], [-2, 1], [-1, 1], [0, 1], [1, 1], [2, 1], [3, 1], [4, 2], [6, 2], [8, 4]]
MAPS = {
    "release": RELEASE_MAP,
    "centre": [[0, 1]],
    "small": [[-1, 1], [0, 1], [1, 1]],  # kernel_size 3, loc [2], stride [1]
    "long runs": [[-3, 5], [0, 3], [2, 7]],  # overlapping runs, length 5 and 7 (not powers of two)
    "off image": [[-40, 3], [0, 1], [25, 2], [6, 9]],  # taps that start beyond any tested image
    "only off image": [[9, 2], [-12, 4]],  # nothing reaches a 5x7 image
}


def _cuda_forward(x: np.ndarray, kernel: np.ndarray, kernel_map, groups: int, vertical: bool) -> np.ndarray:
    """fsa_{vertical,horizontal}_im2col_kernel, one loop iteration per CUDA thread (index)."""
    batch, channel, height, width = x.shape
    kernel_size = len(kernel_map)
    group_channel = channel // groups
    flat_in, flat_kernel = x.reshape(-1), kernel.reshape(-1)
    out = np.zeros(x.size, dtype=x.dtype)
    input_size = height * width
    for index in range(x.size):
        t = index
        w = t % width
        t //= width
        h = t % height
        t //= height
        c = t % channel
        b = t // channel
        g = c // group_channel
        kernel_base = ((b * groups + g) * kernel_size * height + h) * width + w
        total = 0.0
        for kk in range(kernel_size):
            start, length = kernel_map[kk]
            weight = flat_kernel[kernel_base + kk * input_size]
            val = 0.0
            direction = 1 if start >= 0 else -1
            for i in range(length):
                offset = start + i * direction
                if vertical:
                    if 0 <= h + offset < height:
                        val += flat_in[index + offset * width]
                else:
                    if 0 <= w + offset < width:
                        val += flat_in[index + offset]
            total += val * weight / length
        out[index] = total
    return out.reshape(x.shape)


def _cuda_backward(grad_output, x, kernel, kernel_map, groups, vertical):
    """fsa_{vertical,horizontal}_col2im_kernel (the atomicAdds become plain adds)."""
    batch, channel, height, width = x.shape
    kernel_size = len(kernel_map)
    group_channel = channel // groups
    flat_in, flat_kernel, flat_grad = x.reshape(-1), kernel.reshape(-1), grad_output.reshape(-1)
    grad_input = np.zeros(x.size, dtype=x.dtype)
    grad_kernel = np.zeros(kernel.size, dtype=x.dtype)
    input_size = height * width
    for index in range(x.size):
        t = index
        w = t % width
        t //= width
        h = t % height
        t //= height
        c = t % channel
        b = t // channel
        g = c // group_channel
        kernel_base = ((b * groups + g) * kernel_size * height + h) * width + w
        top_grad = flat_grad[index]
        for kk in range(kernel_size):
            start, length = kernel_map[kk]
            weight = flat_kernel[kernel_base + kk * input_size]
            val = 0.0
            direction = 1 if start >= 0 else -1
            for i in range(length):
                offset = start + i * direction
                step = offset * width if vertical else offset
                inside = 0 <= (h if vertical else w) + offset < (height if vertical else width)
                if inside:
                    val += flat_in[index + step]
                    grad_input[index + step] += weight * top_grad / length
            grad_kernel[kernel_base + kk * input_size] += val * top_grad / length
    return grad_input.reshape(x.shape), grad_kernel.reshape(kernel.shape)


def _random_case(b, c, h, w, groups, k, dtype=torch.float64):
    x = torch.randn(b, c, h, w, dtype=dtype)
    kernel = torch.randn(b, groups * k, h, w, dtype=dtype)
    return x, kernel


@pytest.mark.parametrize("name", list(MAPS))
@pytest.mark.parametrize("direction", ["horizontal", "vertical"])
@pytest.mark.parametrize("b, c, h, w, groups", [(1, 4, 5, 7, 1), (2, 8, 7, 5, 4), (1, 6, 3, 9, 2), (2, 4, 1, 1, 2)])
def test_matches_cuda_loop(name, direction, b, c, h, w, groups):
    kernel_map = MAPS[name]
    x, kernel = _random_case(b, c, h, w, groups, len(kernel_map))
    want = _cuda_forward(x.numpy(), kernel.numpy(), kernel_map, groups, direction == "vertical")
    for band in (None, 0, 40):  # default banding, one band, bands of a row or two
        got = fsa_spatial(x, kernel, kernel_map, groups, direction, band_elements=band)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)
    for variant in (fsa_per_tap, fsa_prefix_sum):
        np.testing.assert_allclose(variant(x, kernel, kernel_map, groups, direction).numpy(), want, atol=1e-10)


def test_taps_off_the_image_contribute_nothing():
    x, kernel = _random_case(1, 4, 5, 7, 1, 2)
    y = fsa_horizontal(x, kernel, MAPS["only off image"], 1)
    assert y.shape == x.shape and not y.any()
    # a tap partly off the image still divides by its full length
    x = torch.ones(1, 1, 1, 3, dtype=torch.float64)
    kernel = torch.ones(1, 1, 1, 3, dtype=torch.float64)
    y = fsa_horizontal(x, kernel, [[1, 4]], 1)  # samples w+1..w+4
    assert y.flatten().tolist() == [2 / 4, 1 / 4, 0.0]


def test_larger_images_and_batches_with_banding():
    """Bands cut across rows and batch items must not change any value (vertical taps cross bands)."""
    x, kernel = _random_case(3, 8, 37, 29, 2, len(RELEASE_MAP), dtype=torch.float32)
    for direction in ("horizontal", "vertical"):
        whole = fsa_spatial(x, kernel, RELEASE_MAP, 2, direction, band_elements=0)
        for band in (1, 300, 2000, 10**9):
            banded = fsa_spatial(x, kernel, RELEASE_MAP, 2, direction, band_elements=band)
            torch.testing.assert_close(banded, whole, rtol=0, atol=1e-6)
        ref = fsa_per_tap(x.double(), kernel.double(), RELEASE_MAP, 2, direction)
        torch.testing.assert_close(whole.double(), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("direction", ["horizontal", "vertical"])
def test_precision_does_not_degrade_with_image_size(direction):
    """Run means are local: float32 error stays at rounding level on a 3000-pixel axis."""
    long_axis = (1, 3000) if direction == "horizontal" else (3000, 1)
    x = torch.rand(1, 2, *long_axis) + 10.0  # a large mean, where running totals would lose digits
    kernel = torch.rand(1, len(RELEASE_MAP), *long_axis)
    want = fsa_per_tap(x.double(), kernel.double(), RELEASE_MAP, 1, direction)
    got = fsa_spatial(x, kernel, RELEASE_MAP, 1, direction)
    assert (got.double() - want).abs().max() < 6e-5  # outputs reach ~70: a few float32 ulps
    assert (fsa_prefix_sum(x, kernel, RELEASE_MAP, 1, direction).double() - want).abs().max() > 1e-3


def test_kernel_map_tensor_and_list_agree():
    x, kernel = _random_case(1, 4, 6, 6, 2, len(RELEASE_MAP))
    as_tensor = torch.tensor(RELEASE_MAP, dtype=torch.int32)
    torch.testing.assert_close(fsa_vertical(x, kernel, as_tensor, 2), fsa_vertical(x, kernel, RELEASE_MAP, 2))


@pytest.mark.parametrize("direction", ["horizontal", "vertical"])
@pytest.mark.parametrize("name", ["release", "long runs", "off image"])
def test_gradients(direction, name):
    kernel_map = MAPS[name]
    x, kernel = _random_case(1, 4, 4, 5, 2, len(kernel_map))
    x.requires_grad_(True)
    kernel.requires_grad_(True)
    fn = lambda a, k: fsa_spatial(a, k, kernel_map, 2, direction)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, kernel), fast_mode=name == "release")


@pytest.mark.parametrize("direction", ["horizontal", "vertical"])
def test_gradients_match_cuda_backward_loop(direction):
    kernel_map = MAPS["off image"]
    x, kernel = _random_case(2, 4, 5, 7, 2, len(kernel_map))
    grad_out = torch.randn_like(x)
    want_x, want_k = _cuda_backward(
        grad_out.numpy(), x.numpy(), kernel.numpy(), kernel_map, 2, direction == "vertical"
    )
    x.requires_grad_(True)
    kernel.requires_grad_(True)
    fsa_spatial(x, kernel, kernel_map, 2, direction).backward(grad_out)
    np.testing.assert_allclose(x.grad.numpy(), want_x, atol=1e-12)
    np.testing.assert_allclose(kernel.grad.numpy(), want_k, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("direction", ["horizontal", "vertical"])
def test_low_precision_on_cpu(dtype, direction):
    x, kernel = _random_case(1, 8, 9, 11, 4, len(RELEASE_MAP), dtype=torch.float32)
    kernel = kernel.tanh()
    want = fsa_spatial(x, kernel, RELEASE_MAP, 4, direction)
    got = fsa_spatial(x.to(dtype), kernel.to(dtype), RELEASE_MAP, 4, direction)
    assert got.dtype == dtype
    tol = 1.5e-2 if dtype == torch.float16 else 1e-1
    torch.testing.assert_close(got.float(), want, rtol=0, atol=tol)


def test_non_contiguous_inputs():
    x, kernel = _random_case(1, 4, 6, 8, 2, 3)
    xt, kt = x.transpose(2, 3).contiguous().transpose(2, 3), kernel[:, :, :, :]
    assert not xt.is_contiguous()
    torch.testing.assert_close(fsa_vertical(xt, kt, MAPS["small"], 2), fsa_vertical(x, kernel, MAPS["small"], 2))


@pytest.mark.parametrize(
    "kernel_map, match",
    [
        ([], "non-empty"),
        ([[0, 0]], "lengths must be >= 1"),
        ([[0, -2], [1, 1]], "lengths must be >= 1"),
        ([[0, 1, 2]], "pairs"),
        (torch.zeros(3, 2), "integers"),
        (torch.zeros(3, 3, dtype=torch.int32), r"shape \[K, 2\]"),
        (torch.zeros(0, 2, dtype=torch.int32), r"shape \[K, 2\]"),
        ([[0.5, 1]], "integers"),
    ],
)
def test_bad_kernel_maps(kernel_map, match):
    with pytest.raises(ValueError, match=match):
        normalize_kernel_map(kernel_map)


def test_bad_shapes():
    x, kernel = _random_case(1, 6, 4, 4, 2, 3)
    with pytest.raises(ValueError, match="groups"):
        fsa_horizontal(x, kernel[:, :6], MAPS["small"], 4)
    with pytest.raises(ValueError, match="kernel must have shape"):
        fsa_horizontal(x, kernel[:, :5], MAPS["small"], 2)
    with pytest.raises(ValueError, match="direction"):
        fsa_spatial(x, kernel, MAPS["small"], 2, "diagonal")

"""LMLT: the reference's numbers where it is right, padding done right where it is not, presets,
the published checkpoint, and its spandrel descriptor."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from testutil import assert_round_trip

import archs
from archs import IncompatibleWeightsError
from archs.blocks import pad_to_multiple
from archs.lmlt import LMLT, LMLT_base, LMLT_large, LMLT_tiny, LMLTArch
from testutil import spandrel_builtins

FIXTURES = Path(__file__).parent / "fixtures" / "lmlt"
PUBLISHED = "LMLT_tiny_x2.pth"

#: REFERENCES.md: parameter counts at ×2 / ×3 / ×4.
PRESETS = {
    "tiny": (LMLT_tiny, 36, {2: 239_340, 3: 244_215, 4: 251_040}),
    "base": (LMLT_base, 60, {2: 652_332, 3: 660_447, 4: 671_808}),
    "large": (LMLT_large, 84, {2: 1_268_076, 3: 1_279_431, 4: 1_295_328}),
}
PRESET_SCALES = [(name, scale) for name in PRESETS for scale in (2, 3, 4)]


def _fixture(name: str) -> tuple[dict[str, torch.Tensor], dict]:
    path = FIXTURES / f"{name}.safetensors"
    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["config"])
    return load_file(str(path)), config


def _fixture_model(tensors: dict[str, torch.Tensor]) -> LMLT:
    state_dict = {k.removeprefix("sd."): v for k, v in tensors.items() if k.startswith("sd.")}
    return archs.load_model(state_dict).model


def _random_lmlt(**kwargs) -> LMLT:
    """A small LMLT whose norms and biases are not at their initial values."""
    model = LMLT(**{"dim": 12, "n_blocks": 1, "upscaling_factor": 2, **kwargs}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@functools.lru_cache(maxsize=1)
def _published(path: Path) -> LMLT:
    """The published LMLT-Tiny ×2, loaded once per test session (tests must not modify it)."""
    return archs.load_model(path).model


def _psnr(a: torch.Tensor, b: torch.Tensor, peak: float = 1.0) -> float:
    mse = (a.double() - b.double()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse)


def _reflect_pad(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Reflect-pad bottom/right to ``multiple`` with plain F.pad where it can (pad < size)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph < h and pw < w:
        return F.pad(x, (0, pw, 0, ph), mode="reflect")
    return pad_to_multiple(x, multiple)


# --------------------------------------------------------------------------------------------------
# Presets


@pytest.mark.parametrize(("name", "scale"), PRESET_SCALES)
def test_preset_parameter_counts(name, scale):
    make, dim, counts = PRESETS[name]
    with torch.device("meta"):
        model = make(scale)
    assert model.hyperparameters["dim"] == dim
    assert model.hyperparameters["upscaling_factor"] == scale
    assert sum(p.numel() for p in model.parameters()) == counts[scale]


@pytest.mark.parametrize(("name", "scale"), PRESET_SCALES)
def test_preset_round_trip(name, scale):
    make = PRESETS[name][0]
    assert_round_trip(lambda: make(scale, dim=12, n_blocks=1))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(dim=16, n_blocks=2, ffn_scale=1.5, upscaling_factor=1),
        dict(dim=8, n_blocks=1, in_chans=1, upscaling_factor=2),
        dict(dim=8, n_blocks=1, in_chans=4, upscaling_factor=3),
    ],
)
def test_round_trip_variants(kwargs):
    assert_round_trip(lambda: LMLT(**kwargs), input_size=(9, 14))


@pytest.mark.parametrize(("name", "scale"), [("tiny", 3), ("base", 2), ("large", 4)])
def test_descriptor_of_presets(name, scale):
    make, dim, _ = PRESETS[name]
    desc = LMLTArch().load(make(scale).state_dict())
    assert desc.scale == scale and desc.purpose == "SR"
    assert desc.input_channels == desc.output_channels == 3
    assert desc.tags[:2] == [name, f"{dim}dim"]
    assert desc.model.hyperparameters == make(scale).hyperparameters


def test_descriptor_of_non_preset_model():
    desc = LMLTArch().load(LMLT(dim=16, n_blocks=3, ffn_scale=1.5, upscaling_factor=1, in_chans=1).state_dict())
    assert desc.tags == ["16dim", "3nb"]
    assert desc.purpose == "Restoration" and desc.scale == 1
    assert desc.input_channels == desc.output_channels == 1
    # the model pads itself: no size requirement beyond spandrel's defaults
    assert desc.size_requirements.minimum <= 1 and desc.size_requirements.multiple_of == 1
    assert not desc.size_requirements.square
    assert desc.supports_half and desc.supports_bfloat16


# --------------------------------------------------------------------------------------------------
# Parity with the reference implementation (fixtures made by running it; see fixtures/lmlt/README.md)


@pytest.mark.parametrize("name", ["random_dim12_b1_x2_64x64", "random_dim16_b2_ffn1.5_x1_64x128"])
def test_matches_reference_on_multiples_of_64(name):
    tensors, config = _fixture(name)
    model = _fixture_model(tensors)
    for key in ("dim", "n_blocks", "ffn_scale", "upscaling_factor"):
        assert model.hyperparameters[key] == config[key]
    with torch.no_grad():
        out = model(tensors["input"])
    assert out.shape == tensors["output"].shape
    assert (out - tensors["output"]).abs().max() <= 1e-4


def test_border_is_right_where_the_reference_is_wrong():
    tensors, config = _fixture("border_dim12_b1_x2_40x52")
    s = config["upscaling_factor"]
    model = _fixture_model(tensors)
    with torch.no_grad():
        out = model(tensors["input"])
    # ours equals the reference run on the reflect-padded (64x64) input, cropped at the very end
    assert (out - tensors["output_padded_cropped"]).abs().max() <= 1e-4
    # the reference's own output agrees everywhere but in its last `scale` rows and columns, which it gets wrong
    ref = tensors["output_reference"]
    assert (out - ref)[..., :-s, :-s].abs().max() <= 1e-4
    assert (out - ref)[..., -s:, :].abs().max() > 1e-2
    assert (out - ref)[..., :, -s:].abs().max() > 1e-2


def test_published_weights_match_reference(shared_weights):
    tensors, _ = _fixture("published_tiny_x2_baby_64x64")
    with torch.no_grad():
        out = _published(shared_weights / PUBLISHED)(tensors["input_u8"].float() / 255)
    assert (out - tensors["output"]).abs().max() <= 1e-4


def test_published_checkpoint_loads_params_ema(shared_weights):
    desc = archs.load_model(shared_weights / PUBLISHED)
    raw = torch.load(shared_weights / PUBLISHED, map_location="cpu", weights_only=True)
    assert set(raw) == {"params", "params_ema"}
    loaded = desc.model.state_dict()
    assert loaded.keys() == raw["params_ema"].keys()  # strict: nothing missing, nothing extra
    assert all(torch.equal(loaded[k], v) for k, v in raw["params_ema"].items())
    assert any(not torch.equal(loaded[k], v) for k, v in raw["params"].items())
    assert isinstance(desc.model, LMLT) and not desc.model.training
    assert desc.architecture.id == "LMLT"
    assert (desc.scale, desc.input_channels, desc.output_channels, desc.purpose) == (2, 3, 3, "SR")
    assert desc.tags == ["tiny", "36dim", "8nb"]
    assert desc.model.hyperparameters == LMLT_tiny(2).hyperparameters
    builtin_claims = [
        s.architecture.id
        for s in spandrel_builtins("detection")
        if s.architecture.id != "LMLT" and s.detect(raw["params_ema"])
    ]
    assert not builtin_claims, f"spandrel built-ins {builtin_claims} claim the published LMLT checkpoint"


# --------------------------------------------------------------------------------------------------
# Any input size


@pytest.mark.parametrize("size", [(1, 1), (1, 7), (3, 2), (17, 30), (40, 52), (63, 64), (64, 65)])
def test_any_size_equals_crop_of_padded_input(size):
    h, w = size
    model = _random_lmlt(upscaling_factor=3)
    x = torch.rand(1, 3, h, w)
    with torch.no_grad():
        out = model(x)
        want = model(_reflect_pad(x, 64))[..., : 3 * h, : 3 * w]
    assert out.shape == (1, 3, 3 * h, 3 * w)
    assert torch.isfinite(out).all()
    assert _psnr(out, want) >= 50


@pytest.mark.parametrize("window_size", [4, 6])
def test_window_size_is_a_parameter(window_size):
    model = _random_lmlt(window_size=window_size)
    assert model.pad_multiple == 8 * window_size
    x = torch.rand(2, 3, 20, 36)
    with torch.no_grad():
        out = model(x)
        want = model(_reflect_pad(x, 8 * window_size))[..., :40, :72]
        single = model(x[1:])
        model_w8 = LMLT(**{**model.hyperparameters, "window_size": 8}).eval()
        model_w8.load_state_dict(model.state_dict())
        out_w8 = model_w8(x)
    assert out.shape == (2, 3, 40, 72)
    assert _psnr(out, want) >= 50
    assert torch.allclose(out[1:], single, atol=1e-5)  # batch items do not mix
    assert (out - out_w8).abs().max() > 1e-3  # the window size changes the computation


def test_dim_must_split_into_four_levels():
    with pytest.raises(ValueError, match="divisible by 4"):
        LMLT(dim=10)


# --------------------------------------------------------------------------------------------------
# Loading errors, precision, training


def test_wrong_shapes_raise_incompatible_weights():
    state_dict = LMLT(dim=8, n_blocks=1, upscaling_factor=2).state_dict()
    broken = dict(state_dict)
    broken["to_img.0.weight"] = torch.zeros(10, 8, 3, 3)  # 10 is not 3·scale²
    broken["to_img.0.bias"] = torch.zeros(10)
    with pytest.raises(IncompatibleWeightsError, match="to_img.0.weight has 10 output channels"):
        archs.load_model(broken)
    bad_shape = dict(state_dict)
    bad_shape["feats.0.lhsb.mfr.2.qkv.weight"] = torch.zeros(6, 3)
    shape_message = r"wrong shape .*mfr.2.qkv.weight is \(6, 3\), expected \(6, 2\)"
    with pytest.raises(IncompatibleWeightsError, match=shape_message):
        archs.load_model(bad_shape)
    missing = {k: v for k, v in state_dict.items() if k != "feats.0.lhsb.aggr.bias"}
    with pytest.raises(IncompatibleWeightsError, match="missing 1 keys .*feats.0.lhsb.aggr.bias"):
        archs.load_model(missing)


def test_reduced_precision(shared_weights):
    tensors, _ = _fixture("published_tiny_x2_baby_64x64")
    model = copy.deepcopy(_published(shared_weights / PUBLISHED))
    with torch.no_grad():
        out = model.to(torch.bfloat16)(tensors["input_u8"].to(torch.bfloat16) / 255)
    assert out.dtype == torch.bfloat16
    assert _psnr(out.float(), tensors["output"]) >= 45
    small = _random_lmlt(dim=8, upscaling_factor=1)  # float16 convolutions are slow on CPUs: keep it tiny
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        want = small(x)
        half = small.half()(x.half())
    assert half.dtype == torch.float16
    assert _psnr(half.float(), want) >= 45


def test_trains():
    model = LMLT(dim=8, n_blocks=1, upscaling_factor=2, attn_drop_rate=0.5).train()
    x = torch.rand(2, 3, 10, 12)
    out = model(x)
    assert not torch.equal(out, model(x))  # attention dropout is active in training
    out.pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


# --------------------------------------------------------------------------------------------------
# Quality on a real photo (Set5 ×2): the published model clearly beats bicubic


def _rgb(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[None]


def _y_psnr(a: torch.Tensor, b: torch.Tensor, border: int) -> float:
    """PSNR of the BT.601 luma (16..235) after rounding to 8 bits, ``border`` pixels shaved."""

    def luma(x):
        x = (x.clamp(0, 1) * 255).round() / 255
        return 16 + 65.481 * x[:, 0] + 128.553 * x[:, 1] + 24.966 * x[:, 2]

    d = (luma(a) - luma(b))[..., border:-border, border:-border]
    return 10 * np.log10(255**2 / d.double().pow(2).mean().item())


@pytest.mark.parametrize(("image", "top", "left"), [("butterfly", 32, 32), ("woman", 48, 20)])
def test_set5_x2_beats_bicubic(shared_weights, set5, image, top, left):
    model = _published(shared_weights / PUBLISHED)
    lr = _rgb(set5 / "LRbicx2" / f"{image}.png")[..., top : top + 64, left : left + 64]
    hr = _rgb(set5 / "GTmod12" / f"{image}.png")[..., 2 * top : 2 * top + 128, 2 * left : 2 * left + 128]
    with torch.no_grad():
        sr = model(lr)
    bicubic = F.interpolate(lr, scale_factor=2, mode="bicubic", align_corners=False)
    assert sr.shape == hr.shape
    assert _y_psnr(sr, hr, 2) >= _y_psnr(bicubic, hr, 2) + 2.0


def test_window_size_from_option_and_file_name(tmp_path):
    """window_size leaves no trace in the weights: 8 by default, a load option or a ``_w<N>`` file name sets it."""
    import safetensors.torch

    model = LMLT(dim=12, n_blocks=1, upscaling_factor=2, window_size=4).eval()
    sd = model.state_dict()
    assert archs.load_model(sd).model.hyperparameters["window_size"] == 8
    assert archs.load_model(sd, window_size=4).model.hyperparameters["window_size"] == 4
    path = tmp_path / "LMLT_tiny_custom_w4.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, path)
    loaded = archs.load_model(path)
    assert loaded.model.hyperparameters["window_size"] == 4 and "w4" in loaded.tags
    x = torch.rand(1, 3, 20, 12)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), model(x), atol=1e-6)

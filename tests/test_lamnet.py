"""LAMNet: parameter counts, reference parity, spandrel round trips, any input size, bad checkpoints."""

import json
from pathlib import Path

import pytest
import safetensors.torch
from safetensors import safe_open
import torch

import archs
from archs import IncompatibleWeightsError, UnsupportedModelError
from archs.lamnet import (
    LAMNet,
    LayerNormUnchanged,
    depthwise_conv_cpu,
    LAMNet_base,
    LAMNet_large,
    LAMNetArch,
    generate_kernel_map,
    kernel_layout_of,
)
from testutil import assert_round_trip
from testutil import spandrel_builtins

FIXTURES = Path(__file__).parent / "fixtures" / "lamnet"
RELEASE_MAP = ((-8, 4), (-6, 2), (-4, 2), (-3, 1), (-2, 1), (-1, 1), (0, 1), (1, 1), (2, 1), (3, 1), (4, 2), (6, 2), (8, 4))
MIXER = "deep_feature_extraction.0.mixers.0.fn."


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights of a sensible scale (the reference init makes LAMNet nearly an identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("alpha"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif name.endswith(("beta", "bias")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
    return model


def tiny(**overrides) -> LAMNet:
    params = dict(num_blocks=1, num_groups=1, dim=8, kernel_size=5, kernel_loc=(2, 3), kernel_stride=(1, 2), num_head=2)
    return randomized(LAMNet(**{**params, **overrides}))


# --------------------------------------------------------------------------------------------------
# Presets and kernel maps


@pytest.mark.parametrize(
    "preset, counts",
    [(LAMNet_base, (828_364, 837_019, 849_136)), (LAMNet_large, (1_024_028, 1_032_683, 1_044_800))],
)
def test_preset_parameter_counts(preset, counts):
    with torch.device("meta"):
        got = tuple(sum(p.numel() for p in preset(scale).parameters()) for scale in (2, 3, 4))
    assert got == counts


def test_presets_use_the_release_kernel_map():
    with torch.device("meta"):
        model = LAMNet_large(2)
    assert model.hyperparameters["num_groups"] == 5 and model.hyperparameters["upscale"] == 2
    assert len(model.deep_feature_extraction) == 6  # 5 groups + the closing conv
    mixer = model.deep_feature_extraction[0].mixers[0].fn
    assert mixer.kernel_map.dtype == torch.int32 and tuple(mixer.kernel_map.shape) == (13, 2)
    assert mixer.h_kernel[0].weight.shape[-1] == 23


def test_generate_kernel_map_release():
    kernel_map, patch = generate_kernel_map(13, (1, 2, 4), (4, 6, 7))
    assert kernel_map == RELEASE_MAP and patch == 23


@pytest.mark.parametrize(
    "size, stride, loc",
    [(13, (1, 2, 4), (4, 6, 7)), (5, (1, 3), (2, 3)), (7, (2, 4), (3, 4)), (3, (1,), (2,)), (1, (1,), (1,)), (9, (1, 2), (2, 5))],
)
def test_kernel_layout_inverts_generation(size, stride, loc):
    kernel_map, _ = generate_kernel_map(size, stride, loc)
    found_loc, found_stride = kernel_layout_of(kernel_map)
    assert generate_kernel_map(size, found_stride, found_loc)[0] == kernel_map
    if size > 1:
        assert (found_loc, found_stride) == (list(loc), list(stride))


def test_kernel_layout_of_foreign_maps():
    assert kernel_layout_of(((-4, 2), (-1, 1), (0, 2), (2, 1), (5, 3))) is None  # not symmetric
    assert kernel_layout_of(((-3, 1), (0, 1), (3, 1))) is None  # gaps between runs
    assert kernel_layout_of(((0, 1), (1, 1))) is None  # even


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="kernel_loc\\[-1\\]"):
        LAMNet(kernel_size=11, kernel_loc=(3, 4, 5))  # the reference's own defaults fail its assertion
    with pytest.raises(ValueError, match="divisible"):
        LAMNet(dim=20, num_head=4)


# --------------------------------------------------------------------------------------------------
# Parity with the reference implementation


def _fixture_cases():
    return sorted(p.name.split(".")[0] for p in FIXTURES.glob("*.weights.safetensors"))


def test_fixtures_present():
    assert len(_fixture_cases()) == 5


@pytest.mark.parametrize("case", _fixture_cases())
def test_reference_parity(case):
    weights = FIXTURES / f"{case}.weights.safetensors"
    with safe_open(str(weights), "pt") as f:
        metadata = f.metadata()
    config, custom = json.loads(metadata["config"]), json.loads(metadata["custom_kernel_map"])
    io = safetensors.torch.load_file(str(FIXTURES / f"{case}.io.safetensors"))

    desc = archs.load_model(weights)
    assert isinstance(desc.architecture, LAMNetArch)
    hp = desc.model.hyperparameters
    for key, value in config.items():
        if key in ("kernel_loc", "kernel_stride") and custom is not None:
            continue
        assert hp[key] == value, key
    if custom is not None:
        assert hp["kernel_map"] == custom
    assert desc.scale == config["upscale"]
    with torch.no_grad():
        out = desc.model(io["input"])
    assert out.shape == io["output"].shape
    assert (out - io["output"]).abs().max() <= 1e-4


# --------------------------------------------------------------------------------------------------
# Round trips through spandrel's detection and loading


@pytest.mark.parametrize("preset", [LAMNet_base, LAMNet_large])
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_round_trip_preset_families(preset, scale):
    assert_round_trip(lambda: randomized(preset(scale, dim=8, num_blocks=1, num_head=2), seed=scale), input_size=(11, 9))


@pytest.mark.parametrize(
    "overrides",
    [
        dict(in_chans=1, upscale=2),
        dict(in_chans=4, upscale=1, expansion_factor=2.0),
        dict(expansion_factor=0.625, num_blocks=2),  # hidden width 5 from dim 8
        dict(kernel_size=9, kernel_loc=(2, 5), kernel_stride=(1, 2), num_head=4),
        dict(kernel_size=5, kernel_loc=None, kernel_stride=None, kernel_map=[[-4, 2], [-1, 1], [0, 2], [2, 1], [5, 3]]),
        dict(kernel_size=3, kernel_loc=None, kernel_stride=None, kernel_map=[[-1, 1], [0, 1], [1, 1]], patch_size=7),
    ],
)
def test_round_trip_variants(overrides):
    assert_round_trip(lambda: tiny(**overrides), input_size=(7, 6))


def test_descriptor():
    desc = archs.load_model(randomized(LAMNet_base(3)).state_dict())
    assert desc.architecture.id == "LAMNet" and desc.purpose == "SR"
    assert desc.scale == 3 and desc.input_channels == 3 and desc.output_channels == 3
    assert desc.tags == ["base", "64dim", "4x6blocks", "4heads", "13taps"]
    assert desc.supports_half and desc.supports_bfloat16
    assert desc.size_requirements.minimum in (0, 1) and desc.size_requirements.multiple_of == 1
    large = archs.load_model(LAMNet_large(2).state_dict())
    assert large.tags[0] == "large" and large.model.hyperparameters["num_groups"] == 5
    assert archs.load_model(tiny(upscale=1).state_dict()).purpose == "Restoration"


def test_checkpoint_wrappers_and_files(tmp_path):
    model = tiny(upscale=2)
    x = torch.rand(1, 3, 5, 4)
    with torch.no_grad():
        want = model(x)
    torch.save({"params_ema": model.state_dict(), "params": tiny().state_dict()}, tmp_path / "lamnet_x2.pth")
    desc = archs.load_model(tmp_path / "lamnet_x2.pth")
    with torch.no_grad():
        assert torch.equal(desc.model(x), want)


# --------------------------------------------------------------------------------------------------
# Detection does not collide with other families


def test_no_spandrel_builtin_claims_lamnet():
    sd = LAMNet_base(4).state_dict()
    claimed = [a.architecture.id for a in spandrel_builtins("detection") if a.detect(sd)]
    assert claimed == []


def test_detection_is_exclusive_among_flexsr_families():
    """No other FlexSR family (FlexNet, LMLT, ...) claims LAMNet, and LAMNet claims none of theirs."""
    lamnet_sd = LAMNet_base(2).state_dict()
    others = [s.architecture for s in archs.REGISTRY.architectures("detection") if s.architecture.id != "LAMNet"]
    assert others, "expected the other families in the registry"
    detect = LAMNetArch().detect
    for arch in others:
        assert not arch.detect(lamnet_sd), arch.id
        if isinstance(arch, archs.FlexSRArchitecture):
            with torch.device("meta"):
                their_sd = arch.signature_model().state_dict()
            assert not detect(their_sd), arch.id


def test_lamnet_does_not_claim_other_checkpoints(shared_weights):
    detect = LAMNetArch().detect
    for path in sorted(shared_weights.glob("*.pth")):
        assert not detect(archs.read_state_dict(path)), path.name
    flexnet_like = {
        k: torch.zeros(1)
        for k in (
            "in_to_feat.weight",
            "short_cut.block.0.weight",
            "short_cut.conv11.weight",
            "pipeline.att.0.t_blocks.0.gamma1",
            "pipeline.att.0.t_blocks.0.att.qkv.weight",
            "to_img.0.weight",
        )
    }
    assert not detect(flexnet_like)


def test_missing_kernel_map_is_unsupported_but_names_lamnet():
    sd = {k: v for k, v in tiny().state_dict().items() if not k.endswith("kernel_map")}
    with pytest.raises(UnsupportedModelError, match="LAMNet"):
        archs.load_model(sd)


# --------------------------------------------------------------------------------------------------
# Any input size, batches, dtypes, gradients


@pytest.mark.parametrize("h, w", [(1, 1), (1, 5), (6, 1), (2, 3), (13, 7), (24, 17)])
def test_any_input_size(h, w):
    model = tiny(kernel_size=13, kernel_loc=(4, 6, 7), kernel_stride=(1, 2, 4), upscale=3).eval()
    x = torch.rand(2, 3, h, w)
    with torch.no_grad():
        y = model(x)
        single = model(x[1:])
    assert y.shape == (2, 3, 3 * h, 3 * w)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[1:], single, rtol=1e-5, atol=1e-5)  # batch items stay independent


def test_forward_uses_the_loaded_kernel_map():
    model = tiny().eval()
    x = torch.rand(1, 3, 6, 7)
    with torch.no_grad():
        before = model(x)
        mixer = model.deep_feature_extraction[0].mixers[0].fn
        sd = model.state_dict()
        sd[MIXER + "kernel_map"] = torch.tensor([[-3, 2], [-1, 1], [0, 1], [1, 1], [3, 2]], dtype=torch.int32)
        model.load_state_dict(sd)
        after = model(x)
        assert mixer.taps()[0] == (-3, 2)
        assert not torch.allclose(before, after)
        mixer.kernel_map.copy_(torch.tensor(generate_kernel_map(5, (1, 2), (2, 3))[0], dtype=torch.int32))
        torch.testing.assert_close(model(x), before)


def test_inference_mode_load_and_reload():
    """ComfyUI runs nodes under torch.inference_mode: buffers then keep no version counter."""
    sd = _state()
    x = torch.rand(1, 3, 8, 7)
    with torch.inference_mode():
        model = archs.load_model(sd).model
        before = model(x)
        sd[MIXER + "kernel_map"] = torch.tensor([[-6, 4], [0, 1], [0, 1], [0, 1], [0, 1]], dtype=torch.int32)
        model.load_state_dict(sd)
        after = model(x)
    assert model.deep_feature_extraction[0].mixers[0].fn.taps()[0] == (-6, 4)
    assert not torch.allclose(before, after)


def test_inference_fast_paths_match_autograd_paths():
    """Under no_grad the CPU takes in-place and banded shortcuts; with autograd, plain ops. Same numbers."""
    model = tiny(kernel_size=13, kernel_loc=(4, 6, 7), kernel_stride=(1, 2, 4), num_blocks=2).eval()
    x = torch.rand(2, 3, 19, 13)
    with torch.no_grad():
        fast = model(x)
    plain = model(x)
    assert plain.requires_grad
    torch.testing.assert_close(fast, plain.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel, padding", [(3, 1), ((1, 23), (0, 11)), ((5, 3), (2, 1))])
def test_depthwise_conv_cpu_matches_conv2d(kernel, padding):
    conv = torch.nn.Conv2d(6, 6, kernel, padding=padding, groups=6)
    x = torch.randn(2, 6, 9, 5)
    with torch.no_grad():
        for band in (1 << 19, 30):  # one band; bands of a row or two
            torch.testing.assert_close(depthwise_conv_cpu(x, conv, band_elements=band), conv(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_forward_on_cpu(dtype):
    model = tiny(kernel_size=13, kernel_loc=(4, 6, 7), kernel_stride=(1, 2, 4)).eval()
    x = torch.rand(1, 3, 9, 8)
    with torch.no_grad():
        want = model(x)
        got = model.to(dtype)(x.to(dtype))
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert (got.float() - want).abs().max() < (0.05 if dtype == torch.float16 else 0.25)


def test_channel_norm_survives_large_fp16_features():
    """Deviations above 256 square past fp16's range; the norm still gives the float32 answer."""
    norm = LayerNormUnchanged(8)
    x = torch.randn(1, 8, 3, 3) * 150  # variance ~22500 fits fp16; single squares up to ~2e5 do not
    with torch.no_grad():
        want = norm(x)
        got = norm(x.half())
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want, rtol=0, atol=1e-2)


def test_gradients_flow():
    model = tiny().train()
    x = torch.rand(2, 3, 6, 5)
    model(x).square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads[MIXER + "h_kernel.1.weight"].abs().sum() > 0  # FSA passes gradient to its kernel


# --------------------------------------------------------------------------------------------------
# Bad checkpoints


def _state(**overrides):
    return dict(tiny(**overrides).state_dict())


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda v: v.float(), "integers"),
        (lambda v: v[:, :1], r"shape \[K, 2\]"),
        (lambda v: torch.cat([v, v[:, :1]], 1), r"shape \[K, 2\]"),
        (lambda v: v.new_zeros(v.shape), "lengths must be >= 1"),
        (lambda v: torch.stack([v[:, 0], -v[:, 1]], 1), "lengths must be >= 1"),
        (lambda v: v[:3], "does not fit"),  # 10 tap weights per pixel are not a multiple of 3 taps
        (lambda v: v.new_zeros(0, 2), "does not fit"),
    ],
)
def test_corrupt_kernel_map(corrupt, match):
    sd = _state()
    sd[MIXER + "kernel_map"] = corrupt(sd[MIXER + "kernel_map"])
    with pytest.raises(IncompatibleWeightsError, match=match):
        archs.load_model(sd)


def test_corrupt_kernel_map_in_a_later_layer():
    sd = _state(num_blocks=2)
    key = "deep_feature_extraction.0.mixers.2.fn.kernel_map"
    sd[key] = sd[key][:4]
    with pytest.raises(IncompatibleWeightsError, match="has 4 taps, but the layer predicts 5"):
        archs.load_model(sd)
    sd = _state(num_blocks=2)
    sd[key] = sd[key].flip(0).contiguous()
    with pytest.raises(IncompatibleWeightsError, match="share one kernel map"):
        archs.load_model(sd)


def test_corrupt_kernel_map_into_a_built_model():
    model = tiny()
    sd = model.state_dict()
    sd[MIXER + "kernel_map"] = sd[MIXER + "kernel_map"].double()
    with pytest.raises(IncompatibleWeightsError, match="int32 tensor"):
        model.load_state_dict(sd)


@pytest.mark.parametrize(
    "edit",
    [
        lambda sd: sd.__setitem__(MIXER + "proj_out.weight", torch.zeros(8, 8, 3, 3)),
        lambda sd: sd.__setitem__("deep_feature_extraction.0.mixers.1.fn.dwconv.weight", torch.zeros(4, 1, 3, 3)),
        lambda sd: sd.pop("deep_feature_extraction.0.mixers.1.fn.dwconv.bias"),
        lambda sd: sd.__setitem__("upsample.0.weight", torch.zeros(13, 8, 3, 3)),
        lambda sd: sd.__setitem__("deep_feature_extraction.0.mixers.0.fn.extra", torch.zeros(1)),
        lambda sd: sd.pop("deep_feature_extraction.1.weight"),
    ],
)
def test_wrong_shapes_and_keys(edit):
    sd = _state()
    edit(sd)
    with pytest.raises(IncompatibleWeightsError):
        archs.load_model(sd)

"""FlexNet V1: presets, spandrel detection and loading, parity with the reference implementations, fusion."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from testutil import assert_round_trip

import archs
from archs.blocks import pad_to_multiple
from archs.flexnet import UPSAMPLER_ALIASES, FlexNet, FlexNetArch, MetaFlexNet
from testutil import perturbed, spandrel_builtins

FIXTURES = Path(__file__).parent / "fixtures" / "flexnet"


def tiny(**kwargs) -> FlexNet:
    """A FlexNet of a few tens of thousands of parameters (linear, dim 8, 2 groups of 1 block, window 4)."""
    cfg = dict(dim=8, num_blocks=(1, 1), window_size=4, scale=2)
    cfg.update(kwargs)
    return FlexNet(**cfg)


def tiny_meta(**kwargs) -> FlexNet:
    """A MetaFlexNet with dim 8, one block per level and window 2 (padding unit 16)."""
    cfg = dict(dim=8, num_blocks=(1, 1, 1, 1), window_size=2, scale=2)
    cfg.update(kwargs)
    return MetaFlexNet(**cfg)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------------
# Presets


def test_default_and_meta_parameter_counts():
    with torch.device("meta"):
        assert n_params(FlexNet()) == 3_045_136
        assert n_params(MetaFlexNet()) == 38_053_568


def test_meta_preset_numbers_and_overrides():
    m = MetaFlexNet(scale=2, dim=8, window_size=2, num_blocks=(1, 1, 1, 1))
    assert m.hyperparameters["pipeline_type"] == "meta"
    assert m.hyperparameters["scale"] == 2 and m.hyperparameters["dim"] == 8
    with torch.device("meta"):
        preset = MetaFlexNet()
    assert preset.hyperparameters["dim"] == 48
    assert tuple(preset.hyperparameters["num_blocks"]) == (4, 6, 6, 8)


def test_trainner_upsampler_names_are_stored_as_umzi2_names():
    for alias, name in (("pixelshuffle", "ps"), ("nearest+conv", "n+c"), ("dysample", "dys")):
        m = tiny(upsampler=alias)
        assert m.hyperparameters["upsampler"] == name
        assert set(m.state_dict()) == set(tiny(upsampler=name).state_dict())


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="upsampler"):
        tiny(upsampler="bicubic")
    with pytest.raises(ValueError, match="pipeline_type"):
        tiny(pipeline_type="unet")
    with pytest.raises(ValueError, match="n\\+c"):
        tiny(upsampler="n+c", scale=5)
    with pytest.raises(ValueError, match="4 block counts"):
        tiny(pipeline_type="meta", num_blocks=(1, 1))


# --------------------------------------------------------------------------------------------------
# spandrel round trips: random model -> state dict -> detect -> load -> same hyperparameters and output

ROUND_TRIPS = {
    "linear-ps-x1": functools.partial(tiny, scale=1),
    "linear-ps-x2": functools.partial(tiny, scale=2),
    "linear-ps-x3": functools.partial(tiny, scale=3),
    "linear-ps-x4": functools.partial(tiny, scale=4),
    "linear-nc-x1": functools.partial(tiny, scale=1, upsampler="n+c"),
    "linear-nc-x2": functools.partial(tiny, scale=2, upsampler="n+c"),
    "linear-nc-x3": functools.partial(tiny, scale=3, upsampler="n+c"),
    "linear-nc-x4": functools.partial(tiny, scale=4, upsampler="n+c"),
    "linear-dys-x1": functools.partial(tiny, scale=1, upsampler="dys"),
    "linear-dys-x2": functools.partial(tiny, scale=2, upsampler="dys"),
    "linear-dys-x3": functools.partial(tiny, scale=3, upsampler="dys"),
    "linear-dys-x4": functools.partial(tiny, scale=4, upsampler="dys"),
    "linear-channel-norm": functools.partial(tiny, channel_norm=True),
    "linear-window5": functools.partial(tiny, window_size=5, num_blocks=(2, 1, 1)),
    "linear-window7": functools.partial(tiny, window_size=7, hidden_rate=2),
    "linear-gray": functools.partial(tiny, inp_channels=1, out_channels=1, scale=4),
    "linear-gray-to-rgb": functools.partial(tiny, inp_channels=1, out_channels=3, scale=2, upsampler="dys"),
    "linear-rgba-nc": functools.partial(tiny, inp_channels=4, out_channels=4, upsampler="n+c"),
    "linear-flash-attn": functools.partial(tiny, flash_attn=True),
    "meta-ps-x2": functools.partial(tiny_meta, scale=2),
    "meta-ps-x4": functools.partial(tiny_meta, scale=4),
    "meta-nc-x3": functools.partial(tiny_meta, scale=3, upsampler="n+c"),
    "meta-dys-x4": functools.partial(tiny_meta, scale=4, upsampler="dys", channel_norm=True),
    "meta-gray-flash": functools.partial(tiny_meta, inp_channels=1, out_channels=1, flash_attn=True),
    "meta-empty-levels": functools.partial(tiny_meta, num_blocks=(0, 1, 0, 1), hidden_rate=2, channel_norm=True),
    "linear-empty-first-group": functools.partial(tiny, num_blocks=(0, 2), hidden_rate=3),
}


@pytest.mark.parametrize("name", list(ROUND_TRIPS))
def test_round_trip(name):
    assert_round_trip(ROUND_TRIPS[name], input_size=(12, 10))


def test_descriptor_fields():
    desc = archs.load_model(tiny_meta(scale=4, upsampler="dys", channel_norm=True, flash_attn=True).state_dict())
    assert isinstance(desc.architecture, FlexNetArch)
    assert desc.scale == 4 and desc.input_channels == 3 and desc.output_channels == 3
    assert desc.purpose == "SR"
    assert {"meta", "8dim", "dys", "channel_norm", "flash_attn"} <= set(desc.tags)
    assert desc.supports_half and desc.supports_bfloat16
    assert desc.size_requirements.minimum <= 1 and desc.size_requirements.multiple_of == 1
    assert archs.load_model(tiny(scale=1).state_dict()).purpose == "Restoration"
    assert "linear" in archs.load_model(tiny().state_dict()).tags


def test_no_spandrel_builtin_claims_flexnet_and_ours_claims_none_of_theirs():
    sds = [f().state_dict() for f in (tiny, tiny_meta, functools.partial(tiny, upsampler="n+c"))]
    for sd in sds:
        claimed = [a.architecture.id for a in spandrel_builtins("detection") if a.detect(sd)]
        assert claimed == [], claimed
    arch = FlexNetArch()
    from spandrel.architectures.ESRGAN import ESRGAN
    from spandrel.architectures.SPAN import SPAN

    for other in (ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1), SPAN(num_in_ch=3, num_out_ch=3)):
        assert not arch.detect(other.state_dict())


def test_closest_family_for_a_damaged_flexnet_checkpoint():
    sd = tiny().state_dict()
    del sd["short_cut.conv11.weight"]
    with pytest.raises(archs.UnsupportedModelError, match="FlexNet"):
        archs.load_model(sd)


# --------------------------------------------------------------------------------------------------
# Sizes and padding


@pytest.mark.parametrize("window", [3, 5, 7, 8, 16])
def test_any_window_size_works(window):
    model = tiny(window_size=window, scale=2).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 11, 9)).shape == (1, 3, 22, 18)


@pytest.mark.parametrize("size", [(1, 1), (3, 5), (17, 9)])
def test_meta_on_inputs_smaller_than_its_padding_unit(size):
    model = tiny_meta(window_size=4, scale=3).eval()  # padding unit 32
    with torch.no_grad():
        y = model(torch.rand(2, 3, *size))
    assert y.shape == (2, 3, size[0] * 3, size[1] * 3)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("make", [functools.partial(tiny, window_size=4), functools.partial(tiny_meta, window_size=2)])
def test_output_is_the_crop_of_the_output_on_the_padded_input(make):
    model = make(scale=2).eval()
    unit = model.pad_unit
    x = torch.rand(1, 3, 2 * unit + 3, unit + 5)
    padded = pad_to_multiple(x, unit)
    assert padded.shape[-2] % unit == 0 and padded.shape[-1] % unit == 0 and padded.shape != x.shape
    with torch.no_grad():
        full = model(padded)
        got = model(x)
    torch.testing.assert_close(got, full[:, :, : x.shape[-2] * 2, : x.shape[-1] * 2], rtol=0, atol=1e-6)


@pytest.mark.parametrize("upsampler", ["ps", "n+c", "dys"])
def test_bfloat16_runs_and_stays_close(upsampler):
    """The descriptor says supports_bfloat16/half: every tail runs in reduced precision (here bf16 on CPU)."""
    model = perturbed(tiny_meta(upsampler=upsampler)).eval()
    x = torch.rand(1, 3, 9, 7)
    with torch.no_grad():
        want = model(x)
        got = model.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert (got.float() - want).abs().max() <= 0.05 * want.abs().max()


# --------------------------------------------------------------------------------------------------
# Fusion


def test_fusion_is_exact_and_fused_state_dict_loads_both_ways():
    model = perturbed(tiny(scale=2, channel_norm=True)).eval()
    x = torch.rand(1, 3, 13, 11)
    with torch.no_grad():
        want = model(x)
        archs.fuse(model)
        assert all(m.fused for m in archs.fusable_modules(model))
        got = model(x)
    assert (got - want).abs().max() <= 1e-5

    fused_sd = model.state_dict()
    unfused = tiny(scale=2, channel_norm=True).eval()
    unfused.load_state_dict(fused_sd, strict=True)
    refused = archs.fuse(archs.load_model(unfused.state_dict()))
    with torch.no_grad():
        assert (unfused(x) - want).abs().max() <= 1e-5
        assert (refused.model(x) - want).abs().max() <= 1e-5


# --------------------------------------------------------------------------------------------------
# Parity with umzi2's, traiNNer-redux's and neosr's code (fixtures made by running them; see README.md there)


def read_fixture(name: str) -> tuple[dict, torch.Tensor, torch.Tensor, dict]:
    from safetensors import safe_open

    with safe_open(str(FIXTURES / f"{name}.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    sd = {k[3:]: v for k, v in tensors.items() if k.startswith("sd.")}
    return sd, tensors["input"], tensors["output"], meta


PARITY = sorted(p.stem for p in FIXTURES.glob("*.safetensors"))


def test_every_reference_and_variant_has_a_fixture():
    assert {n.split("_")[0] for n in PARITY} == {"umzi2", "trainner", "neosr"}
    assert len(PARITY) >= 10
    assert any("flash" in n for n in PARITY) and any("meta" in n for n in PARITY)


@pytest.mark.parametrize("name", PARITY)
def test_reference_checkpoint_loads_strictly_and_gives_the_reference_output(name):
    sd, x, want, meta = read_fixture(name)
    desc = archs.load_model(sd)  # strict: spandrel's descriptor loads with strict key matching
    assert isinstance(desc.architecture, FlexNetArch)
    model = desc.model
    assert set(model.state_dict()) == set(sd)

    cfg = json.loads(meta["config"])
    hp = model.hyperparameters
    flash_default = meta["source"].startswith("neosr")  # neosr defaults to flash_attn=True
    assert hp["flash_attn"] == cfg.get("flash_attn", flash_default)
    assert hp["upsampler"] == UPSAMPLER_ALIASES[cfg.get("upsampler", "ps")]
    assert hp["pipeline_type"] == cfg.get("pipeline_type", "linear")
    for key in ("dim", "scale", "window_size", "hidden_rate", "channel_norm"):
        if key in cfg:
            assert hp[key] == cfg[key], key
    assert list(hp["num_blocks"]) == cfg["num_blocks"]

    with torch.no_grad():
        got = model(x)
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-4


@pytest.mark.parametrize("name", [n for n in PARITY if "flash" in n])
def test_flash_attn_checkpoints_need_neosr_ordering(name):
    """The variant is real: the same weights under the plain ordering miss the reference output by far."""
    sd, x, want, _ = read_fixture(name)
    hp = dict(archs.load_model(sd).model.hyperparameters, flash_attn=False)
    plain = FlexNet(**hp).eval()
    plain.load_state_dict({k: v for k, v in sd.items() if k != "flash_attn"})
    with torch.no_grad():
        assert (plain(x) - want).abs().max() > 1e-3  # 10x the parity tolerance


def test_stale_fused_kernel_in_a_checkpoint_is_ignored():
    """Reference checkpoints saved in training mode carry an outdated conv5x5_reparam; outputs must not use it."""
    sd, x, want, _ = read_fixture("umzi2_linear_ps_x2")
    sd = {k: (torch.zeros_like(v) if k.endswith("conv5x5_reparam.weight") else v) for k, v in sd.items()}
    model = archs.fuse(archs.load_model(sd)).model
    with torch.no_grad():
        assert (model(x) - want).abs().max() <= 1e-4

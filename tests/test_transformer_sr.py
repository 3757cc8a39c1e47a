"""The DaViT-style SR transformer (Craap/models): reference parity, both key schemes, padding, hints, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

import archs
from archs import IncompatibleWeightsError
from archs.transformer_sr import (
    PUBLISHED,
    SR,
    TransformerSR,
    convert_old_state_dict,
    hints_from_filename,
    load_transformer_sr,
)
from testutil import assert_round_trip, assert_same_hyperparameters
from testutil import spandrel_builtins

FIXTURES = Path(__file__).parent / "fixtures" / "transformer_sr"
TINY = dict(num_blocks=1, dim=16, window_size=4, num_heads=16)  # window and heads = the loader's defaults


def tiny_sr(**overrides) -> SR:
    return SR(**{"factor": 2, **TINY, **overrides})


def tiny_old(**overrides) -> TransformerSR:
    return TransformerSR(**{"factor": 2, **TINY, **overrides})


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    """Perturb norms and biases too (default init leaves them at 1/0), and sharpen q/k so attention matters."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
            elif "project_q" in name or "project_k" in name or "qkv" in name:
                p.mul_(4.0)
    return model.eval()


def run(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def safetensors_round(sd: dict) -> dict:
    return safetensors.torch.load(safetensors.torch.save({k: v.contiguous() for k, v in sd.items()}))


# --------------------------------------------------------------------------------------------------
# Size of the published model


def test_published_configuration_has_12_753_968_parameters():
    with torch.device("meta"):
        model = SR(**PUBLISHED)
    assert sum(p.numel() for p in model.parameters()) == 12_753_968
    assert PUBLISHED == dict(factor=4, num_blocks=8, dim=256, window_size=4, num_heads=16)


# --------------------------------------------------------------------------------------------------
# Parity with the reference implementation (fixtures made by running Craap/models; see README there)


def fixture_cases():
    return sorted(p.name.removesuffix(".weights.safetensors") for p in FIXTURES.glob("*.weights.safetensors"))


def test_fixtures_are_present():
    assert {"sr_f2_b1_d32_w4_h4", "sr_f3_b2_d24_w2_h3", "old_f2_b1_d32_w4_h4", "old_f4_rg12_b3_d16_w2_h2"} <= set(
        fixture_cases()
    )


@pytest.mark.parametrize("case", fixture_cases())
def test_matches_reference_outputs(case):
    path = FIXTURES / f"{case}.weights.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    config = json.loads(meta["config"])
    weights = safetensors.torch.load_file(str(path))
    io = safetensors.torch.load_file(str(FIXTURES / f"{case}.io.safetensors"))
    groups = config.get("residual_groups") or None
    desc = archs.load_model(
        weights, window_size=config["window_size"], num_heads=config["num_heads"], residual_groups=groups
    )
    assert type(desc.model) is (TransformerSR if groups else SR)
    expected = {k: v for k, v in config.items() if k != "residual_groups"}
    assert {k: desc.model.hyperparameters[k] for k in expected} == expected
    assert desc.scale == config["factor"]
    sizes = [k.removeprefix("input_") for k in io if k.startswith("input_")]
    assert sizes
    for size in sizes:
        got = run(desc.model, io[f"input_{size}"])
        want = io[f"output_{size}"]
        assert got.shape == want.shape
        diff = (got - want).abs().max().item()
        assert diff <= 1e-4, f"{case} {size}: max abs diff {diff:.3g}"


# --------------------------------------------------------------------------------------------------
# Round trips: random model -> state dict -> detect -> load -> same hyperparameters and outputs


@pytest.mark.parametrize("factor", [1, 2, 3, 4])
def test_round_trip_current_scheme(factor):
    assert_round_trip(lambda: randomized(tiny_sr(factor=factor)))


@pytest.mark.parametrize("factor, channels", [(2, 1), (1, 4), (3, 4)])
def test_round_trip_other_channel_counts(factor, channels):
    # (testutil's helper feeds 3 channels unless the model calls it in_chans/inp_channels)
    model = randomized(tiny_sr(factor=factor, num_blocks=2, in_channels=channels, out_channels=channels))
    x = torch.rand(1, channels, 7, 5)
    desc = archs.load_model(model.state_dict())
    assert_same_hyperparameters(model, desc.model)
    assert (desc.input_channels, desc.output_channels, desc.scale) == (channels, channels, factor)
    assert torch.allclose(run(desc.model, x), run(model, x), atol=1e-5)


@pytest.mark.parametrize("factor", [1, 2, 3, 4])
def test_round_trip_old_scheme_loads_as_sr(factor):
    old = randomized(tiny_old(factor=factor))
    x = torch.rand(1, 3, 12, 10)
    want = run(old, x)
    sd = old.state_dict()
    assert "blocks.0.0.window_attention.qkv.weight" in sd and "in_conv.weight" in sd and "out_conv.0.weight" in sd
    for state in (dict(sd), safetensors_round(sd)):
        desc = archs.load_model(state)
        assert type(desc.model) is SR
        assert desc.model.hyperparameters == {k: v for k, v in old.hyperparameters.items() if k != "residual_groups"}
        assert desc.scale == factor
        assert any("TransformerSR keys" in t for t in desc.tags)
        got = run(desc.model, x)
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_old_scheme_conversion_is_exact_and_complete():
    old = randomized(tiny_old(num_blocks=2))
    converted = convert_old_state_dict(old.state_dict())
    sr = tiny_sr(num_blocks=2)
    assert set(converted) == set(sr.state_dict())
    sr.load_state_dict(converted)  # strict
    qkv = old.state_dict()["blocks.1.1.window_attention.qkv.weight"]
    assert torch.equal(converted["layers.2.1.window_attention.project_k.weight"], qkv[16:32])
    x = torch.rand(2, 3, 8, 12)
    assert torch.allclose(run(sr.eval(), x), run(old, x), atol=1e-6)


def test_residual_groups_load_as_transformer_sr():
    old = randomized(tiny_old(num_blocks=3, residual_groups=[1, 2]))
    x = torch.rand(1, 3, 8, 8)
    want = run(old, x)
    desc = archs.load_model(old.state_dict(), residual_groups=[1, 2])
    assert_same_hyperparameters(old, desc.model)
    assert torch.allclose(run(desc.model, x), want, atol=1e-5)
    assert any("residual groups [1, 2]" in t for t in desc.tags)
    # the groups change the function: without them the same weights give another output
    plain = archs.load_model(old.state_dict())
    assert (run(plain.model, x) - want).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------
# Any input size: reflect-pad to the window, run, crop


@pytest.mark.parametrize("size", [(1, 1), (1, 6), (2, 3), (3, 3), (5, 1), (7, 9), (4, 4), (8, 12), (13, 6)])
@pytest.mark.parametrize("factor", [1, 3])
def test_any_size_gives_the_right_shape(size, factor):
    model = randomized(tiny_sr(factor=factor))
    out = run(model, torch.rand(2, 3, *size))
    assert out.shape == (2, 3, size[0] * factor, size[1] * factor)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("size", [(4, 4), (8, 12), (16, 4)])
def test_window_multiples_are_not_padded(size):
    model = randomized(tiny_sr())
    x = torch.rand(1, 3, *size)
    no_pad = run(model.layers, x - 0.5) + 0.5  # the reference's forward, which has no padding
    # the inference form (window tokens throughout, Gram-matrix channel attention) equals it to float rounding
    assert (run(model, x) - no_pad).abs().max() <= 1e-5


def test_other_sizes_run_on_the_reflect_padded_image():
    """Documented choice: reflect-pad bottom/right, so the channel attention's L is the padded H*W."""
    model = randomized(tiny_sr())
    x = torch.rand(1, 3, 6, 9)
    padded = torch.nn.functional.pad(x, (0, 3, 0, 2), mode="reflect")
    want = (run(model.layers, padded - 0.5) + 0.5)[..., :12, :18]
    assert torch.allclose(run(model, x), want, atol=1e-6)


def test_batch_items_are_independent():
    model = randomized(tiny_sr())
    x = torch.rand(3, 3, 5, 7)
    whole = run(model, x)
    for i in range(3):
        assert torch.allclose(whole[i : i + 1], run(model, x[i : i + 1]), atol=1e-5)


def test_half_precision_is_close_to_float():
    model = randomized(tiny_sr())
    x = torch.rand(1, 3, 8, 8)
    want = run(model, x)
    got = run(model.half(), x.half()).float()
    assert (got - want).abs().max() < 5e-2


# --------------------------------------------------------------------------------------------------
# Window size and heads: not in the weights; defaults, overrides, file-name hints


def test_defaults_are_the_published_window_and_heads():
    desc = archs.load_model(tiny_sr().state_dict())
    assert desc.model.hyperparameters["window_size"] == 4
    assert desc.model.hyperparameters["num_heads"] == 16
    assert "w4 (assumed)" in desc.tags and "h16 (assumed)" in desc.tags


def test_overrides_set_window_and_heads():
    model = randomized(tiny_sr(window_size=2, num_heads=4))
    x = torch.rand(1, 3, 6, 10)
    for desc in (
        load_transformer_sr(model.state_dict(), window_size=2, num_heads=4),
        archs.load_model(model.state_dict(), window_size=2, num_heads=4),
    ):
        assert_same_hyperparameters(model, desc.model)
        assert "w2" in desc.tags and "h4" in desc.tags
        assert torch.allclose(run(desc.model, x), run(model, x), atol=1e-5)
    # the defaults give another function of the same weights: the options matter
    default = archs.load_model(model.state_dict())
    assert (run(default.model, x) - run(model, x)).abs().max() > 1e-3


@pytest.mark.parametrize(
    "name, hints",
    [
        ("transformerSR_b8_d256_w4_h16.pt", {"window_size": 4, "num_heads": 16}),
        ("/some/dir/transformerSR_b8_d256_w8_h16.pt", {"window_size": 8, "num_heads": 16}),
        ("my-model.W2.H4.safetensors", {"window_size": 2, "num_heads": 4}),
        ("sr_h8.pth", {"num_heads": 8}),
        ("x_w4_w8_h2.pt", {"num_heads": 2}),  # conflicting window tokens are ignored
        ("w4h16.pt", {}),  # not separate tokens
        ("wide_head_4x.pth", {}),
        ("w0_h16.pt", {"num_heads": 16}),
    ],
)
def test_hints_from_filename(name, hints):
    assert hints_from_filename(name) == hints


def test_file_name_sets_window_and_heads(tmp_path):
    model = randomized(tiny_sr(window_size=2, num_heads=4))
    path = tmp_path / "transformerSR_b1_d16_w2_h4.safetensors"
    safetensors.torch.save_file(model.state_dict(), path)
    desc = archs.load_model(path)
    assert_same_hyperparameters(model, desc.model)
    x = torch.rand(1, 3, 6, 6)
    assert torch.allclose(run(desc.model, x), run(model, x), atol=1e-5)
    # explicit options beat the name
    assert archs.load_model(path, num_heads=2).model.hyperparameters["num_heads"] == 2
    # the same weights under a plain name get the published defaults
    plain = tmp_path / "plain.pt"
    torch.save(model.state_dict(), plain)
    assert archs.load_model(plain).model.hyperparameters["window_size"] == 4


def test_unknown_option_is_refused():
    with pytest.raises(TypeError, match="shift_size"):
        archs.load_model(tiny_sr().state_dict(), shift_size=2)


# --------------------------------------------------------------------------------------------------
# Bad input


def test_heads_not_dividing_dim_is_a_clear_error():
    with pytest.raises(ValueError, match=r"num_heads=3 does not divide dim=16"):
        tiny_sr(num_heads=3)
    sd = tiny_sr().state_dict()
    with pytest.raises(IncompatibleWeightsError, match=r"num_heads=3 does not divide dim=16.*\[1, 2, 4, 8, 16\]"):
        archs.load_model(sd, num_heads=3)
    sd24 = SR(factor=2, num_blocks=1, dim=24, window_size=4, num_heads=4).state_dict()
    with pytest.raises(IncompatibleWeightsError, match="published default 16"):
        archs.load_model(sd24)


def test_wrong_shapes_are_incompatible():
    sd = tiny_sr().state_dict()
    bad = dict(sd, **{"layers.1.0.mlp.0.weight": torch.zeros(63, 16)})
    with pytest.raises(IncompatibleWeightsError):
        archs.load_model(bad)
    bad = dict(sd, **{"layers.1.1.window_attention.project_v.bias": torch.zeros(8)})
    with pytest.raises(IncompatibleWeightsError):
        archs.load_model(bad)
    bad = dict(sd, **{"layers.2.weight": torch.zeros(12, 16, 5, 5)})
    with pytest.raises(IncompatibleWeightsError, match="3x3"):
        archs.load_model(bad)


def test_missing_and_extra_keys_are_incompatible():
    sd = tiny_sr(num_blocks=2).state_dict()
    missing = {k: v for k, v in sd.items() if k != "layers.2.1.norm2.bias"}
    with pytest.raises(IncompatibleWeightsError):
        archs.load_model(missing)
    with pytest.raises(IncompatibleWeightsError):
        archs.load_model(dict(sd, **{"layers.1.0.window_attention.extra": torch.zeros(1)}))


def test_old_scheme_bad_weights_are_incompatible():
    sd = tiny_old().state_dict()
    with pytest.raises(IncompatibleWeightsError, match="multiple of 3"):
        archs.load_model(dict(sd, **{"blocks.0.0.window_attention.qkv.weight": torch.zeros(47, 16)}))
    with pytest.raises(IncompatibleWeightsError):
        archs.load_model(dict(sd, **{"blocks.0.1.window_attention.qkv.weight": torch.zeros(45, 16)}))
    with pytest.raises(IncompatibleWeightsError, match="residual_groups"):
        archs.load_model(tiny_sr().state_dict(), residual_groups=[2])


# --------------------------------------------------------------------------------------------------
# Detection: claims only its own checkpoints


def test_spandrel_built_ins_do_not_claim_either_scheme():
    for sd in (tiny_sr().state_dict(), tiny_old().state_dict()):
        claimed = [a.architecture.id for a in spandrel_builtins("detection")
                   if a.architecture.id != "TransformerSR" and a.detect(sd)]
        assert claimed == []


def test_does_not_claim_other_families():
    arch = next(a for a in archs.REGISTRY.architectures("insertion") if a.architecture.id == "TransformerSR")
    foreign = [
        # FlexNet
        {"short_cut.block.0.weight": 0, "in_to_feat.weight": 0, "pipeline.att.0.t_blocks.0.gamma1": 0,
         "to_img.0.weight": 0, "layers.0.weight": 0, "layers.0.bias": 0},
        # LMLT / LAMNet / EIMN-like layouts, and SwinIR-like `layers.0.*`
        {"to_feat.weight": 0, "feats.0.layers.0.weight": 0, "to_img.0.weight": 0},
        {"layers.0.residual_group.blocks.0.norm1.weight": 0, "conv_first.weight": 0},
        {"in_conv.weight": 0, "out_conv.0.weight": 0, "blocks.0.0.attn.qkv.weight": 0},
    ]
    for sd in foreign:
        assert not arch.detect(sd)
    ours = (tiny_sr().state_dict(), tiny_old().state_dict())
    for other in archs.REGISTRY.architectures("insertion"):
        if other.architecture.id == "TransformerSR":
            continue
        with torch.device("meta"):
            sd = other.architecture.signature_model().state_dict()
        assert not arch.detect(sd), other.architecture.id
        assert not any(other.detect(o) for o in ours), other.architecture.id


def test_installed_into_spandrel_loads_both_schemes():
    from spandrel import ArchRegistry, ModelLoader

    registry = archs.install(ArchRegistry())
    for model in (tiny_sr(), tiny_old()):
        desc = ModelLoader(registry=registry).load_from_state_dict(model.state_dict())
        assert desc.architecture.id == "TransformerSR" and type(desc.model) is SR


def test_unknown_checkpoint_names_this_family_as_closest():
    sd = {k: v for k, v in tiny_sr().state_dict().items() if "project_q" not in k}
    with pytest.raises(archs.UnsupportedModelError, match="TransformerSR"):
        archs.load_model(sd)

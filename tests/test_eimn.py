"""EIMN: presets, loading (detect + hyperparameters from shapes), sizes, precision, the published
checkpoint on Set5, and parity with the authors' implementation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import spandrel
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import archs
from archs.eimn import EIMN, EIMN_A, EIMN_L, ChannelLayerNorm, EIMNArch, mlp_ratio_for
from archs.registry import FlexSRArchitecture
from testutil import assert_round_trip
from training.metrics import evaluate_pairs, set5_pairs
from testutil import spandrel_builtins

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURES = Path(__file__).parent / "fixtures" / "eimn"
ROOT = Path(__file__).resolve().parents[1]


def randomized(model: EIMN) -> EIMN:
    """Give a model the kind of state a trained one has: non-trivial layer scales, norms and BN stats."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_scale" in name:
                p.normal_(0, 0.5)
            elif "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0, 0.3)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
            elif name.endswith("num_batches_tracked"):
                b.fill_(1234)
    return model


# ------------------------------------------------------------------------------------------------
# Presets


@pytest.mark.parametrize(
    "preset, scale, params",
    [
        (EIMN_L, 2, 981_724),
        (EIMN_L, 3, 990_379),
        (EIMN_L, 4, 1_002_496),
        (EIMN_A, 2, 860_098),
        (EIMN_A, 3, 868_753),
        (EIMN_A, 4, 880_870),
    ],
)
def test_preset_parameter_counts_match_the_paper(preset, scale, params):
    with torch.device("meta"):
        model = preset(scale)
    assert sum(p.numel() for p in model.parameters()) == params
    assert model.hyperparameters["scale"] == scale


def test_preset_overrides_and_keyword_only_arguments():
    model = EIMN_A(3, embed_dims=8, num_stages=2)
    assert model.hyperparameters["num_stages"] == 2 and model.hyperparameters["embed_dims"] == 8
    with pytest.raises(TypeError):
        EIMN(16)  # keyword-only, like every FlexSR model


def test_freeze_param_trains_only_the_tail():
    model = EIMN(embed_dims=8, num_stages=1, freeze_param=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"tail.0.weight", "tail.0.bias"}


# ------------------------------------------------------------------------------------------------
# Round trips: random model -> state dict -> detect -> load -> same hyperparameters and output


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("shape", ["EIMN_L", "EIMN_A"])
def test_round_trip_preset_shaped(shape, scale):
    # The presets' structure (width multiple of 8, one block per stage, ratio 2.66) at toy size;
    # EIMN_L-shaped models have more stages than EIMN_A-shaped ones, as the real ones do.
    stages = {"EIMN_L": 4, "EIMN_A": 3}[shape]
    preset = {"EIMN_L": EIMN_L, "EIMN_A": EIMN_A}[shape]
    assert_round_trip(lambda: randomized(preset(scale, embed_dims=16, num_stages=stages)), input_size=(9, 7))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(embed_dims=8, num_stages=2, depths=2, mlp_ratios=2.0, scale=2),
        dict(embed_dims=12, num_stages=1, mlp_ratios=1.5, scale=1),  # not a multiple of 8; restoration
        dict(embed_dims=8, num_stages=1, scale=2, in_chans=1, out_chans=1),  # grayscale
        dict(embed_dims=8, num_stages=1, scale=3, in_chans=4, out_chans=4),
    ],
)
def test_round_trip_other_configs(kwargs):
    assert_round_trip(lambda: randomized(EIMN(**kwargs)), input_size=(6, 5))


def test_descriptor_fields_and_tags():
    desc = archs.load_model(randomized(EIMN_A(4, embed_dims=16)).state_dict())
    assert desc.architecture.id == "EIMN" and desc.purpose == "SR" and desc.scale == 4
    assert desc.tags[:1] == ["16dim"]  # width differs from EIMN_A's: no preset name claimed
    assert desc.input_channels == desc.output_channels == 3
    assert desc.size_requirements.minimum <= 1 and desc.size_requirements.multiple_of == 1
    assert desc.supports_half and desc.supports_bfloat16
    with torch.device("meta"):
        sd_l = EIMN_L(3).state_dict()
    desc_l = EIMNArch().load({k: torch.zeros_like(v, device="cpu") for k, v in sd_l.items()})
    assert desc_l.tags[0] == "EIMN_L" and desc_l.scale == 3
    assert desc_l.model.hyperparameters["mlp_ratios"] == 2.66


def test_mlp_ratio_recovered_from_any_hidden_width():
    for dim in range(4, 97):
        for hidden in range(1, 4 * dim + 1):
            r = mlp_ratio_for(dim, hidden)
            assert int(dim * r) == hidden, (dim, hidden, r)
    assert mlp_ratio_for(64, 170) == 2.66 and mlp_ratio_for(16, 32) == 2.0


def test_loaded_model_is_in_eval_mode_and_batchnorm_uses_running_stats():
    desc = archs.load_model(randomized(EIMN(embed_dims=8, num_stages=2)).state_dict())
    assert not any(m.training for m in desc.model.modules())
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        together = desc.model(x)
        alone = torch.cat([desc.model(x[:1]), desc.model(x[1:])])
    # with batch statistics, each sample's output would depend on the rest of the batch
    assert torch.allclose(together, alone, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Input sizes: no padding is needed, everything down to 1x1 works


@pytest.mark.parametrize("scale", [2, 3])
def test_any_input_size(scale):
    model = randomized(EIMN(embed_dims=8, num_stages=2, scale=scale)).eval()
    with torch.no_grad():
        for h, w in [(1, 1), (1, 6), (5, 1), (2, 3), (7, 7), (13, 9), (16, 17)]:
            y = model(torch.rand(1, 3, h, w))
            assert y.shape == (1, 3, h * scale, w * scale), (h, w)
            assert torch.isfinite(y).all()


# ------------------------------------------------------------------------------------------------
# Precision


def test_channel_norm_survives_float16_feature_magnitudes():
    # the released models feed features of magnitude ~1e3 into DFFM's norm; squared they overflow fp16
    norm = ChannelLayerNorm(16)
    x = torch.randn(1, 16, 4, 4) * 1000
    want = norm(x)
    got = norm.half()(x.half())
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    assert torch.allclose(got.float(), want, atol=1e-2)


def test_bfloat16_model_stays_close_to_float32():
    model = randomized(EIMN(embed_dims=8, num_stages=2)).eval()
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        want = model(x)
        got = model.to(torch.bfloat16)(x.to(torch.bfloat16)).float()
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() < 0.05 * want.abs().max()


# ------------------------------------------------------------------------------------------------
# Detection and errors


def _eimn_state_dict() -> dict:
    return randomized(EIMN(embed_dims=8, num_stages=2)).state_dict()


def _foreign_key_sets() -> dict[str, list[str]]:
    """Key layouts of the other families FlexSR knows (from their reference implementations)."""
    flexnet = ["short_cut.block.0.weight", "short_cut.block.2.weight", "short_cut.conv11.weight",
               "in_to_feat.weight", "pipeline.att.0.t_blocks.0.gamma1", "pipeline.att.0.t_blocks.0.att.qkv.weight",
               "pipeline.att.0.conv.block.0.weight", "to_img.0.weight", "window_size"]
    lamnet = ["shallow_feature_extraction.weight", "deep_feature_extraction.0.mixers.0.fn.proj_in.weight",
              "deep_feature_extraction.0.alpha", "alpha", "upsample.0.weight", "kernel_map"]
    davit = ["layers.0.weight", "layers.1.0.window_attention.project_q.weight", "layers.1.0.norm1.weight",
             "layers.1.0.mlp.0.weight", "layers.3.weight"]
    transformer_sr = ["in_conv.weight", "blocks.0.0.window_attention.qkv.weight", "blocks.0.0.norm1.weight",
                      "out.weight", "out_conv.0.weight"]
    return {"FlexNet": flexnet, "LAMNet": lamnet, "DaViT-SR": davit, "TransformerSR": transformer_sr}


def test_detect_claims_no_other_family():
    detect = EIMNArch().detect
    for family, keys in _foreign_key_sets().items():
        assert not detect({k: torch.zeros(1) for k in keys}), family
    # a half-EIMN mixture (EIMN keys with another family's head) is not claimed either
    sd = _eimn_state_dict()
    for key in ("block1.0.attn.spatial_1.weight", "block1.0.mlp.DFFM.spatial_expand.weight", "norm1.weight"):
        assert not detect({k: v for k, v in sd.items() if k != key}), key
    # every other FlexSR family's own layout (as registered on this branch) is not claimed, and vice versa
    for support in archs.REGISTRY.architectures("insertion"):
        arch = support.architecture
        if isinstance(arch, FlexSRArchitecture) and arch.id != "EIMN":
            with torch.device("meta"):
                other = arch.signature_model().state_dict()
            assert not detect(other), arch.id
            assert not arch.detect(sd), arch.id


def test_detect_does_not_claim_the_published_lmlt_checkpoint(shared_weights):
    sd = archs.read_state_dict(shared_weights / "LMLT_tiny_x2.pth")
    assert not EIMNArch().detect(sd)


def test_no_spandrel_builtin_claims_eimn():
    sd = _eimn_state_dict()
    claimed = [
        s.architecture.id
        for s in spandrel_builtins("detection")
        if not isinstance(s.architecture, FlexSRArchitecture) and s.detect(sd)
    ]
    assert claimed == []


def test_spandrel_loads_eimn_once_installed():
    registry = spandrel.ArchRegistry()  # spandrel's built-ins only; its global registry stays untouched
    registry.add(*spandrel_builtins("insertion"))
    archs.install(registry)
    desc = registry.load(_eimn_state_dict())
    assert isinstance(desc.model, EIMN) and desc.architecture.id == "EIMN"
    assert not desc.model.training


@pytest.mark.parametrize(
    "damage",
    [
        "wrong_ffn_width",
        "missing_key",
        "uneven_stages",
        "no_batchnorm_stats",
        "odd_tail",
        "wrong_split",
    ],
)
def test_wrong_shapes_raise_incompatible_weights(damage):
    sd = _eimn_state_dict()
    if damage == "wrong_ffn_width":
        sd["block2.0.mlp.linear_out.weight"] = torch.zeros(8, 20, 1, 1)
    elif damage == "missing_key":
        del sd["block2.0.attn.out.bias"]
    elif damage == "uneven_stages":  # stage 2 has a second block that stage 1 lacks
        sd.update({k.replace("block2.0.", "block2.1."): v for k, v in sd.items() if k.startswith("block2.0.")})
    elif damage == "no_batchnorm_stats":
        sd = {k: v for k, v in sd.items() if "running_" not in k and "num_batches" not in k}
    elif damage == "odd_tail":
        sd["tail.0.weight"], sd["tail.0.bias"] = torch.zeros(10, 8, 3, 3), torch.zeros(10)
    elif damage == "wrong_split":
        sd["block1.0.attn.spatial_1.weight"] = torch.zeros(4, 1, 5, 5)
    with pytest.raises(archs.IncompatibleWeightsError):
        archs.load_model(sd)


# ------------------------------------------------------------------------------------------------
# Parity with the authors' implementation (fixtures made once from liux520/EIMN; see README there)


def _fixtures():
    return sorted(FIXTURES.glob("*.safetensors"))


@pytest.mark.parametrize("path", _fixtures(), ids=lambda p: p.stem)
def test_parity_with_reference(path):
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    desc = archs.load_model(sd)  # strict: BN running stats and num_batches_tracked included
    hp = desc.model.hyperparameters
    for key in ("embed_dims", "num_stages", "depths", "scale"):
        assert hp[key] == int(meta[key]), key
    assert int(hp["embed_dims"] * hp["mlp_ratios"]) == int(hp["embed_dims"] * float(meta["mlp_ratios"]))
    inputs = sorted(k for k in tensors if k.startswith("input."))
    assert len(inputs) >= 3
    with torch.no_grad():
        for key in inputs:
            want = tensors["output." + key.split(".", 1)[1]]
            got = desc.model(tensors[key])
            assert got.shape == want.shape
            assert (got - want).abs().max() <= 1e-4, key


def test_parity_fixtures_present():
    assert len(_fixtures()) >= 2


# ------------------------------------------------------------------------------------------------
# The published checkpoint


def test_published_eimn_a_x2_loads_strictly_and_beats_bicubic(shared_weights, set5):
    path = shared_weights / "EIMN_A_x2.pth"
    raw = torch.load(str(path), map_location="cpu", weights_only=True)
    desc = archs.load_model(path)
    assert isinstance(desc.model, EIMN) and desc.scale == 2 and "EIMN_A" in desc.tags
    assert set(desc.model.state_dict()) == set(raw) and len(raw) == 620
    assert torch.equal(desc.model.state_dict()["block7.0.norm2.running_var"], raw["block7.0.norm2.running_var"])
    assert not desc.model.training

    # Two Set5 images, centre crops of 48x48 LR pixels to keep the test quick (the full-image
    # figures come from bench/evaluate.py).
    def crop(name, lr, hr, size=48):
        top, left = (lr.shape[-2] - size) // 2, (lr.shape[-1] - size) // 2
        hr_box = (slice(None), slice(2 * top, 2 * (top + size)), slice(2 * left, 2 * (left + size)))
        return name, lr[:, top : top + size, left : left + size], hr[hr_box]

    pairs = [crop(*p) for p in set5_pairs(set5, 2) if p[0] in ("bird", "butterfly")]
    assert len(pairs) == 2
    result = evaluate_pairs(desc, pairs, 2)
    assert result["psnr"] >= result["bicubic_psnr"] + 3.0, json.dumps(result)
    assert result["ssim"] > result["bicubic_ssim"]

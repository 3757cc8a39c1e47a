"""ViT, CaiT, CrossFormer and CrossViT: sizes, parity with ViT-flax, dropout, errors, discriminators."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import archs
from archs import cait, cross_vit, crossformer, vit
from archs.blocks import pad_to_multiple
from archs.discriminator import DISCRIMINATOR_DEFAULTS, make_discriminator
from archs.errors import BadImageError, IncompatibleWeightsError

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURES = Path(__file__).parent / "fixtures" / "vit_flax"
FLAX_CONFIGS = json.loads((FIXTURES / "configs.json").read_text())
MODULES = {"ViT": vit, "CaiT": cait, "CrossViT": cross_vit, "CrossFormer": crossformer}
CLASSES = {"ViT": archs.ViT, "CaiT": archs.CaiT, "CrossViT": archs.CrossViT, "CrossFormer": archs.CrossFormer}

# Tiny configs (a few thousand parameters) with every kind of dropout switched on.
TINY = {
    "ViT": dict(
        image_size=16, patch_size=4, num_classes=4, dim=16, depth=2, heads=2, dim_head=8, mlp_dim=32,
        dropout=0.2, emb_dropout=0.2,
    ),
    "CaiT": dict(
        image_size=16, patch_size=4, num_classes=4, dim=16, depth=2, cls_depth=1, heads=2, dim_head=8, mlp_dim=32,
        dropout=0.2, emb_dropout=0.2, layer_dropout=0.3,
    ),
    "CrossFormer": dict(
        dim=16, depth=1, global_window_size=2, local_window_size=2,
        cross_embed_kernel_sizes=((4, 2), (2,), (3, 1), (1,)), cross_embed_strides=(2, 2, 1, 1),
        num_classes=4, attn_dropout=0.2, ff_dropout=0.2, dim_head=8,
    ),
    "CrossViT": dict(
        image_size=16, num_classes=4, sm_dim=8, lg_dim=12, sm_patch_size=4, sm_enc_depth=1, sm_enc_heads=2,
        sm_enc_mlp_dim=16, sm_enc_dim_head=4, lg_patch_size=8, lg_enc_depth=1, lg_enc_heads=2, lg_enc_mlp_dim=16,
        lg_enc_dim_head=4, cross_attn_depth=1, cross_attn_heads=2, cross_attn_dim_head=4, depth=1,
        dropout=0.2, emb_dropout=0.2,
    ),
}
NO_DROPOUT = {"dropout": 0.0, "emb_dropout": 0.0, "layer_dropout": 0.0, "attn_dropout": 0.0, "ff_dropout": 0.0}

# The configs of the ViT-flax README and the flax parameter counts of those configs.
README_CONFIGS = {
    "ViT": (
        dict(image_size=256, patch_size=32, num_classes=1000, dim=1024, depth=6, heads=16, mlp_dim=2048,
             dropout=0.1, emb_dropout=0.1),
        54_622_184,
    ),
    "CaiT": (
        dict(image_size=256, patch_size=32, num_classes=1000, dim=1024, depth=12, cls_depth=2, heads=16,
             mlp_dim=2048, dropout=0.1, emb_dropout=0.1, layer_dropout=0.0),
        121_773_032,
    ),
    "CrossFormer": (
        dict(num_classes=1000, dim=(64, 128, 256, 512), depth=(2, 2, 8, 2), global_window_size=(8, 4, 2, 1),
             local_window_size=7),
        28_775_556,
    ),
    "CrossViT": (
        dict(image_size=256, num_classes=1000, depth=4, sm_dim=192, sm_patch_size=16, sm_enc_depth=2,
             sm_enc_heads=8, sm_enc_mlp_dim=2048, lg_dim=384, lg_patch_size=64, lg_enc_depth=3, lg_enc_heads=8,
             lg_enc_mlp_dim=2048, cross_attn_depth=2, cross_attn_heads=8, dropout=0.1, emb_dropout=0.1),
        55_133_136,
    ),
}


def tiny(name: str, **changes) -> nn.Module:
    """The tiny ``name`` model; ``changes`` for arguments it does not have are ignored (e.g. NO_DROPOUT)."""
    return CLASSES[name](**{**TINY[name], **{k: v for k, v in changes.items() if k in TINY[name]}})


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def nested(flat: dict[str, np.ndarray]) -> dict:
    """The flax parameter tree (nested dicts) back from '/'-joined paths."""
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


# sizes of the ViT-flax README configs


@pytest.mark.parametrize("name", list(README_CONFIGS))
def test_parameter_count_equals_flax(name):
    config, expected = README_CONFIGS[name]
    with torch.device("meta"):
        model = CLASSES[name](**config)
    assert n_params(model) == expected


def test_cait_layer_dropout_keeps_every_layer():
    # flax deletes layers at construction when layer_dropout > 0; here they stay and drop per sample in training
    config, expected = README_CONFIGS["CaiT"]
    with torch.device("meta"):
        model = archs.CaiT(**{**config, "layer_dropout": 0.05})
    assert n_params(model) == expected
    assert len(model.patch_transformer.layers) == 12 and len(model.cls_transformer.layers) == 2


def test_cait_layer_scale_schedule():
    with torch.device("meta"):
        model = archs.CaiT(image_size=8, patch_size=4, num_classes=2, dim=8, depth=26, cls_depth=2, heads=2, dim_head=4, mlp_dim=8)
    patch = [(attn.scale, ff.scale) for attn, ff in model.patch_transformer.layers]
    assert patch == [(0.1, 0.1)] * 18 + [(1e-5, 1e-5)] * 6 + [(1e-6, 1e-6)] * 2
    assert [(a.scale, f.scale) for a, f in model.cls_transformer.layers] == [(0.1, 0.1)] * 2  # restarts
    assert not any("scale" in k for k in model.state_dict())  # a constant, as in flax, not a parameter


# same function as ViT-flax


@pytest.mark.parametrize("fixture", list(FLAX_CONFIGS))
def test_flax_parity(fixture):
    entry = FLAX_CONFIGS[fixture]
    model = CLASSES[entry["model"]](**entry["config"], **entry.get("torch_only", {})).eval()
    with np.load(FIXTURES / f"{fixture}.params.npz") as f:
        tree = nested(dict(f))
    model.load_state_dict(MODULES[entry["model"]].from_flax(tree), strict=True)
    with np.load(FIXTURES / f"{fixture}.io.npz") as f:
        image_nhwc, expected = f["input"], f["logits"]
    with torch.no_grad():
        logits = model(torch.from_numpy(image_nhwc).permute(0, 3, 1, 2))
    assert logits.shape == expected.shape
    np.testing.assert_allclose(logits.numpy(), expected, atol=1e-4, rtol=0)


def test_from_flax_accepts_variables_wrapper_and_rejects_foreign_keys():
    with np.load(FIXTURES / "vit_cls.params.npz") as f:
        tree = nested(dict(f))
    plain = vit.from_flax(tree)
    wrapped = vit.from_flax({"params": tree})
    assert plain.keys() == wrapped.keys()
    assert all(torch.equal(plain[k], wrapped[k]) for k in plain)
    # Dense kernels (in, out) become Linear weights (out, in)
    np.testing.assert_array_equal(plain["to_patch_embedding.1.weight"].numpy(), tree["Dense_0"]["kernel"].T)
    with pytest.raises(IncompatibleWeightsError, match="Decoder_0/Dense_0/kernel"):
        vit.from_flax({**tree, "Decoder_0": {"Dense_0": {"kernel": np.zeros((2, 2), np.float32)}}})


def test_cait_from_flax_names_layers_deleted_by_flax_layer_dropout():
    with np.load(FIXTURES / "cait.params.npz") as f:
        tree = nested(dict(f))
    del tree["Transformer_0"]["Attention_1"], tree["Transformer_0"]["FeedForward_1"]
    with pytest.raises(IncompatibleWeightsError, match=r"Transformer_0 has no parameters for layers \[1\]"):
        cait.from_flax(tree)


# shapes, batches, gradients


@pytest.mark.parametrize("name", list(TINY))
def test_logits_shape_and_batch_independence(name):
    model = tiny(name).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        batched = model(x)
        single = torch.cat([model(x[i : i + 1]) for i in range(3)])
    assert batched.shape == (3, 4) and single.shape == (3, 4)
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


# The last Linear of CrossFormer's position-bias MLP adds one constant to every score, which the
# softmax cancels (in flax too): its bias never gets a gradient.
DEAD_PARAMETERS = {"CrossFormer": "dpb.layers.9.bias"}


@pytest.mark.parametrize("name", list(TINY))
def test_gradients_reach_every_parameter(name):
    model = tiny(name).eval()
    model(torch.randn(2, 3, 16, 16)).square().sum().backward()
    dead = DEAD_PARAMETERS.get(name)
    for key, p in model.named_parameters():
        if dead and key.endswith(dead):
            assert p.grad is None or p.grad.abs().max() < 1e-6, key
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {key}"


# dropout: train mode only


@pytest.mark.parametrize("name", list(TINY))
def test_dropout_acts_in_train_mode_only(name):
    model = tiny(name)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        model.eval()
        a, b = model(x), model(x)
        model.train()
        c, d = model(x), model(x)
    assert torch.equal(a, b), "eval mode must be deterministic"
    assert not torch.allclose(c, d), "train mode with dropout > 0 must be random"

    # with every dropout at 0, train mode computes exactly the eval function
    plain = tiny(name, **NO_DROPOUT)
    plain.load_state_dict(model.state_dict())
    plain.train()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), a, atol=1e-6, rtol=0)


def test_cait_stochastic_depth_drops_whole_layers_per_sample():
    p = 0.5
    block = cait.Transformer(dim=8, depth=1, heads=2, dim_head=4, mlp_dim=16, dropout=0.0, layer_dropout=p).train()
    x = torch.randn(1, 5, 8).repeat(32, 1, 1)  # 32 copies of one sample
    with torch.no_grad():
        y = block(x)
        attn, ff = block.layers[0]
        x1 = x[:1] + attn(x[:1]) / (1 - p)  # kept: both branches, scaled by 1 / (1 - p)
        kept_out = x1 + ff(x1) / (1 - p)
    dropped = (y == x).all(dim=2).all(dim=1)
    assert 0 < int(dropped.sum()) < 32, "some samples (not all, not none) must skip the layer"
    torch.testing.assert_close(y[~dropped], kept_out.expand(int((~dropped).sum()), -1, -1), atol=1e-6, rtol=0)

    block.eval()
    with torch.no_grad():
        y_eval = block(x)
        x1 = x + attn(x)
        torch.testing.assert_close(y_eval, x1 + ff(x1), atol=1e-6, rtol=0)


def test_cait_layer_dropout_does_not_touch_construction():
    model = tiny("CaiT", layer_dropout=0.9)
    assert len(model.patch_transformer.layers) == TINY["CaiT"]["depth"]
    assert len(model.cls_transformer.layers) == TINY["CaiT"]["cls_depth"]


# clear errors


@pytest.mark.parametrize(
    ("name", "shape", "match"),
    [
        ("ViT", (1, 3, 18, 16), "multiple of 4"),
        ("ViT", (1, 1, 16, 16), "3-channel"),
        ("ViT", (3, 16, 16), r"\[B, C, H, W\]"),
        ("CaiT", (1, 3, 16, 14), "multiple of 4"),
        ("CaiT", (1, 4, 16, 16), "channels=4"),
        ("CrossViT", (1, 3, 12, 12), "multiple of 8"),
        ("CrossViT", (1, 2, 16, 16), "3-channel"),
        ("CrossFormer", (1, 3, 12, 12), "multiples of 8"),
        ("CrossFormer", (1, 1, 16, 16), "3-channel"),
    ],
)
def test_bad_images_raise_clear_errors(name, shape, match):
    model = tiny(name).eval()
    with pytest.raises(BadImageError, match=match):
        model(torch.rand(*shape))


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: archs.ViT(image_size=18, patch_size=4, num_classes=2, dim=8, depth=1, heads=1, mlp_dim=8), "divisible"),
        (lambda: archs.ViT(image_size=16, patch_size=4, num_classes=2, dim=8, depth=1, heads=1, mlp_dim=8, pool="max"), "pool"),
        (lambda: tiny("CaiT", layer_dropout=1.0), "layer_dropout"),
        (lambda: archs.CrossViT(image_size=20, num_classes=2, sm_dim=8, lg_dim=8, sm_patch_size=4, lg_patch_size=8), "lg_patch_size"),
        (lambda: archs.CrossFormer(dim=16, num_classes=2), "dim_head"),
        (lambda: archs.CrossFormer(dim=(32, 32, 32), num_classes=2), "four"),
        (lambda: make_discriminator("resnet"), "unknown discriminator kind"),
        (lambda: make_discriminator("vit", 64, num_classes=10), "num_classes"),
    ],
)
def test_bad_configs_raise_value_errors(build, match):
    with pytest.raises(ValueError, match=match):
        build()


# other image sizes


def test_vit_position_embeddings_are_exact_at_native_size_and_bicubic_elsewhere():
    model = tiny("ViT").eval()
    assert torch.equal(model.pos_embedding_for(model.grid), model.pos_embedding)
    with torch.no_grad():
        model.pos_embedding[:, 1:] = torch.arange(16.0)  # every patch position the same vector
        resized = model.pos_embedding_for((3, 7))
    assert resized.shape == (1, 1 + 21, 16)
    torch.testing.assert_close(resized[0, 0], model.pos_embedding[0, 0])  # cls position untouched
    torch.testing.assert_close(resized[0, 1:], torch.arange(16.0).expand(21, -1), atol=1e-5, rtol=1e-6)
    assert model(torch.rand(2, 3, 12, 28)).shape == (2, 4)


@pytest.mark.parametrize("name", ["ViT", "CaiT", "CrossViT", "CrossFormer"])
def test_models_take_other_sizes(name):
    model = tiny(name).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 24)).shape == (2, 4)


# discriminators

TINY_DISCRIMINATORS = {
    "vit": dict(patch_size=8, dim=16, depth=1, heads=2, dim_head=8, mlp_dim=32),
    "cait": dict(patch_size=8, dim=16, depth=1, cls_depth=1, heads=2, dim_head=8, mlp_dim=32),
    "crossformer": dict(dim=(16, 16, 16, 16), depth=(1, 1, 0, 0), dim_head=8),
    "crossvit": dict(
        sm_dim=8, sm_enc_heads=2, sm_enc_mlp_dim=16, sm_enc_dim_head=4, lg_dim=8, lg_enc_depth=1, lg_enc_heads=2,
        lg_enc_mlp_dim=16, lg_enc_dim_head=4, cross_attn_heads=2, cross_attn_dim_head=4, depth=1,
    ),
}


@pytest.mark.parametrize("kind", list(TINY_DISCRIMINATORS))
def test_discriminator_gives_one_logit_per_image_at_any_size(kind):
    disc = make_discriminator(kind, 32, **TINY_DISCRIMINATORS[kind]).eval()
    m = disc.size_multiple
    x = torch.rand(3, 3, 32, 32)  # 0..1
    with torch.no_grad():
        out = disc(x)
        assert out.shape == (3,)
        # normalised to -1..1 inside, one logit out
        torch.testing.assert_close(out, disc.backbone(x * 2 - 1)[:, 0], atol=1e-6, rtol=0)
        for size in [(64, 48), (2 * m + 3, 3 * m - 5)]:  # another multiple; a size that needs padding
            img = torch.rand(1, 3, *size)
            logit = disc(img)
            assert logit.shape == (1,) and torch.isfinite(logit).all()
            padded = pad_to_multiple(img, m, mode="reflect")
            torch.testing.assert_close(logit, disc.backbone(padded * 2 - 1)[:, 0], atol=1e-6, rtol=0)
    with pytest.raises(BadImageError, match="discriminator"):
        disc(torch.rand(1, 4, 32, 32))


@pytest.mark.parametrize("kind", list(TINY_DISCRIMINATORS))
def test_discriminator_with_spectral_norm(kind):
    disc = make_discriminator(kind, 32, spectral_norm=True, **TINY_DISCRIMINATORS[kind]).train()
    layers = [m for m in disc.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert layers and all(parametrize.is_parametrized(m, "weight") for m in layers)
    x = torch.rand(2, 3, 40, 40)  # not the native size
    for _ in range(8):  # power iterations run in train mode
        out = disc(x)
    out.sum().backward()
    assert out.shape == (2,)
    for m in layers:
        assert m.parametrizations.weight.original.grad is not None
        sigma = torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2)
        assert abs(float(sigma) - 1.0) < 0.05, f"{m}: largest singular value {float(sigma):.3f}"


@pytest.mark.parametrize("kind", list(DISCRIMINATOR_DEFAULTS))
def test_default_discriminators_build_for_training_patch_sizes(kind):
    with torch.device("meta"):
        for size in (64, 96, 128):
            disc = make_discriminator(kind, size)
            assert size % disc.size_multiple == 0, "default patch sizes need no padding"
            assert 1e5 < n_params(disc) < 5e6


def test_vit_family_is_not_in_the_upscaler_registry():
    from archs.registry import FAMILY_MODULES

    ids = {support.architecture.id for support in archs.REGISTRY.architectures("detection")}
    assert not {"ViT", "CaiT", "CrossFormer", "CrossViT"} & ids

    assert not {"vit", "cait", "crossformer", "cross_vit", "discriminator"} & set(FAMILY_MODULES)

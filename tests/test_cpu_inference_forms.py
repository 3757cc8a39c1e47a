"""EIMN's and LAMNet's CPU inference forms (no autograd, float32): oneDNN 1x1 convs on channels-last
tokens, folded BatchNorm / norm / scale weights, banded and sub-grid convs (``archs/onednn.py``).

They must equal the reference form (the same model with autograd on, which runs the published graph)
for every configuration, under ``no_grad`` and ``inference_mode``, with weights made under
``inference_mode`` (as ComfyUI loads them), after weight changes; and leave training, gradients and
state dicts as they were.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import archs
from archs import eimn as eimn_module
from archs import lamnet as lamnet_module
from archs import onednn
from archs.eimn import EIMN
from archs.lamnet import LAMNet
from testutil import perturbed

pytestmark = [
    pytest.mark.skipif(not onednn.available(torch.zeros(1)), reason="oneDNN is not available in this torch"),
    pytest.mark.usefixtures("one_thread"),
]


def eimn(seed: int = 1, **kw) -> EIMN:
    """A tiny EIMN with trained-looking BatchNorm statistics and layer scales, in eval mode."""
    model = perturbed(EIMN(**kw), seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if "layer_scale" in name:
                t.copy_(0.5 * torch.randn(t.shape, generator=g))
            elif name.endswith("running_mean"):
                t.copy_(0.3 * torch.randn(t.shape, generator=g))
            elif name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
    return model.eval()


def lamnet(seed: int = 1, **kw) -> LAMNet:
    return perturbed(LAMNet(**kw), seed).eval()


EIMN_CONFIGS = {
    "d16-s2-x2": (dict(embed_dims=16, num_stages=2, scale=2), (2, 3, 13, 17)),
    "d24-s1-b2-x3": (dict(embed_dims=24, num_stages=1, depths=2, scale=3), (1, 3, 7, 5)),
    "d8-s2-x4-1px": (dict(embed_dims=8, num_stages=2, scale=4), (1, 3, 1, 1)),
    "d16-wide-rows": (dict(embed_dims=16, num_stages=1, scale=2), (1, 3, 9, 70)),
}
LAMNET_CONFIGS = {
    "d16-g2-x2": (dict(num_blocks=1, num_groups=2, dim=16, kernel_size=5, kernel_loc=(2, 3), kernel_stride=(1, 2),
                       num_head=2, upscale=2), (2, 3, 13, 17)),
    "release-map-x4": (dict(num_blocks=2, num_groups=1, dim=16, num_head=2, upscale=4), (1, 3, 20, 24)),
    "d16-x3-1px": (dict(num_blocks=1, num_groups=1, dim=16, kernel_size=3, kernel_loc=(2,), kernel_stride=(1,),
                        num_head=2, upscale=3), (1, 3, 1, 1)),
}


def _check_forms(model, x):
    reference = model(x).detach()  # autograd on: the published graph
    with torch.no_grad():
        got = model(x)
    with torch.inference_mode():
        got_inference = model(x)
    assert (got - reference).abs().max() <= 1e-5
    assert torch.equal(got, got_inference)
    return reference


@pytest.mark.parametrize("name", list(EIMN_CONFIGS))
def test_eimn_inference_form_equals_the_reference_form(name, monkeypatch):
    kw, shape = EIMN_CONFIGS[name]
    model = eimn(**kw)
    x = torch.rand(*shape)
    if name == "d16-wide-rows":  # bands of one row (plus the rows SAL reads) instead of the whole map
        monkeypatch.setattr(eimn_module, "FFN_CHUNK", 1)
    _check_forms(model, x)


@pytest.mark.parametrize("name", list(LAMNET_CONFIGS))
@pytest.mark.parametrize("band", [None, 1, 40])
def test_lamnet_inference_form_equals_the_reference_form(name, band, monkeypatch):
    kw, shape = LAMNET_CONFIGS[name]
    if band is not None:  # DGFN in bands of one row / a few rows (plus the rows its conv reads)
        monkeypatch.setattr(lamnet_module, "FFN_CHUNK", band)
    _check_forms(lamnet(**kw), torch.rand(*shape))


def test_inference_forms_are_taken_and_fall_back_without_onednn(monkeypatch):
    """The fast forms run the oneDNN ops; with oneDNN off the models give the same numbers."""
    model_e, model_l = eimn(embed_dims=16, num_stages=1), lamnet(**LAMNET_CONFIGS["d16-g2-x2"][0])
    x = torch.rand(1, 3, 12, 10)
    calls = []
    real = onednn._linear_op()
    monkeypatch.setattr(onednn, "_linear_op", lambda: (calls.append(1), real)[1])
    with torch.no_grad():
        fast_e, fast_l = model_e(x), model_l(x)
    assert calls, "the inference forms did not reach oneDNN"
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False):
        assert not onednn.available(x)
        slow_e, slow_l = model_e(x), model_l(x)
    assert (fast_e - slow_e).abs().max() <= 1e-5 and (fast_l - slow_l).abs().max() <= 1e-5
    calls.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # the engine's bf16: the reference graph
        auto_e, auto_l = model_e(x), model_l(x)
    assert not calls and auto_e.dtype == torch.bfloat16
    with torch.no_grad():  # so do other dtypes
        half = model_e.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16 and (half.float() - fast_e).abs().max() < 0.1


def test_eimn_training_mode_and_gradients_are_untouched():
    """Train mode uses batch statistics (no folding, even under no_grad); with autograd on, gradients
    reach every branch; fine-tuning with frozen BatchNorm statistics (eval) keeps its graph."""
    model = eimn(embed_dims=16, num_stages=2)
    keys = set(model.state_dict())
    x = torch.rand(2, 3, 10, 9)
    model.train()
    with torch.no_grad():
        train_no_grad = model(x)
    train = model(x)
    assert (train_no_grad - train.detach()).abs().max() <= 1e-5
    model.eval()
    with torch.no_grad():
        eval_out = model(x)
    assert (train_no_grad - eval_out).abs().max() > 1e-3, "train mode must not use the running statistics"
    model.eval()  # frozen statistics, as training/finetune.py's --norm-stats frozen
    model.zero_grad()
    model(x).abs().mean().backward()
    block = model.block1[0]
    for p in (block.layer_scale_1, block.layer_scale_2, block.norm1.weight, block.attn.spatial_2.weight,
              block.mlp.SAL.weight, block.mlp.DFFM.spatial_expand.weight, model.norm2.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert set(model.state_dict()) == keys


def test_lamnet_gradients_are_untouched():
    model = lamnet(**LAMNET_CONFIGS["d16-g2-x2"][0])
    keys = set(model.state_dict())
    x = torch.rand(1, 3, 9, 8)
    with torch.no_grad():
        model(x)  # fills the caches
    model.train()  # LAMNet has no mode-dependent layer: train mode without autograd takes the inference form
    with torch.no_grad():
        fast = model(x)
    out = model(x)
    assert (fast - out.detach()).abs().max() <= 1e-5
    out.square().mean().backward()
    mixer = model.deep_feature_extraction[0].mixers[0]
    for p in (mixer.alpha, mixer.norm.alpha, mixer.fn.proj_in.weight, mixer.fn.h_kernel[0].weight, model.alpha):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert set(model.state_dict()) == keys


@pytest.mark.parametrize("family", ["eimn", "lamnet"])
def test_folded_weights_follow_weight_changes(family):
    make = (lambda seed: eimn(seed, embed_dims=16, num_stages=1)) if family == "eimn" else (
        lambda seed: lamnet(seed, **LAMNET_CONFIGS["d16-g2-x2"][0]))
    model, other = make(1), make(2)
    x = torch.rand(1, 3, 11, 12)
    with torch.inference_mode():
        model(x)  # fills the caches
    model.load_state_dict(other.state_dict())
    with torch.no_grad():  # in-place changes after loading, too
        for m in (model, other):
            if family == "eimn":
                m.block1[0].norm2.running_var.mul_(2)
                m.block1[0].layer_scale_1.mul_(3)
            else:
                m.deep_feature_extraction[0].mixers[1].norm.beta.add_(0.3)
                m.deep_feature_extraction[0].mixers[0].alpha.mul_(3)
        got = model(x)
    assert (got - other(x).detach()).abs().max() <= 1e-5


@pytest.mark.parametrize("family", ["eimn", "lamnet"])
def test_model_loaded_under_inference_mode_runs_and_follows_changes(family, tmp_path):
    """ComfyUI loads and runs models under torch.inference_mode(): the weights are inference tensors,
    which carry no version counter, so folded weights are made afresh on every call."""
    from safetensors.torch import save_file

    if family == "eimn":
        reference, changed = eimn(1, embed_dims=16, num_stages=2), eimn(2, embed_dims=16, num_stages=2)
    else:
        kw = LAMNET_CONFIGS["release-map-x4"][0]
        reference, changed = lamnet(1, **kw), lamnet(2, **kw)
    path = tmp_path / f"{family}.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    x = torch.rand(1, 3, 14, 13)
    with torch.no_grad():
        want, want_changed = reference(x), changed(x)
    with torch.inference_mode():
        model = archs.load_model(path).model.eval()
        assert next(model.parameters()).is_inference()
        got = model(x)
        model.load_state_dict(changed.state_dict())  # in place, without a version bump
        again = model(x)
    assert (got - want).abs().max() <= 1e-5
    assert (again - want_changed).abs().max() <= 1e-5


@pytest.mark.parametrize("dilation, size", [(2, (1, 5, 11, 13)), (3, (2, 4, 9, 9)), (3, (1, 3, 2, 1)), (1, (1, 6, 5, 7))])
def test_depthwise_conv_matches_conv2d(dilation, size):
    c = size[1]
    for k in (5, 7):
        conv = torch.nn.Conv2d(c, c, k, padding=dilation * (k // 2), dilation=dilation, groups=c)
        x = torch.randn(*size).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            got = onednn.depthwise_conv(x, conv)
            assert got.is_contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(got, conv(x), rtol=1e-5, atol=1e-5)


def test_linear_helpers_match_plain_ops():
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(s, generator=g) for s in ((37, 12), (20, 12), (20,)))
    residual = torch.randn(37, 20, generator=g)
    for act, fn in (("none", lambda t: t), ("gelu", F.gelu), ("swish", F.silu), ("relu", F.relu)):
        torch.testing.assert_close(onednn.linear(x, w, b, act), fn(F.linear(x, w, b)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(onednn.linear_add(x, residual, w, b), residual + F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    gate, value = (torch.randn(1, 6, 4, 5, generator=g).contiguous(memory_format=torch.channels_last) for _ in range(2))
    wg, wv = torch.randn(6, 1, 3, 3, generator=g), torch.randn(6, 1, 3, 3, generator=g)
    want = F.gelu(F.conv2d(gate, wg, b[:6], padding=1, groups=6)) * F.conv2d(value, wv, None, padding=1, groups=6)
    torch.testing.assert_close(onednn.depthwise_gated(gate, value, wg, b[:6], wv, None, 1), want, rtol=1e-5, atol=1e-5)


def test_state_dict_keys_are_unchanged_by_inference():
    for model in (eimn(embed_dims=16, num_stages=1), lamnet(**LAMNET_CONFIGS["d16-g2-x2"][0])):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.inference_mode():
            model(torch.rand(1, 3, 8, 8))
        after = model.state_dict()
        assert list(after) == list(before)
        assert all(torch.equal(before[k], after[k]) for k in before)
        copy.deepcopy(model)  # the caches do not get in the way of copies


@pytest.mark.parametrize("family", ["eimn", "lamnet"])
def test_channels_last_models_and_inputs(family):
    """Weights and inputs in channels-last memory (what a caller may hand over) give the same numbers."""
    model = eimn(embed_dims=16, num_stages=2) if family == "eimn" else lamnet(**LAMNET_CONFIGS["d16-g2-x2"][0])
    x = torch.rand(1, 3, 13, 11)
    reference = model(x).detach()
    model = model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        got = model(x.contiguous(memory_format=torch.channels_last))
    assert (got - reference).abs().max() <= 1e-5


@pytest.mark.parametrize("b, h, w, pixels", [(2, 13, 5, 12), (1, 30, 70, 1), (1, 3, 4, 1000), (3, 1, 1, 1)])
def test_row_bands_cover_every_pixel_once_with_their_halo(b, h, w, pixels):
    seen = torch.zeros(b * h * w, dtype=torch.int64)
    for rows, inner, start in onednn.row_bands(b, h, w, pixels, 1):
        n = inner.stop - inner.start
        assert rows.start + inner.start == start and inner.stop <= rows.stop - rows.start
        assert (rows.stop - rows.start) // w <= max(8, pixels // w) + 2  # the band and at most one row each side
        assert rows.start // (h * w) == (rows.stop - 1) // (h * w)  # never across two images
        seen[start : start + n] += 1
    assert torch.equal(seen, torch.ones_like(seen))

"""The inference forms of LMLT and the DaViT-style transformer (eval + no autograd).

Each must equal the reference form (eval with autograd on, which runs the published graph) on every
variant, follow weight changes (weights made under ``torch.inference_mode()`` too, as ComfyUI loads
them), leave state dicts alone, and leave training exactly as it was.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from testutil import perturbed

import archs
from archs import blocks
from archs.blocks import fast_linear
from archs.lmlt import LMLT
from archs.transformer_sr import SR, TransformerSR


def _sharpened(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Perturbed weights, with q/k scaled up so the attention is far from uniform."""
    perturbed(model, seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("project_q", "project_k", ".qkv.")):
                p.mul_(4.0)
    return model.eval()


LMLT_VARIANTS = {
    "dim12-x2": dict(dim=12, n_blocks=1, upscaling_factor=2),
    "dim16-2blocks-ffn1.5-x1-w4": dict(dim=16, n_blocks=2, ffn_scale=1.5, upscaling_factor=1, window_size=4),
    "dim8-odd-window-x3-4ch": dict(dim=8, n_blocks=1, upscaling_factor=3, window_size=3, in_chans=4),
}

DAVIT_VARIANTS = {
    "sr-x2-w4-h4": (SR, dict(factor=2, num_blocks=1, dim=32, window_size=4, num_heads=4)),
    "sr-x3-w2-h3": (SR, dict(factor=3, num_blocks=2, dim=24, window_size=2, num_heads=3)),
    "sr-x1-w3-h1-1ch": (SR, dict(factor=1, num_blocks=1, dim=8, window_size=3, num_heads=1, in_channels=1,
                                 out_channels=1)),
    "old-residual-groups": (TransformerSR, dict(factor=4, residual_groups=[1, 2], num_blocks=3, dim=16,
                                                window_size=2, num_heads=2)),
}


def _lmlt(name: str, seed: int = 1) -> LMLT:
    return perturbed(LMLT(**LMLT_VARIANTS[name]), seed).eval()


def _davit(name: str, seed: int = 1) -> torch.nn.Module:
    cls, kwargs = DAVIT_VARIANTS[name]
    return _sharpened(cls(**kwargs), seed)


def _forms_agree(model: torch.nn.Module, x: torch.Tensor, tolerance: float) -> None:
    reference = model(x).detach()  # eval with autograd on: the published graph
    with torch.no_grad():
        got = model(x)
    with torch.inference_mode():
        got_inference = model(x)
    assert got.shape == reference.shape
    assert (got - reference).abs().max() <= tolerance * max(1.0, reference.abs().max().item())
    assert torch.equal(got, got_inference)


@pytest.mark.parametrize("name", list(LMLT_VARIANTS))
def test_lmlt_inference_form_equals_the_reference_form(name):
    model = _lmlt(name)
    channels = model.to_feat.in_channels
    _forms_agree(model, torch.rand(2, channels, 21, 30), 1e-5)


@pytest.mark.parametrize("name", list(DAVIT_VARIANTS))
def test_davit_inference_form_equals_the_reference_form(name):
    model = _davit(name)
    channels = model.hyperparameters["in_channels"]
    _forms_agree(model, torch.rand(2, channels, 7, 12), 1e-5)


def test_lmlt_inference_form_at_a_published_size():
    """dim 60 at 64x64: the level widths (15) and token counts of LMLT-Base, where fast_linear uses oneDNN."""
    model = perturbed(LMLT(dim=60, n_blocks=1, upscaling_factor=2)).eval()
    _forms_agree(model, torch.rand(1, 3, 64, 64), 1e-5)


def test_davit_inference_form_at_a_published_width():
    model = _sharpened(SR(factor=2, num_blocks=1, dim=256, window_size=4, num_heads=16))
    _forms_agree(model, torch.rand(1, 3, 32, 32), 1e-5)


@pytest.mark.parametrize("family", ["lmlt", "davit"])
def test_inference_form_follows_weight_changes(family):
    make = (lambda seed: _lmlt("dim12-x2", seed)) if family == "lmlt" else (lambda seed: _davit("sr-x2-w4-h4", seed))
    model, other = make(1), make(2)
    x = torch.rand(1, 3, 12, 16)
    with torch.inference_mode():
        model(x)  # fills any cache
    model.load_state_dict(other.state_dict())
    with torch.no_grad():
        for m in (model, other):  # an in-place change after loading, too
            next(p for n, p in m.named_parameters() if n.endswith("bias")).mul_(3)
        got = model(x)
    assert (got - other(x).detach()).abs().max() <= 1e-5


@pytest.mark.parametrize("family", ["lmlt", "davit"])
def test_model_loaded_under_inference_mode_runs_and_follows_changes(tmp_path, family):
    """ComfyUI runs its loader under torch.inference_mode(): the weights are then inference tensors."""
    make = (lambda seed: _lmlt("dim12-x2", seed)) if family == "lmlt" else (lambda seed: _davit("sr-x2-w4-h4", seed))
    reference = make(1)
    path = tmp_path / ("lmlt.safetensors" if family == "lmlt" else "davit_w4_h4.safetensors")  # the names set w, h
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    x = torch.rand(1, 3, 16, 12)
    changed = make(2)
    with torch.no_grad():
        want, want_changed = reference(x), changed(x)
    with torch.inference_mode():
        model = archs.load_model(path).model.eval()
        assert next(model.parameters()).is_inference()
        assert (model(x) - want).abs().max() <= 1e-5
        model.load_state_dict(changed.state_dict())  # in place, without a version bump
        again = model(x)
    assert (again - want_changed).abs().max() <= 1e-5


@pytest.mark.parametrize("family", ["lmlt", "davit"])
def test_state_dict_and_training_are_untouched(family):
    model = _lmlt("dim12-x2") if family == "lmlt" else _davit("sr-x2-w4-h4")
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(2, 3, 8, 16)
    with torch.inference_mode():
        model(x)
    after = model.state_dict()
    assert after.keys() == keys.keys() and all(torch.equal(after[k], v) for k, v in keys.items())
    eval_reference = model(x).detach()
    model.train()  # no dropout configured: training mode computes the published graph, bit for bit
    with torch.no_grad():
        assert torch.equal(model(x), eval_reference)
    model(x).pow(2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# --------------------------------------------------------------------------------------------------
# fast_linear


@pytest.mark.parametrize("rows", [3, 4096])  # below and above the size where oneDNN takes over
@pytest.mark.parametrize("gelu", [False, True])
def test_fast_linear_equals_linear(rows, gelu):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(2, rows, 48, generator=g)
    weight, bias = torch.randn(40, 48, generator=g) / 7, torch.randn(40, generator=g)
    want = F.linear(x, weight, bias)
    want = F.gelu(want) if gelu else want
    with torch.inference_mode():
        got = fast_linear(x, weight, bias, gelu=gelu)
        sliced = fast_linear(x, torch.randn(40, 96, generator=g)[:, ::2], None)  # a strided weight works too
    assert got.shape == want.shape and (got - want).abs().max() <= 1e-5
    assert sliced.shape == want.shape


def test_fast_linear_falls_back_to_f_linear(monkeypatch):
    monkeypatch.setattr(blocks, "_ONEDNN_LINEAR", None)
    x, weight = torch.randn(4096, 32), torch.randn(64, 32)
    assert torch.equal(fast_linear(x, weight), F.linear(x, weight))
    assert torch.equal(fast_linear(x, weight, gelu=True), F.gelu(F.linear(x, weight)))
    half = fast_linear(x.bfloat16(), weight.bfloat16())  # other dtypes always take F.linear
    assert half.dtype == torch.bfloat16


_ACTS = {"none": lambda t: t, "gelu": F.gelu, "relu": torch.relu, "sigmoid": torch.sigmoid}


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("act", sorted(_ACTS))
def test_fast_linear_activations(monkeypatch, act, onednn):
    """Each fused activation (FlexNet's key ReLU and receptance sigmoid) equals F.linear then the activation."""
    if not onednn:
        monkeypatch.setattr(blocks, "_ONEDNN_LINEAR", None)
    g = torch.Generator().manual_seed(5)
    x, weight = torch.randn(4096, 32, generator=g), torch.randn(64, 32, generator=g) / 5
    with torch.inference_mode():
        got = fast_linear(x, weight, None, act=act)
    assert (got - _ACTS[act](F.linear(x, weight))).abs().max() <= 1e-5


def test_fast_linear_rejects_an_unknown_activation():
    with pytest.raises(ValueError, match="tanh"):
        fast_linear(torch.randn(4, 8), torch.randn(3, 8), act="tanh")

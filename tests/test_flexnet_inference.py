"""FlexNet's inference form (eval + no autograd): folded weights, one token layout, in-place chains.

It must equal the reference form (eval with autograd on, which runs the published graph) for every
variant, follow any weight change, and leave training, state dicts and the Fuse node alone.
"""

from __future__ import annotations

import copy

import pytest
import torch

import archs
from archs.flexnet import FlexNet
from testutil import perturbed as _perturbed


def perturbed(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    return _perturbed(model, seed).eval()



VARIANTS = {
    "linear": dict(dim=16, num_blocks=(2, 1)),
    "window4-channel-norm": dict(dim=8, num_blocks=(1, 1), window_size=4, channel_norm=True, hidden_rate=3),
    "flash": dict(dim=8, num_blocks=(1,), flash_attn=True),
    "meta-dys": dict(dim=4, num_blocks=(1, 1, 1, 1), pipeline_type="meta", upsampler="dys", window_size=4),
    "n+c-x3": dict(dim=8, num_blocks=(1,), upsampler="n+c", scale=3),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_inference_form_equals_the_reference_form(name):
    model = perturbed(FlexNet(**VARIANTS[name]))
    x = torch.rand(2, 3, 21, 18)
    reference = model(x).detach()  # eval, autograd on: the published graph
    with torch.no_grad():
        got = model(x)
    with torch.inference_mode():
        got_inference = model(x)
    assert (got - reference).abs().max() <= 1e-5
    assert torch.equal(got, got_inference)


@pytest.mark.parametrize("chunk", [1, 40, 100])
@pytest.mark.parametrize("name", ["linear", "window4-channel-norm", "meta-dys"])
def test_slices_give_the_reference_numbers(monkeypatch, name, chunk):
    """Attention and ChannelMix run in slices of about FFN_CHUNK tokens (whole rows of windows): any slice
    size, down to one row of windows, gives the reference's numbers, with a batch of two."""
    from archs import flexnet

    model = perturbed(FlexNet(**VARIANTS[name]))
    x = torch.rand(2, 3, 37, 29)
    reference = model(x).detach()
    monkeypatch.setattr(flexnet, "FFN_CHUNK", chunk)
    with torch.inference_mode():
        got = model(x)
    assert (got - reference).abs().max() <= 1e-5


def test_folded_weights_follow_weight_changes():
    model = perturbed(FlexNet(dim=8, num_blocks=(1,)))
    other = perturbed(FlexNet(dim=8, num_blocks=(1,)), seed=2)
    x = torch.rand(1, 3, 16, 16)
    with torch.inference_mode():
        model(x)  # fills the caches
    model.load_state_dict(other.state_dict())
    with torch.no_grad():
        model.pipeline.att[0].t_blocks[0].gamma2.mul_(3)  # an in-place change after loading, too
        other.pipeline.att[0].t_blocks[0].gamma2.mul_(3)
        got = model(x)
    assert (got - other(x).detach()).abs().max() <= 1e-5


def test_training_state_dict_and_fuse_are_untouched():
    model = perturbed(FlexNet(dim=8, num_blocks=(1,)))
    keys = set(model.state_dict())
    x = torch.rand(1, 3, 16, 16)
    with torch.inference_mode():
        want = model(x)
    assert set(model.state_dict()) == keys
    assert not any(m.fused for m in archs.fusable_modules(model)), "inference does not flip the Fuse flag"
    fused = archs.fuse(copy.deepcopy(model))
    with torch.no_grad():
        assert (fused(x) - want).abs().max() <= 1e-5
    model.train()
    model(x).mean().backward()  # the training form: gradients reach every branch and gamma
    block = model.pipeline.att[0].t_blocks[0]
    assert block.gamma1.grad is not None and block.att.omni_shift.alpha.grad is not None


def test_model_loaded_under_inference_mode_runs_and_follows_changes(tmp_path):
    """ComfyUI runs nodes (the loader too) under torch.inference_mode(): the weights are then inference
    tensors, which carry no version counter."""
    from safetensors.torch import save_file

    reference = perturbed(FlexNet(**VARIANTS["linear"]))
    path = tmp_path / "flexnet.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    x = torch.rand(1, 3, 20, 20)
    with torch.no_grad():
        want = reference(x)
    with torch.inference_mode():
        model = archs.load_model(path).model.eval()
        assert next(model.parameters()).is_inference()
        got = model(x)
        assert torch.allclose(got, want, atol=1e-5)
        changed = perturbed(copy.deepcopy(reference), seed=2)
        model.load_state_dict(changed.state_dict())  # in place, without a version bump
        again = model(x)
    with torch.no_grad():
        assert torch.allclose(again, changed(x), atol=1e-5)

"""OmniShift fusion: exact, idempotent, never stale, state dicts interchangeable."""

import copy

import torch
from torch import nn

import archs
from archs.blocks import OmniShift


def _net(dim=6):
    return nn.Sequential(nn.Conv2d(3, dim, 3, padding=1), OmniShift(dim), nn.GELU(), OmniShift(dim)).eval()


def test_fused_equals_unfused():
    net = _net()
    x = torch.randn(2, 3, 17, 11)
    want = net(x)
    assert archs.fuse(net) is net
    assert all(m.fused for m in archs.fusable_modules(net))
    assert (net(x) - want).abs().max() <= 1e-5


def test_fuse_is_idempotent_and_counts_modules():
    net = _net()
    x = torch.randn(1, 3, 9, 9)
    assert len(archs.fusable_modules(net)) == 2
    once = archs.fuse(net)(x)
    twice = archs.fuse(net)(x)
    assert torch.equal(once, twice)


def test_fused_weights_recomputed_after_load():
    """The reference's trap: fuse, then load other weights -> the fused kernel must follow."""
    a, b = _net(), _net()
    archs.fuse(a)
    a.load_state_dict(b.state_dict())
    x = torch.randn(1, 3, 8, 8)
    assert (a(x) - b(x)).abs().max() <= 1e-5


def test_fused_weights_recomputed_after_training_step():
    net = _net()
    archs.fuse(net)
    net.train()
    x = torch.randn(1, 3, 8, 8)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net(x).square().mean().backward()
    opt.step()
    net.eval()
    reference = copy.deepcopy(net)
    for m in archs.fusable_modules(reference):
        m.fused = False
    assert (net(x) - reference(x)).abs().max() <= 1e-5


def test_state_dicts_load_both_ways():
    fused, plain = archs.fuse(_net()), _net()
    x = torch.randn(1, 3, 7, 9)
    plain.load_state_dict(fused.state_dict(), strict=True)
    assert (plain(x) - fused(x)).abs().max() <= 1e-5
    other = _net()
    fused.load_state_dict(other.state_dict(), strict=True)
    assert (fused(x) - other(x)).abs().max() <= 1e-5


def test_fuse_on_model_without_reparam_modules_is_a_no_op():
    net = nn.Conv2d(3, 3, 3)
    before = copy.deepcopy(net.state_dict())
    assert archs.fuse(net) is net
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_gradients_flow_to_branches_in_training_even_when_fused():
    m = archs.fuse(OmniShift(4)).train()
    m(torch.randn(1, 4, 6, 6)).sum().backward()
    assert m.alpha.grad is not None and m.conv5x5.weight.grad is not None

"""FlexSR's detectors and spandrel's built-in ones never claim each other's checkpoints.

(a) For spandrel's built-in architectures, state dicts of small models made with spandrel's own model
    classes (configs from spandrel's tests): no architecture in ``archs.REGISTRY`` detects them.
(b) For every architecture in ``archs.REGISTRY`` (families added later included), the state dict of its
    ``signature_model()``: no spandrel built-in detects it, and exactly one FlexSR architecture does.

Models in (a) are built with their parameters on the meta device (no memory, no init work) where the
constructor allows it; detectors then see zero-stride CPU tensors of the right shapes and dtypes.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Callable

import pytest
import torch
from torch import nn

import archs
from testutil import spandrel_builtins

StateDict = dict[str, torch.Tensor]


def _spandrel(arch_id: str, name: str) -> Callable[..., nn.Module]:
    return getattr(importlib.import_module(f"spandrel.architectures.{arch_id}"), name)


def _m(arch_id: str, cls: str | None = None, **kwargs) -> Callable[[], nn.Module]:
    """A factory for ``spandrel.architectures.<arch_id>.<cls>(**kwargs)`` (cls defaults to arch_id)."""

    def make() -> nn.Module:
        return _spandrel(arch_id, cls or arch_id)(**kwargs)

    make.__name__ = f"{cls or arch_id}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
    return make


_AURA_SR = dict(
    dim=16, image_size=None, input_image_size=None, init_dim=16,
    style_network={"dim_in": 16, "dim_out": 32, "depth": 2}, self_attn_dim_head=8, attn_depths=(1, 1, 1, 1, 1),
    mid_attn_depth=1, up_dim_mults=(1, 2, 2, 2, 2), down_dim_mults=(2, 2, 2),
)  # fmt: skip

#: Small models of spandrel's built-in architectures, by spandrel architecture id (configs after spandrel's tests).
SPANDREL_MODELS: dict[str, list[Callable[[], nn.Module]]] = {
    "ATD": [_m("ATD", embed_dim=12, depths=(2,), num_heads=(2,), num_tokens=8, reducted_dim=4),
            _m("ATD", embed_dim=12, depths=(2,), num_heads=(2,), upsampler="pixelshuffle", upscale=2)],
    "AuraSR": [_m("AuraSR", **_AURA_SR)],
    "CRAFT": [_m("CRAFT", embed_dim=32, depths=[1], num_heads=[2], upscale=2),
              _m("CRAFT", embed_dim=32, depths=[1, 1], num_heads=[2, 2], upscale=4, resi_connection="identity")],
    "Compact": [_m("Compact", num_feat=8, num_conv=2), _m("Compact", num_in_ch=1, num_out_ch=1, upscale=2)],
    "DAT": [_m("DAT", embed_dim=32, depth=[1], num_heads=[2], upscale=2),
            _m("DAT", embed_dim=32, depth=[1], num_heads=[2], upsampler="pixelshuffledirect", upscale=4)],
    "DCTLSA": [_m("DCTLSA", in_nc=3, nf=8, num_modules=2, out_nc=3, upscale=2)],
    "DITN": [_m("DITN", dim=8, UFONE_blocks=1, upscale=2)],
    "DRCT": [_m("DRCT", embed_dim=12, depths=[1], num_heads=[2], upsampler="pixelshuffle", upscale=2)],
    "DRUNet": [_m("DRUNet", nc=[8, 16, 32, 64], nb=2), _m("DRUNet", nc=[8, 16, 32, 64], nb=2, upsample_mode="upconv")],
    "DnCNN": [_m("DnCNN", in_nc=1, out_nc=1, nc=8, nb=5, act_mode="BR"),
              _m("DnCNN", in_nc=4, out_nc=3, nc=8, nb=8, act_mode="R", mode="FDnCNN")],
    "ESRGAN": [_m("ESRGAN", in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=4),
               _m("ESRGAN", in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=2, plus=True)],
    "FBCNN": [_m("FBCNN", nc=[8, 16, 32, 64], nb=2)],
    "FDAT": [_m("FDAT", embed_dim=12, num_groups=1, depth_per_group=1, num_heads=2, scale=2, upsampler_type=u)
             for u in ("pixelshuffle", "transpose+conv", "nearest+conv", "dysample", "pixelshuffledirect")],
    "FFTformer": [_m("FFTformer", dim=8, num_blocks=[1, 1, 1], num_refinement_blocks=1)],
    "GFPGAN": [_m("GFPGAN")],
    "GRL": [_m("GRL", embed_dim=16, depths=[1], num_heads_window=[2], num_heads_stripe=[2]),
            _m("GRL", embed_dim=16, depths=[1], num_heads_window=[2], num_heads_stripe=[2],
               upsampler="pixelshuffledirect", upscale=2)],
    "HAT": [_m("HAT", embed_dim=12, depths=(1,), num_heads=(2,), squeeze_factor=4, num_feat=8, upscale=2),
            _m("HAT", embed_dim=12, depths=(1,), num_heads=(2,), squeeze_factor=4, num_feat=8, upscale=4,
               resi_connection="identity")],
    "HVICIDNet": [_m("HVICIDNet", channels=[8, 8, 16, 16], heads=[1, 1, 2, 2])],
    "IPT": [_m("IPT", n_feats=16, num_layers=1, patch_size=12, scale=[2])],
    "KBNet": [_m("KBNet", "KBNet_s", width=8, enc_blk_nums=[1, 1], dec_blk_nums=[1, 1], middle_blk_num=1),
              _m("KBNet", "KBNet_l", dim=24, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 1, 1, 1])],
    "LaMa": [_m("LaMa")],
    "MMRealSR": [_m("MMRealSR", num_block=1, num_in_ch=3, num_out_ch=3, num_feat=8, num_grow_ch=4,
                    num_feats=[8, 8, 8, 16], num_blocks=[1, 1, 1, 1])],
    "MixDehazeNet": [_m("MixDehazeNet", embed_dims=[8, 16, 32, 16, 8], depths=[1, 1, 1, 1, 1])],
    "MoESR": [_m("MoESR", dim=16, n_blocks=1, n_block=1, upsample_dim=8),
              _m("MoESR", dim=16, n_blocks=1, n_block=1, upsample_dim=8, upsampler="dysample")],
    "MoSR": [_m("MoSR", dim=16, n_block=1), _m("MoSR", dim=16, n_block=1, upsampler="dys")],
    "NAFNet": [_m("NAFNet", img_channel=3, width=8, middle_blk_num=1, enc_blk_nums=[1, 1], dec_blk_nums=[1, 1])],
    "OmniSR": [_m("OmniSR", num_feat=16, block_num=1, res_num=1)],
    "PLKSR": [_m("PLKSR", "PLKSR", dim=16, n_blocks=2), _m("PLKSR", "RealPLKSR", dim=16, n_blocks=2),
              _m("PLKSR", "PLKSR", dim=16, n_blocks=2, lk_type="RectSparsePLK", ccm_type="DCCM")],
    "RCAN": [_m("RCAN", n_resgroups=1, n_resblocks=1, n_feats=16, reduction=4),
             _m("RCAN", n_resgroups=1, n_resblocks=1, n_feats=16, reduction=4, scale=2)],
    "RGT": [_m("RGT", embed_dim=32, depth=[1], num_heads=[2], upscale=2)],
    "RealCUGAN": [_m("RealCUGAN", c) for c in ("UpCunet2x", "UpCunet3x", "UpCunet4x", "UpCunet2x_fast")]
                 + [_m("RealCUGAN", "UpCunet2x", pro=True)],
    "RestoreFormer": [_m("RestoreFormer", ch=32, n_embed=32, embed_dim=16, z_channels=16, ch_mult=(1, 2))],
    "RetinexFormer": [_m("RetinexFormer", n_feat=8, num_blocks=[1, 1, 1]), _m("RetinexFormer", n_feat=8, stage=1)],
    "SAFMN": [_m("SAFMN", dim=8, n_blocks=1, ffn_scale=2.0, upscaling_factor=2)],
    "SAFMNBCIE": [_m("SAFMNBCIE", dim=8, n_blocks=1, num_layers=1, ffn_scale=2.0, upscaling_factor=2)],
    "SCUNet": [_m("SCUNet", dim=16, config=[1, 1, 1, 1, 1, 1, 1])],
    "SPAN": [_m("SPAN", num_in_ch=3, num_out_ch=3, feature_channels=8, upscale=2),
             _m("SPAN", num_in_ch=3, num_out_ch=3, feature_channels=8, upscale=4, norm=False)],
    "SeemoRe": [_m("SeemoRe", embedding_dim=16, num_layers=1, num_experts=2),
                _m("SeemoRe", embedding_dim=16, num_layers=1, num_experts=2, lr_space="linear", scale=2)],
    "SwiftSRGAN": [_m("SwiftSRGAN", num_channels=8, num_blocks=1, upscale_factor=2)],
    "Swin2SR": [_m("Swin2SR", embed_dim=12, depths=[1], num_heads=[2], window_size=8, upsampler="pixelshuffledirect"),
                _m("Swin2SR", embed_dim=12, depths=[1], num_heads=[2], window_size=8, upsampler="pixelshuffle")],
    "SwinIR": [_m("SwinIR", embed_dim=12, depths=[1], num_heads=[2], window_size=8, upsampler="pixelshuffle"),
               _m("SwinIR", embed_dim=12, depths=[1], num_heads=[2], window_size=8, upsampler="nearest+conv")],
    "Uformer": [_m("Uformer", embed_dim=4, depths=[1] * 9, num_heads=[1] * 9)],
}  # fmt: skip


@contextlib.contextmanager
def _parameters_on_meta():
    """Every parameter registered inside this block is moved to the meta device (buffers stay on the CPU).

    Constructors that compute on tensors (drop-path schedules with ``.item()``, relative-position
    indices) still work, but no weight memory is filled or initialised.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _build_small(make: Callable[[], nn.Module]) -> nn.Module:
    """``make()`` with its parameters on the meta device, or on the CPU for constructors that need real weights."""
    try:
        with _parameters_on_meta():
            return make()
    except RuntimeError:  # e.g. constructors that assign ``weight.data`` from a CPU tensor
        return make()


def _shapes_only(model: nn.Module) -> StateDict:
    """``model``'s state dict as zero-stride CPU tensors: right keys, shapes and dtypes, all zeros."""
    return {k: torch.zeros((), dtype=v.dtype).expand(v.shape) for k, v in model.state_dict().items()}


def _spandrel_cases() -> list:
    cases = []
    for arch_id, makers in SPANDREL_MODELS.items():
        for i, make in enumerate(makers):
            cases.append(pytest.param(arch_id, make, id=f"{arch_id}-{i}"))
    return cases


def _spandrel_arch(arch_id: str):
    return next(a.architecture for a in spandrel_builtins("insertion") if a.architecture.id == arch_id)


def _flexsr_archs():
    return [s.architecture for s in archs.REGISTRY.architectures("insertion")]


def test_table_covers_spandrel_builtins():
    """Every spandrel built-in (at the time of writing, 42) has at least one small model above."""
    builtin = {a.architecture.id for a in spandrel_builtins("insertion")}
    builtin -= {s.architecture.id for s in archs.REGISTRY.architectures("insertion")}  # if install() ran
    missing = builtin - set(SPANDREL_MODELS)
    assert not missing, f"no small model for spandrel built-ins {sorted(missing)}; add one to SPANDREL_MODELS"


@pytest.mark.parametrize(("arch_id", "make"), _spandrel_cases())
def test_flexsr_claims_no_spandrel_builtin(arch_id, make):
    state_dict = _shapes_only(_build_small(make))
    # the model is a faithful example: spandrel's own detector recognises it
    assert _spandrel_arch(arch_id).detect(state_dict), f"{make.__name__} is not detected as {arch_id}"
    claimed = [a.id for a in _flexsr_archs() if a.detect(state_dict)]
    assert not claimed, f"FlexSR's {claimed} claim spandrel's {arch_id} ({make.__name__})"


def test_registry_is_not_empty():
    assert _flexsr_archs(), "archs.REGISTRY has no architectures"


@pytest.mark.parametrize("arch", _flexsr_archs(), ids=lambda a: a.id)
def test_no_spandrel_builtin_claims_flexsr(arch):
    model = arch.signature_model()
    state_dict = dict(model.state_dict())
    ours = {a.id for a in _flexsr_archs()}
    claimed = [
        s.architecture.id
        for s in spandrel_builtins("detection")
        if s.architecture.id not in ours and s.detect(state_dict)
    ]
    assert not claimed, f"spandrel's {claimed} claim FlexSR's {arch.id}"
    detected = [a.id for a in _flexsr_archs() if a.detect(state_dict)]
    assert detected == [arch.id], f"{arch.id}'s signature model is detected by {detected}"
    assert type(archs.load_model(state_dict).model) is type(model)

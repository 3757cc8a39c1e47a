"""Crafted and damaged checkpoint files for the bad-input suite and ``bench/bad_inputs_report.py``.

Each case is a small file (well under 1 MB) built from a tiny random model of one family, then
altered the way a fuzzer (or a damaged download) alters it. ``CASES`` maps a case name to
``(builder, expected error type name)``; ``builder(folder) -> path`` writes the file.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Callable

import safetensors.torch
import torch


def tiny_models() -> dict[str, torch.nn.Module]:
    """One tiny random model per FlexSR family (a few thousand parameters each)."""
    from archs.eimn import EIMN
    from archs.flexnet import FlexNet
    from archs.lamnet import LAMNet
    from archs.lmlt import LMLT
    from archs.transformer_sr import SR

    return {
        "flexnet": FlexNet(dim=16, num_blocks=(1, 1), scale=2),
        "lmlt": LMLT(dim=12, n_blocks=1, upscaling_factor=2),
        "lamnet": LAMNet(num_blocks=1, num_groups=1, dim=16, kernel_size=3, kernel_loc=(2,), kernel_stride=(1,),
                         num_head=2),
        "eimn": EIMN(embed_dims=16, num_stages=2, depths=1, scale=2),
        "transformer": SR(factor=2, num_blocks=1, dim=16, window_size=4, num_heads=4),
    }


def state_dicts() -> dict[str, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    return {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in tiny_models().items()}


def _save(sd: dict, path: Path) -> Path:
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def _rows(sd: dict, key: str, rows: int) -> dict:
    """``key``'s tensor with ``rows`` rows (the other dims kept): claims a huge width."""
    out = dict(sd)
    shape = list(sd[key].shape)
    shape[0] = rows
    out[key] = torch.zeros(shape)
    return out


def _extra(sd: dict, template: str, key: str) -> dict:
    """``sd`` plus ``key``, a copy of ``template``'s tensor: claims a huge block index."""
    out = dict(sd)
    out[key] = sd[template].clone()
    return out


# family -> list of (case suffix, transform of its state dict)
_STRUCTURE: dict[str, list[tuple[str, Callable[[dict], dict]]]] = {
    "flexnet": [
        ("block_index_5000000", lambda sd: _extra(sd, "pipeline.att.0.t_blocks.0.gamma1",
                                                  "pipeline.att.0.t_blocks.5000000.gamma1")),
        ("group_index_100000", lambda sd: _extra(sd, "pipeline.att.0.conv.conv11.weight",
                                                 "pipeline.att.100000.conv.conv11.weight")),
        ("dim_8192", lambda sd: _rows(sd, "in_to_feat.weight", 8192)),
        ("hidden_rate_750", lambda sd: _rows(sd, "pipeline.att.0.t_blocks.0.ffn.key.weight", 12000)),
    ],
    "lmlt": [
        ("block_index_200000", lambda sd: _extra(sd, "feats.0.ccm.ccm.0.weight", "feats.200000.ccm.ccm.0.weight")),
        ("dim_8192", lambda sd: _rows(sd, "to_feat.weight", 8192)),
        ("ffn_rows_16000", lambda sd: _rows(sd, "feats.0.ccm.ccm.0.weight", 16000)),
    ],
    "lamnet": [
        ("group_index_100000", lambda sd: _extra(sd, "deep_feature_extraction.1.weight",
                                                 "deep_feature_extraction.100000.weight")),
        ("mixer_index_1000000", lambda sd: _extra(sd, "deep_feature_extraction.0.mixers.0.fn.proj_out.weight",
                                                  "deep_feature_extraction.0.mixers.1000000.fn.proj_out.weight")),
        ("dim_8192", lambda sd: _rows(sd, "shallow_feature_extraction.weight", 8192)),
    ],
    "eimn": [
        ("stage_index_50000", lambda sd: _extra(sd, "block1.0.layer_scale_1", "block50000.0.layer_scale_1")),
        ("block_index_100000", lambda sd: _extra(sd, "block1.0.layer_scale_1", "block1.100000.layer_scale_1")),
        ("dim_8192", lambda sd: _rows(sd, "head.0.weight", 8192)),
    ],
    "transformer": [
        ("layer_index_500000", lambda sd: _extra(sd, "layers.1.0.norm.weight", "layers.500000.0.norm.weight")
         if "layers.1.0.norm.weight" in sd else _extra(sd, "layers.0.weight", "layers.500000.weight")),
        ("dim_8192", lambda sd: _rows(sd, "layers.0.weight", 8192)),
        ("tail_rows_1500", lambda sd: _rows(sd, "layers.2.weight", 1500)),
    ],
}


def structure_cases() -> dict[str, Callable[[Path], Path]]:
    """Crafted files whose keys or shapes claim a model far larger than the file."""
    cases = {}
    for family, edits in _STRUCTURE.items():
        for suffix, edit in edits:
            def build(folder: Path, family=family, edit=edit, suffix=suffix) -> Path:
                return _save(edit(state_dicts()[family]), Path(folder) / f"{family}_{suffix}.safetensors")
            cases[f"{family}:{suffix}"] = build
    return cases


def damaged_weight_cases() -> dict[str, Callable[[Path], Path]]:
    """NaN / Inf / integer / bool / zero-size weights in otherwise valid files of every family."""
    cases = {}
    for family in _STRUCTURE:
        def first_float(sd):
            return next(k for k, v in sd.items() if v.is_floating_point() and v.dim() >= 2)

        def nan(sd):
            k = first_float(sd); sd[k] = sd[k].clone(); sd[k].view(-1)[0] = float("nan"); return sd

        def inf(sd):
            k = first_float(sd); sd[k] = sd[k].clone(); sd[k].view(-1)[-1] = float("inf"); return sd

        def as_int(sd):
            return {k: (v.round().to(torch.int32) if v.is_floating_point() else v) for k, v in sd.items()}

        def as_bool(sd):
            k = first_float(sd); sd[k] = sd[k] > 0; return sd

        def zero_dim(sd):
            k = first_float(sd); shape = list(sd[k].shape); shape[0] = 0; sd[k] = torch.zeros(shape); return sd

        for suffix, edit in (("nan", nan), ("inf", inf), ("int_weights", as_int), ("bool_weight", as_bool),
                             ("zero_size", zero_dim)):
            def build(folder: Path, family=family, edit=edit, suffix=suffix) -> Path:
                return _save(edit(state_dicts()[family]), Path(folder) / f"{family}_{suffix}.safetensors")
            cases[f"{family}:{suffix}"] = build
    return cases

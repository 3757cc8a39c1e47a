"""Crafted and damaged checkpoint files for the bad-input suite and ``bench/bad_inputs_report.py``.

Each case is a small file (well under 1 MB) built from a tiny random model of one family, then
altered the way a fuzzer (or a damaged download) alters it. ``CASES`` maps a case name to
``(builder, expected error type name)``; ``builder(folder) -> path`` writes the file.
"""

from __future__ import annotations

import functools
import io
import os
import pickle
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


@functools.lru_cache(maxsize=1)
def _base_state_dicts() -> dict[str, dict[str, torch.Tensor]]:
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        return {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in tiny_models().items()}
    finally:
        torch.random.set_rng_state(state)


def state_dicts() -> dict[str, dict[str, torch.Tensor]]:
    """Fresh dicts (edits replace entries, never change the cached tensors in place)."""
    return {name: dict(sd) for name, sd in _base_state_dicts().items()}


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


def _many_blocks(sd: dict, block: str, count: int, keep: int | None = None) -> dict:
    """``count`` copies of block ``<block>.0`` holding only its ``keep`` smallest tensors each (None: one key)."""
    out = dict(sd)
    prefix = block + ".0."
    members = sorted((k for k in sd if k.startswith(prefix)), key=lambda k: (sd[k].numel(), k))
    members = members[: keep or 1]
    for i in range(1, count):
        for k in members:
            out[f"{block}.{i}." + k[len(prefix):]] = sd[k].clone()
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
        ("5000_one_key_blocks", lambda sd: _many_blocks(sd, "pipeline.att.0.t_blocks", 5000)),
        ("300_blocks_of_7_keys", lambda sd: _many_blocks(sd, "pipeline.att.0.t_blocks", 300, keep=7)),
        ("150_blocks_of_12_keys", lambda sd: _many_blocks(sd, "pipeline.att.0.t_blocks", 150, keep=12)),
    ],
    "lmlt": [
        ("block_index_200000", lambda sd: _extra(sd, "feats.0.ccm.ccm.0.weight", "feats.200000.ccm.ccm.0.weight")),
        ("dim_8192", lambda sd: _rows(sd, "to_feat.weight", 8192)),
        ("ffn_rows_2000", lambda sd: _rows(sd, "feats.0.ccm.ccm.0.weight", 2000)),
        ("3000_one_key_blocks", lambda sd: _many_blocks(sd, "feats", 3000)),
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


# --------------------------------------------------------------------------------------------------
# Files that are not checkpoints, damaged ones, code-running pickles, header attacks


class _Payload:
    """Unpickling this would call os.system; a safe loader must refuse before that happens."""

    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


def _write(name: str, data: bytes) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        path = Path(folder) / name
        path.write_bytes(data)
        return path
    return build


def _random_bytes(seed: int, n: int) -> bytes:
    import random

    rng = random.Random(seed)
    return bytes(rng.getrandbits(8) for _ in range(n))


def _torch_bytes(obj, **kw) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **kw)
    return buf.getvalue()


def _st_bytes(sd: dict) -> bytes:
    return safetensors.torch.save({k: v.contiguous() for k, v in sd.items()})


def _st_header(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    import json
    import struct

    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def _evil_global(module: str, name: str) -> bytes:
    """Protocol-0 pickle calling ``module.name('x')`` (GLOBAL + REDUCE)."""
    return f"c{module}\n{name}\n(S'echo'\ntR.".encode()


def _legacy_huge_storage() -> bytes:
    """A legacy (non-zip) torch file whose storage record claims 2**31-1 floats but holds 300."""
    import struct

    data = _torch_bytes({"a.weight": torch.zeros(300)}, _use_new_zipfile_serialization=False)
    needle = b"M" + struct.pack("<H", 300)  # BININT2 300, the storage's element count
    i = data.index(needle)
    return data[:i] + b"J" + struct.pack("<i", 2**31 - 1) + data[i + len(needle):]


def corrupt_file_cases() -> dict[str, tuple[Callable[[Path], Path], str]]:
    """name -> (builder, expected error type name): every way a file can fail to be a checkpoint."""
    sd = {"a.weight": torch.randn(8, 8), "b.bias": torch.randn(8)}
    zipped = _torch_bytes(sd)
    st = _st_bytes(sd)
    cases: dict[str, tuple[Callable[[Path], Path], str]] = {
        "empty .pth": (_write("empty.pth", b""), "CorruptCheckpointError"),
        "empty .safetensors": (_write("empty.safetensors", b""), "CorruptCheckpointError"),
        "text named .pth": (_write("notes.pth", b"not weights\n" * 40), "CorruptCheckpointError"),
        "PNG named .pth": (_write("img.pth", b"\x89PNG\r\n\x1a\n" + _random_bytes(1, 500)), "CorruptCheckpointError"),
        "JPEG named .ckpt": (_write("img.ckpt", b"\xff\xd8\xff\xe0" + _random_bytes(2, 500)), "CorruptCheckpointError"),
        "safetensors named .pth": (_write("weights.pth", st), "CorruptCheckpointError"),
        "torch zip named .safetensors": (_write("weights.safetensors", zipped), "CorruptCheckpointError"),
        "truncated torch zip": (_write("cut.pth", zipped[: len(zipped) // 2]), "CorruptCheckpointError"),
        "truncated legacy pickle": (_write("cut_legacy.pth", _torch_bytes(sd, _use_new_zipfile_serialization=False)[:300]),
                                    "CorruptCheckpointError"),
        "truncated safetensors": (_write("cut.safetensors", st[: len(st) // 2]), "CorruptCheckpointError"),
        "unknown extension": (_write("weights.onnx", st), "CorruptCheckpointError"),
        "pickle of a list": (_write("list.pth", _torch_bytes([torch.zeros(2)])), "CorruptCheckpointError"),
        "pickle without tensors": (_write("nothing.pth", _torch_bytes({"iter": 5, "lr": 0.1})), "CorruptCheckpointError"),
        "non-string keys": (_write("intkeys.pth", _torch_bytes({1: torch.zeros(2), 2: torch.ones(2)})),
                            "CorruptCheckpointError"),
        "unknown architecture": (_write("foreign.safetensors", st), "UnsupportedModelError"),
        # safetensors header attacks
        "st header length 2^63": (_write("h1.safetensors", _st_header(b"{}", length=1 << 63)), "CorruptCheckpointError"),
        "st header longer than file": (_write("h2.safetensors", _st_header({"a": {"dtype": "F32", "shape": [2],
                                       "data_offsets": [0, 8]}}, length=10_000)), "CorruptCheckpointError"),
        "st header not JSON": (_write("h3.safetensors", _st_header(b"{not json" + b" " * 20)), "CorruptCheckpointError"),
        "st offsets beyond data": (_write("h4.safetensors", _st_header({"a": {"dtype": "F32", "shape": [2],
                                   "data_offsets": [0, 8]}}, b"\0" * 4)), "CorruptCheckpointError"),
        "st huge shape, small data": (_write("h5.safetensors", _st_header({"a": {"dtype": "F32",
                                      "shape": [1 << 20, 1 << 20], "data_offsets": [0, 8]}}, b"\0" * 8)),
                                      "CorruptCheckpointError"),
        "st overlapping offsets": (_write("h6.safetensors", _st_header({"a": {"dtype": "F32", "shape": [2],
                                   "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
                                   b"\0" * 12)), "CorruptCheckpointError"),
        "st unknown dtype": (_write("h7.safetensors", _st_header({"a": {"dtype": "Q99", "shape": [2],
                             "data_offsets": [0, 8]}}, b"\0" * 8)), "CorruptCheckpointError"),
        # code-running pickles, never executed
        "escape codes in a global": (_write("ansi.pth", _evil_global("\x1b[31mos", "system\x1b[0m")), "UnsafeCheckpointError"),
    }
    for seed in range(6):
        cases[f"random bytes #{seed}"] = (_write(f"random{seed}.pth", _random_bytes(seed, 64 + 997 * seed)),
                                          "CorruptCheckpointError")
    for proto in range(0, pickle.HIGHEST_PROTOCOL + 1):
        cases[f"code-running pickle, protocol {proto}"] = (
            _write(f"evil{proto}.pth", pickle.dumps({"w": _Payload()}, protocol=proto)), "UnsafeCheckpointError")
    for proto in range(2, pickle.HIGHEST_PROTOCOL + 1):
        cases[f"code-running torch zip, protocol {proto}"] = (
            _write(f"evilzip{proto}.pth", _torch_bytes({"params": sd, "x": _Payload()}, pickle_protocol=proto)),
            "UnsafeCheckpointError")
    cases["legacy file claiming an 8 GB storage"] = (_write("huge_legacy.pth", _legacy_huge_storage()),
                                                      "CorruptCheckpointError")
    cases["code-running legacy torch file"] = (
        _write("evil_legacy.pth", _torch_bytes({"w": _Payload()}, _use_new_zipfile_serialization=False)),
        "UnsafeCheckpointError")
    return cases


def _rezip(data: bytes, replace: dict[str, bytes] | None = None, deflate: tuple[str, ...] = ()) -> bytes:
    """A torch zip checkpoint rebuilt member by member: some members' bytes replaced, some deflated."""
    import zipfile

    src, out = zipfile.ZipFile(io.BytesIO(data)), io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for info in src.infolist():
            body = src.read(info.filename)
            for suffix, new in (replace or {}).items():
                if info.filename.endswith(suffix):
                    body = new
            packed = any(info.filename.endswith(d) for d in deflate)
            z.writestr(info.filename, body, compress_type=zipfile.ZIP_DEFLATED if packed else zipfile.ZIP_STORED,
                       compresslevel=9 if packed else None)
    return out.getvalue()


def _compact_sd() -> dict:
    from spandrel.architectures.Compact import Compact

    return dict(Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=2).state_dict())


def bomb_cases() -> dict[str, tuple[Callable[[Path], Path], str]]:
    """Small files that unpack, unpickle or materialise into gigabytes or minutes (issue 22's loader bombs).
    Built lazily (each is made when its builder runs); some are larger than 1 MB (the 16 MiB opcode file,
    the 17 MB safetensors)."""
    sd = {"a.weight": torch.randn(8, 8)}
    opcodes = lambda n: b"\x80\x02" + b"]" * n + b"."  # noqa: E731 - n EMPTY_LIST opcodes, then STOP

    def zip_opcodes(n: int) -> Callable[[Path], Path]:
        return lambda folder: _write(f"opcodes{n >> 20}M.pth", _rezip(_torch_bytes(sd), {"data.pkl": opcodes(n)},
                                                                       ("data.pkl",)))(folder)

    def stride0(family: str) -> Callable[[Path], Path]:
        def build(folder: Path) -> Path:
            base = _compact_sd() if family == "compact" else state_dicts()[family]
            base = dict(base)
            base["zz.view"] = torch.zeros(1).expand(1 << 16, 1 << 16)  # 2**32 elements from one stored float
            return _write(f"stride0_{family}.pth", _torch_bytes(base))(folder)
        return build

    def deflated_storage(folder: Path) -> Path:
        data = _torch_bytes({"a.weight": torch.zeros(1 << 28)})  # 1 GiB of zeros, deflated below to ~1 MB
        return _write("deflated_storage.pth", _rezip(data, deflate=("/data/0",)))(folder)

    def many_tensors(folder: Path) -> Path:
        return _write("many.safetensors", _st_bytes({f"t{i}": torch.zeros(1) for i in range(200_000)}))(folder)

    return {
        "bomb: deflated data.pkl of 10M list opcodes (~10 KB)": (zip_opcodes(10 << 20), "CorruptCheckpointError"),
        "bomb: deflated data.pkl of 64M list opcodes (~64 KB)": (zip_opcodes(64 << 20), "CorruptCheckpointError"),
        "bomb: stored data.pkl of 1M list opcodes (1 MiB)": (
            lambda folder: _write("opcodes_stored.pth", _rezip(_torch_bytes(sd), {"data.pkl": opcodes(1 << 20)}))(folder),
            "CorruptCheckpointError"),
        "bomb: stored data.pkl of 200k list opcodes, under the size cap": (
            lambda folder: _write("opcodes_small.pth", _rezip(_torch_bytes(sd), {"data.pkl": opcodes(200_000)}))(folder),
            "CorruptCheckpointError"),
        "bomb: legacy pickle of 16M list opcodes (16 MiB)": (
            lambda folder: _write("opcodes_legacy.pth", opcodes(16 << 20)[:-1])(folder), "CorruptCheckpointError"),
        "bomb: stride-0 view in a Compact file": (stride0("compact"), "DamagedWeightsError"),
        "bomb: stride-0 view in a FlexNet file": (stride0("flexnet"), "DamagedWeightsError"),
        "bomb: storage deflating to 1 GiB": (deflated_storage, "CorruptCheckpointError"),
        "bomb: safetensors with 200,000 tensors": (many_tensors, "CorruptCheckpointError"),
    }


def crafted_cases() -> dict[str, tuple[Callable[[Path], Path], str]]:
    """Every crafted/damaged checkpoint case with its expected error type name (the bombs: :func:`bomb_cases`)."""
    cases = {name: (b, "IncompatibleWeightsError") for name, b in structure_cases().items()}
    for name, b in damaged_weight_cases().items():
        cases[name] = (b, "DamagedWeightsError")
    cases.update(corrupt_file_cases())
    return cases


class RealAllocations:
    """Counts tensor elements registered on modules off the meta device while active (this thread).

    A crafted file must be refused before any real parameter or buffer is created.
    """

    def __enter__(self):
        import threading

        from torch.nn.modules import module as m

        self.elements = 0
        owner = threading.get_ident()

        def tensor(module, name, t):
            if t is not None and t.device.type != "meta" and threading.get_ident() == owner:
                self.elements += t.numel()

        self.handles = [m.register_module_parameter_registration_hook(tensor),
                        m.register_module_buffer_registration_hook(tensor)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def all_cases() -> dict[str, tuple[Callable[[Path], Path], str]]:
    """The crafted cases and the bombs: everything ``bench/bad_inputs_report.py`` reports."""
    return {**crafted_cases(), **bomb_cases()}

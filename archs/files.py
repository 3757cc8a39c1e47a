"""Reading checkpoint files, bounded: no code runs, and no crafted file makes the reader spend more time or memory
than the tensors it really holds need.

A file is checked from what it declares before anything is unpacked:

- ``.safetensors``: the header's length and JSON are read alone; more than :data:`MAX_TENSORS` tensors, offsets
  outside the file or tensors whose bytes do not match their shape are refused before a byte of data is read.
- torch zip checkpoints (``.pth``/``.pt``/``.ckpt``/``.bin``): members must be stored, not compressed (torch never
  compresses them; a deflated member can unpack to gigabytes), their sizes must add up to the file, and the
  pickle (``data.pkl``) may be at most :data:`PICKLE_BASE` + :data:`PICKLE_PER_STORAGE` bytes per storage the file
  holds. Its opcodes are then read in one streaming pass with a budget (no list of them is built): a pickle
  that imports anything beyond tensors is refused before ``torch.load`` sees it.
- legacy (pre-zip) torch pickles: the opcode scan streams from the file with a fixed budget.

After ``torch.load(weights_only=True)``, before any value is touched, :func:`check_views` refuses tensors
that are views of fewer stored values than they claim (stride 0, or overlapping strides): one stored value
posing as 2^32 elements would make any reduction over it allocate 16 GiB.
"""

from __future__ import annotations

import io
import json
import os
import pickletools
import re
import warnings
import zipfile
from pathlib import Path
from typing import Mapping

import torch

from .errors import CheckpointNotFoundError, CorruptCheckpointError, DamagedWeightsError, UnsafeCheckpointError

CHECKPOINT_EXTENSIONS = (".pth", ".pt", ".ckpt", ".bin", ".safetensors")
#: More tensors than any upscale model has (the largest published ones: a few thousand).
MAX_TENSORS = 20_000
#: Largest .safetensors header read (20,000 tensors with long names take ~3 MB).
MAX_HEADER_BYTES = 16 << 20
#: A torch zip's pickle: a fixed allowance plus this much per stored tensor (a state dict's pickle takes
#: ~150-400 bytes per tensor: its name, the rebuild call, shape and strides).
PICKLE_BASE = 256 << 10
PICKLE_PER_STORAGE = 4 << 10
#: Opcodes the scan reads: a fixed allowance plus this many per stored tensor (a state dict: ~30-40 each).
OPS_BASE = 20_000
OPS_PER_STORAGE = 400
#: Opcode budget of a legacy (pre-zip) pickle, whose storage count is known only after reading it.
LEGACY_OPS = 100_000

_ANSI = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[@-Z\\-_])")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_WO_ADVICE = re.compile(r"(weights_only|add_safe_globals|safe_globals|allowlist|re-running|trust)", re.I)


def clean_message(text: str, limit: int = 300) -> str:
    """``text`` on one line without escape codes, control characters or torch's weights_only advice."""
    text = _CONTROL.sub(" ", _ANSI.sub("", text))
    sentences = re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
    text = " ".join(s for s in sentences if not _WO_ADVICE.search(s)).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def sniff(path: Path) -> str:
    """What kind of file ``path`` is, from its first bytes: "a PNG image", "a torch zip checkpoint",
    "a .safetensors file", "a text file", ... ("" when unknown)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return ""
    if head.startswith(b"\x89PNG"):
        return "a PNG image"
    if head.startswith(b"\xff\xd8\xff"):
        return "a JPEG image"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "a WebP image"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "a GIF image"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (the format of torch checkpoints)"
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000:
        return "a .safetensors file"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a pickle (a legacy torch checkpoint)"
    if head.startswith((b"<", b"{", b"[")) or (head and all(32 <= b < 127 or b in (9, 10, 13) for b in head)):
        return "a text file"
    return ""


# --------------------------------------------------------------------------------------------------
# .safetensors


def safetensors_header(path: Path) -> dict:
    """The header of a .safetensors file, checked against the file before any tensor is read."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptCheckpointError(f"'{path.name}' is truncated: {size} bytes, too short for a .safetensors "
                                         f"header.")
        n = int.from_bytes(head, "little")
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise CorruptCheckpointError(
                f"'{path.name}' is not a readable .safetensors file: its header claims {n:,} bytes"
                + (f", more than the file's {size:,}" if n > size - 8 else f" (at most {MAX_HEADER_BYTES:,} are read)")
                + "; it is truncated or damaged.")
        raw = f.read(n)
    declared = raw.count(b'"data_offsets"')  # counted before parsing: a crafted header can hold 200,000 entries
    if declared > MAX_TENSORS:
        raise CorruptCheckpointError(
            f"'{path.name}' declares {declared:,} tensors; an upscale model has at most a few thousand "
            f"(FlexSR reads up to {MAX_TENSORS:,}). It was not read.")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise CorruptCheckpointError(f"'{path.name}' is not a readable .safetensors file: its header is not JSON "
                                     f"({clean_message(str(e), 120)}).") from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"'{path.name}' is not a readable .safetensors file: its header is not a table "
                                     f"of tensors.")
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    if len(entries) > MAX_TENSORS:
        raise CorruptCheckpointError(
            f"'{path.name}' declares {len(entries):,} tensors; an upscale model has at most a few thousand "
            f"(FlexSR reads up to {MAX_TENSORS:,}). It was not read.")
    data = size - 8 - n
    total = 0
    for name, e in entries.items():
        try:
            start, end = (int(v) for v in e["data_offsets"])
            shape = [int(d) for d in e["shape"]]
            itemsize = _DTYPE_BYTES[e["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise CorruptCheckpointError(f"'{path.name}': the header entry of '{clean_message(str(name), 80)}' is "
                                         f"damaged.") from None
        count = 1
        for d in shape:
            count *= max(d, 0)
        if not 0 <= start <= end <= data or (end - start) != count * itemsize or min(shape, default=1) < 0:
            raise CorruptCheckpointError(
                f"'{path.name}': tensor '{clean_message(str(name), 80)}' ({e['dtype']} {shape}) does not fit the "
                f"bytes the file holds for it; the file is truncated or damaged.")
        total += end - start
    if total > data:
        raise CorruptCheckpointError(f"'{path.name}': its tensors claim {total:,} bytes, more than the file's "
                                     f"{data:,}; it is damaged.")
    return header


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """A .safetensors file's own metadata (the header's ``__metadata__``: text keys and values), read through the
    bounded header check above; ``{}`` for a file of another kind or one without metadata. A damaged or
    oversized header raises :class:`CorruptCheckpointError` like a load would."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return {}
    meta = safetensors_header(path).get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise CorruptCheckpointError(f"'{path.name}': its header's metadata is not a table of text; it is damaged.")
    return {str(k): str(v) for k, v in meta.items()}


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


def read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    kind = sniff(path)
    if kind.startswith("a zip archive") or "pickle" in kind:
        raise CorruptCheckpointError(f"'{path.name}' is not a .safetensors file: it is a torch checkpoint; rename it "
                                     f"to end in .pth.")
    if kind and kind != "a .safetensors file":
        raise CorruptCheckpointError(f"'{path.name}' is not a .safetensors file: it is {kind}.")
    safetensors_header(path)
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CorruptCheckpointError(
            f"'{path.name}' is a damaged .safetensors file (truncated, or its data does not match its header): "
            f"{clean_message(str(e), 200)}") from e


# --------------------------------------------------------------------------------------------------
# torch pickles


class _Budget(Exception):
    pass


def scan_pickles(stream, max_ops: int, max_pickles: int = 6) -> list[str] | None:
    """The names the pickles read from ``stream`` import (consecutive pickles too: torch's legacy format is
    several), reading at most ``max_ops`` opcodes in one streaming pass; None when it does not start with a
    complete pickle. Raises :class:`_Budget` past the budget. Runs nothing."""
    names: list[str] = []
    ops = 0
    for i in range(max_pickles):
        strings: list[str] = []
        found: list[str] = []
        complete = False
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # decoding random STRING operands warns about escapes
                for op, arg, _pos in pickletools.genops(stream):  # stops at the first STOP
                    ops += 1
                    if ops > max_ops:
                        raise _Budget
                    name = op.name
                    if name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING",
                                "SHORT_BINSTRING"):
                        if len(strings) > 2:
                            strings.pop(0)
                        strings.append(str(arg))
                    elif name in ("GLOBAL", "INST"):
                        found.append(str(arg).replace(" ", "."))
                    elif name == "STACK_GLOBAL":
                        found.append(".".join(strings[-2:]) if len(strings) >= 2 else "<computed name>")
                    elif name in ("EXT1", "EXT2", "EXT4"):
                        found.append(f"<copyreg extension {arg}>")
                    elif name == "STOP":
                        complete = True
        except _Budget:
            raise
        except Exception:  # noqa: BLE001 - not (or no longer) a pickle
            complete = False
        if not complete:
            return names if i else None
        names.extend(found)
        here = stream.tell()
        if not stream.read(1):
            break
        stream.seek(here)
    return names


def pickle_imports(data: bytes, max_pickles: int = 6) -> list[str] | None:
    """The names the pickles at the start of ``data`` import, or None when ``data`` does not start with a
    complete pickle (random bytes, an image, a truncated file). Reads opcodes only; runs nothing."""
    try:
        return scan_pickles(io.BytesIO(data), max_ops=len(data) + 1, max_pickles=max_pickles)
    except _Budget:  # pragma: no cover - an opcode takes at least one byte
        return None


def allowed_globals() -> set[str]:
    from torch._weights_only_unpickler import _get_allowed_globals

    allowed = set(_get_allowed_globals())
    allowed |= {f"{getattr(g, '__module__', '')}.{getattr(g, '__qualname__', '')}"
                for g in torch.serialization.get_safe_globals() if not isinstance(g, tuple)}
    return allowed


def _refuse_unsafe(path: Path, names: list[str], error: Exception | None = None) -> None:
    allowed = allowed_globals()
    foreign = [n for n in dict.fromkeys(names) if n not in allowed]
    refused = re.search(r"GLOBAL ((?:\w+\.)+\w+)\b", str(error or ""))  # torch names what it refused to import
    if not foreign and names and refused and refused[1] not in allowed:
        foreign = [refused[1]]  # (a name our opcode scan read from the memo differently)
    if foreign:
        shown = ", ".join(clean_message(n, 80) for n in foreign[:5]) + (" …" if len(foreign) > 5 else "")
        raise UnsafeCheckpointError(
            f"Refused to load '{path.name}': it is a pickle that imports {shown}, which is more than tensors "
            f"(unpickling it could run code). Nothing from it was executed. Ask its author for a .safetensors file."
        ) from None


def check_torch_zip(path: Path) -> tuple[str, int]:
    """A torch zip checkpoint's pickle member and its number of stored tensors, after checking what the zip
    declares (see the module's description); raises :class:`CorruptCheckpointError`."""
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise CorruptCheckpointError(f"'{path.name}' is a damaged torch checkpoint (a broken zip archive: "
                                     f"{clean_message(str(e), 100)}).") from None
    if len(infos) > MAX_TENSORS + 16:
        raise CorruptCheckpointError(f"'{path.name}' holds {len(infos):,} members; a torch checkpoint of an upscale "
                                     f"model holds at most a few thousand. It was not read.")
    packed = [i.filename for i in infos if i.compress_type != zipfile.ZIP_STORED]
    if packed:
        raise CorruptCheckpointError(
            f"'{path.name}' is not a checkpoint torch wrote: {len(packed)} of its members are compressed "
            f"({clean_message(packed[0], 80)}{', …' if len(packed) > 1 else ''}), which torch never does "
            f"(a compressed member can unpack to far more than the file). It was not read.")
    declared = sum(i.file_size for i in infos)
    if declared > size:
        raise CorruptCheckpointError(f"'{path.name}': its members claim {declared:,} bytes, more than the file's "
                                     f"{size:,}; it is damaged.")
    pkl = [i for i in infos if i.filename == "data.pkl" or i.filename.endswith("/data.pkl")]
    if len(pkl) != 1:
        raise CorruptCheckpointError(f"'{path.name}' is a zip archive but not a torch checkpoint (no data.pkl).")
    storages = sum(1 for i in infos if "/data/" in i.filename or i.filename.startswith("data/"))
    limit = PICKLE_BASE + PICKLE_PER_STORAGE * storages
    if pkl[0].file_size > limit:
        raise CorruptCheckpointError(
            f"'{path.name}': its pickle is {pkl[0].file_size:,} bytes, far more than the {storages} tensor(s) it "
            f"stores need (at most {limit:,}); it was not read.")
    return pkl[0].filename, storages


def read_torch_pickle(path: Path) -> object:
    """A torch checkpoint (zip or legacy) read with ``weights_only=True`` after the bounded checks."""
    is_zip = zipfile.is_zipfile(path)
    if is_zip:
        member, storages = check_torch_zip(path)
        with zipfile.ZipFile(path) as z, z.open(member) as f:
            stream = io.BytesIO(f.read())  # at most the limit check_torch_zip allowed
        budget = OPS_BASE + OPS_PER_STORAGE * storages
    else:
        stream = open(path, "rb")  # noqa: SIM115 - closed below; streamed, never read whole
        budget = LEGACY_OPS
    try:
        try:
            names = scan_pickles(stream, budget)
        except _Budget:
            raise CorruptCheckpointError(
                f"'{path.name}': its pickle runs past {budget:,} instructions, far more than a state dict "
                f"needs; it was not read.") from None
    finally:
        stream.close()
    if names is not None:
        _refuse_unsafe(path, names)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols are not for the user
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - the weights-only unpickler fails in many ways on damaged files
        error = e
    if names is not None:
        _refuse_unsafe(path, names, error)
    kind = sniff(path) if names is None else ""
    if names is not None:
        reason = "its pickle is damaged"
    elif kind.startswith("a zip archive") or "pickle" in kind:
        reason, kind = "it is a damaged torch checkpoint (truncated, or parts of it are broken)", ""
    elif kind == "a .safetensors file":
        reason, kind = "it is a .safetensors file; rename it to end in .safetensors", ""
    elif kind:
        reason = f"it is {kind}, not a checkpoint"
    else:
        reason = "it is not a PyTorch checkpoint, or it is truncated or damaged"
    text = str(error)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    detail = clean_message(text).removeprefix("Weights only load failed.").strip()
    damaged = "damaged torch checkpoint" in reason  # torch's own words add nothing a user can act on then
    raise CorruptCheckpointError(
        f"'{path.name}' cannot be read: {reason}" + (f" ({detail})." if detail and not kind and not damaged else ".")
    ) from None


def read_checkpoint(path: str | os.PathLike) -> object:
    """The raw content of a checkpoint file (a dict of tensors, or a container of one), read without running
    code and within the bounds above."""
    path = Path(path)
    if not path.is_file():
        if path.is_dir():
            raise CheckpointNotFoundError(f"'{path.name}' is a folder, not a checkpoint file.")
        raise CheckpointNotFoundError(f"Checkpoint not found: '{path.name}' does not exist.")
    if path.stat().st_size == 0:
        raise CorruptCheckpointError(f"Checkpoint '{path.name}' is empty (0 bytes); download it again.")
    ext = path.suffix.lower()
    if ext == ".safetensors":
        return read_safetensors(path)
    if ext in CHECKPOINT_EXTENSIONS:
        return read_torch_pickle(path)
    raise CorruptCheckpointError(f"'{path.name}' has extension '{ext}', which is not a checkpoint format FlexSR "
                                 f"reads ({', '.join(CHECKPOINT_EXTENSIONS)}).")


# --------------------------------------------------------------------------------------------------
# Tensors


def check_views(state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse tensors that claim more elements than they store (stride 0 or overlapping strides) and more
    tensors than :data:`MAX_TENSORS`, before any of their values is read."""
    if len(state_dict) > MAX_TENSORS:
        raise DamagedWeightsError(f"{source} holds {len(state_dict):,} tensors; an upscale model has at most a few "
                                  f"thousand. It was not read.")
    for key, t in state_dict.items():
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.numel() <= 1:
            continue
        zero = any(st == 0 and sz > 1 for st, sz in zip(t.stride(), t.shape))
        stored = t.untyped_storage().nbytes() // max(t.element_size(), 1)
        if zero or not _non_overlapping(t.shape, t.stride()):
            raise DamagedWeightsError(
                f"{source}: '{clean_message(str(key), 80)}' {list(t.shape)} is a view in which stored values repeat "
                f"({'stride 0' if zero else 'overlapping strides'}): {t.numel():,} elements from "
                f"{stored:,} stored. Model weights are never "
                f"saved that way; the file is crafted or damaged.")


def _non_overlapping(shape, stride) -> bool:
    """Whether no two indices of a strided tensor address the same stored element (sufficient test: sorted by
    stride, each dimension steps past everything the smaller ones span; dense and permuted tensors pass)."""
    span = 0
    for sz, st in sorted(((sz, abs(st)) for sz, st in zip(shape, stride) if sz > 1), key=lambda d: d[1]):
        if st <= span:
            return False
        span += st * (sz - 1)
    return True

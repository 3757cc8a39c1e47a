"""Atomic checkpoint files and RNG state capture.

Checkpoints hold only tensors, numbers, strings, lists and dicts, so they load with
``torch.load(weights_only=True)`` (a resumed file cannot run code). A write goes to a temporary file
in the same folder, is flushed to disk, then ``os.replace``d over the target: a run killed at any
moment leaves either the previous checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch

FORMAT_VERSION = 1


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)``, fsync it, then atomically move it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # some writers create 0600 files; give the usual permissions
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def save_checkpoint(path: str | Path, state: dict) -> Path:
    return atomic_write(path, lambda tmp: torch.save({"format": FORMAT_VERSION, **state}, tmp))


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    state = torch.load(str(path), map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise ValueError(f"'{path}' is not a FlexSR training checkpoint (format {FORMAT_VERSION}).")
    return state


# --------------------------------------------------------------------------------------------------
# RNG states as plain data


def rng_state() -> dict:
    """Python, numpy, torch (CPU) and CUDA generator states, as tensors and plain numbers."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------------
# The metrics log


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a JSONL file; a torn last line (a run killed mid-write) is dropped."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def truncate_jsonl(path: str | Path, last_step: int) -> int:
    """Keep only the records of steps <= ``last_step`` (a resumed run rewrites what follows)."""
    keep = [r for r in read_jsonl(path) if int(r.get("step", 0)) <= last_step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))
    return len(keep)

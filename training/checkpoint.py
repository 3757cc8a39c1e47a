"""Atomic checkpoint files and RNG state capture.

Checkpoints hold only tensors, numbers, strings, lists and dicts, so they load with
``torch.load(weights_only=True)`` (a resumed file cannot run code). A write goes to a temporary file
in the same folder, is flushed to disk, then ``os.replace``d over the target: a run killed at any
moment leaves either the previous checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import re
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from archs.errors import CorruptCheckpointError, DiskFullError, FlexSRError, is_no_room

log = logging.getLogger("flexsr")

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
    except Exception as e:
        if is_no_room(e):  # torch, safetensors and PIL each word it their own way
            raise DiskFullError(f"No room to write '{path.name}' in {path.parent} (the disk or a size limit is "
                                f"full); nothing was replaced. Free some space and run the command again.") from None
        raise
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


class NothingResumableError(FlexSRError, FileNotFoundError):
    """--resume found no checkpoint that loads (the last one is damaged and no earlier one is kept)."""


def previous_path(path: str | Path) -> Path:
    """Where the checkpoint before ``path`` is kept: ``checkpoint.pt`` -> ``checkpoint.prev.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """Write ``state`` atomically; the checkpoint it replaces is kept as ``<stem>.prev<suffix>``.

    The new file is complete on disk before the old one moves aside, so a run killed at any moment
    leaves at least one good checkpoint (``resumable_checkpoint`` finds it).
    """
    path = Path(path)
    prev = previous_path(path)

    def write(tmp: Path) -> None:
        # serialised in memory, written by plain file I/O: a full disk is then an OSError (ENOSPC / EFBIG) that
        # says so, where torch's own zip writer reports only "unexpected pos"
        buf = io.BytesIO()
        torch.save({"format": FORMAT_VERSION, **state}, buf)
        tmp.write_bytes(buf.getbuffer())
        if path.exists():
            os.replace(path, prev)

    return atomic_write(path, write)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """A FlexSR training checkpoint; a damaged or foreign file raises :class:`CorruptCheckpointError`."""
    try:
        state = torch.load(str(path), map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated zip, torn pickle, foreign file: all mean "damaged"
        reason = " ".join(str(e).split())[:200]
        raise CorruptCheckpointError(f"'{path}' is damaged (truncated or not a checkpoint): {type(e).__name__}: "
                                     f"{reason}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CorruptCheckpointError(f"'{path}' is not a FlexSR training checkpoint (format {FORMAT_VERSION}).")
    return state


def resumable_checkpoint(path: str | Path, map_location="cpu") -> tuple[dict, Path] | None:
    """The newest checkpoint that loads: ``path``, else the previous one kept beside it.

    Returns ``(state, path used)``, or None when neither file exists. A damaged ``path`` with a good
    previous checkpoint logs a warning and uses that one; when nothing loads,
    :class:`NothingResumableError` says so.
    """
    path = Path(path)
    prev = previous_path(path)
    problems = []
    for candidate in (path, prev):
        if not candidate.exists():
            continue
        try:
            state = load_checkpoint(candidate, map_location)
        except CorruptCheckpointError as e:
            problems.append(str(e))
            log.warning("--resume: %s", e)
            continue
        if candidate == prev:
            log.warning("--resume: falling back to the previous checkpoint %s (step %s).", prev, state.get("step"))
        return state, candidate
    if not problems:
        return None
    raise NothingResumableError(
        "Nothing is resumable: " + "; ".join(problems) + (f"; and there is no previous checkpoint ({prev.name})."
                                                          if not prev.exists() else ".")
        + " Start afresh with --overwrite (or another --out)."
    )


#: Temporary files of atomic writes: ``.<name>.tmp-<pid>``.
_TEMP = re.compile(r"^\..+\.tmp-(\d+)$")


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete temporary files left by writes of runs that were killed (their process is gone)."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        m = _TEMP.match(entry.name)
        if not m or not entry.is_file() or entry.is_symlink() or _alive(int(m[1])):
            continue
        try:
            entry.unlink()
            removed.append(entry)
        except OSError:
            continue
    if removed:
        log.info("Removed %d temporary file(s) left by an interrupted run: %s", len(removed),
                 ", ".join(p.name for p in removed))
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # an earlier run of this process (tests) was interrupted; nothing writes it now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


#: What a previous run in --out left that a fresh --overwrite run must not mix with its own.
RUN_FILES = ("checkpoint.pt", "checkpoint.prev.pt", "summary.json", "train.log", "metrics.jsonl")


def clear_previous_run(folder: str | Path) -> list[Path]:
    """Remove a previous run's checkpoints, log and summary from ``folder`` (``--overwrite``)."""
    removed = []
    for name in RUN_FILES:
        p = Path(folder) / name
        if p.is_file():
            p.unlink()
            removed.append(p)
    return removed


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

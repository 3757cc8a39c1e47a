"""Exception types of FlexSR: one per kind of failure, each message says what was wrong and what to do."""

from __future__ import annotations

from spandrel import UnsupportedModelError as _SpandrelUnsupported


class FlexSRError(Exception):
    """Base class of every error FlexSR raises on purpose."""


class CheckpointNotFoundError(FlexSRError, FileNotFoundError):
    """The checkpoint path does not exist or is not a file."""


class CorruptCheckpointError(FlexSRError, ValueError):
    """The file is empty, truncated, or not a model checkpoint at all."""


class UnsafeCheckpointError(FlexSRError, ValueError):
    """The file is a pickle that would import or run code beyond plain tensors; it was not executed."""


class UnsupportedModelError(FlexSRError, _SpandrelUnsupported):
    """No known architecture (FlexSR's or spandrel's) matches the state dict."""


class IncompatibleWeightsError(FlexSRError, ValueError):
    """The architecture was recognised, but the weights do not fit it (wrong shapes, missing or extra keys)."""


class BadImageError(FlexSRError, ValueError):
    """An input image cannot be processed (wrong shape, channels, NaN/Inf, mixed sizes)."""


class DamagedWeightsError(CorruptCheckpointError):
    """The file reads, but some weights are damaged: NaN/Inf values, integer or bool values where the
    model has floating-point weights, or tensors with a zero-size dimension."""


class NonFiniteOutputError(FlexSRError, ArithmeticError):
    """A model turned a finite image into NaN or infinite values (damaged weights, or an overflow)."""


class DiskFullError(FlexSRError, OSError):
    """A file could not be written because its disk (or quota, or file-size limit) is full; nothing earlier was
    replaced."""


#: errno values that mean "no room": no space, quota exceeded, file too large.
NO_ROOM_ERRNOS = (28, 122, 27)  # ENOSPC, EDQUOT, EFBIG


def is_no_room(error: BaseException) -> bool:
    """Whether ``error`` (an OSError, or a library's error wrapping one, such as safetensors') means a full disk."""
    import errno as _errno

    codes = {getattr(_errno, n) for n in ("ENOSPC", "EDQUOT", "EFBIG") if hasattr(_errno, n)} or set(NO_ROOM_ERRNOS)
    if isinstance(error, OSError) and error.errno in codes:
        return True
    text = str(error).lower()
    return any(w in text for w in ("no space left", "disk quota exceeded", "file too large", "file size limit"))

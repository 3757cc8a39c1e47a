"""glibc heap tuning for CPU upscales: keep freed memory for reuse during a run, hand it back after.

Between a model's layers glibc returns freed activation memory to the OS (trimming the heap top, or
unmapping large blocks) and the next layer page-faults it in again. In a fresh process FlexNet x4 on a
128² input takes 130-235k page faults per forward and 1.60-1.86 s of CPU time, against ~2k faults and
1.34-1.42 s with the heap kept (one thread, separate processes, a scratch script). A process
whose glibc has already raised its dynamic thresholds (after freeing blocks of 32 MiB and more, as any
big model does) sees little of this: ``bench/bench_flexnet.py --kept-heap``, interleaved with ESRGAN,
shows no gain. :func:`kept_heap` raises glibc's trim and mmap thresholds for the duration of a run and
calls ``malloc_trim(0)`` at its end, so the memory is handed back after the run. Anywhere else (macOS, Windows, musl) it does nothing. No imports from the pack: the
benchmarks load this file on its own.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys
import threading
from typing import Iterator, Optional

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: During a run: blocks up to 32 MiB (glibc's ceiling for this setting) come from the heap, and up to
#: 2 GiB of free heap (mallopt takes an int) is kept.
RUN_MMAP_THRESHOLD = 32 << 20
RUN_TRIM_THRESHOLD = 2**31 - 1
#: After a run: glibc's own dynamic thresholds end at most here (setting them once fixes them).
IDLE_TRIM_THRESHOLD = 64 << 20

_lock = threading.Lock()
_depth = 0
_libc: Optional[ctypes.CDLL] = None
_checked = False


def _glibc() -> Optional[ctypes.CDLL]:
    global _libc, _checked
    if not _checked:
        _checked = True
        if sys.platform.startswith("linux"):
            try:
                lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                if hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim") and hasattr(lib, "gnu_get_libc_version"):
                    _libc = lib
            except OSError:
                _libc = None
    return _libc


def available() -> bool:
    """True where the heap can be tuned (glibc)."""
    return _glibc() is not None


@contextlib.contextmanager
def kept_heap(enabled: bool = True) -> Iterator[bool]:
    """Keep freed heap memory inside the ``with`` block, return it to the OS at its end; yields whether
    it is in effect. Nested uses share one setting; only the outermost one trims."""
    global _depth
    libc = _glibc() if enabled else None
    if libc is None:
        yield False
        return
    with _lock:
        if _depth == 0:
            libc.mallopt(M_MMAP_THRESHOLD, RUN_MMAP_THRESHOLD)
            libc.mallopt(M_TRIM_THRESHOLD, RUN_TRIM_THRESHOLD)
        _depth += 1
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(M_TRIM_THRESHOLD, IDLE_TRIM_THRESHOLD)
                libc.malloc_trim(0)

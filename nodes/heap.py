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

That is not enough for a model whose activations exceed 32 MiB (EIMN at 384² and up), nor inside
ComfyUI, which runs nodes in a worker thread: glibc serves a thread from an arena of 64 MiB heaps that
are unmapped as soon as they empty, and blocks above 32 MiB (above 64 MiB in a thread arena, whatever
the setting) always come from a fresh mmap. Every layer then page-faults its output in again: EIMN_A x2
on a 512² image in a worker thread, 9.5-10M page faults and 27-29 s CPU. So during a run the heap also
serves large blocks (``M_MMAP_MAX`` 0), and :func:`run_on_heap` runs the model calls in one thread of
FlexSR's own that takes glibc's main arena (the ``brk`` heap, which grows and is kept): the same call,
0.4M faults and 12.3 s (one thread, scratch script). The thread is made once, after
``M_ARENA_MAX`` is set to 1 so that it reuses an arena, the main one first; glibc keeps that limit for
the rest of the process (threads started later share arenas, as with ``MALLOC_ARENA_MAX=1``). Where it
lands on another arena it still works, only without the gain (:func:`heap_thread_on_main_arena`).
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import ctypes.util
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Optional, TypeVar

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
M_ARENA_MAX = -8
#: glibc's default M_MMAP_MAX, restored after a run.
DEFAULT_MMAP_MAX = 65536
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
            libc.mallopt(M_MMAP_MAX, 0)  # large blocks from the heap too (glibc mmaps when the heap cannot grow)
        _depth += 1
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
                libc.mallopt(M_TRIM_THRESHOLD, IDLE_TRIM_THRESHOLD)
                libc.malloc_trim(0)


T = TypeVar("T")
_worker: Optional[ThreadPoolExecutor] = None
_worker_on_main: Optional[bool] = None


def _probe_arena() -> bool:
    """In the worker: whether a fresh 1 MiB block lies below the program break (the main arena's heap)."""
    libc = _glibc()
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.sbrk.restype = ctypes.c_void_p
    libc.sbrk.argtypes = [ctypes.c_ssize_t]
    block = libc.malloc(1 << 20)
    try:
        return bool(block) and block < (libc.sbrk(0) or 0)
    finally:
        libc.free(block)


def _heap_worker() -> Optional[ThreadPoolExecutor]:
    global _worker, _worker_on_main
    libc = _glibc()
    if libc is None:
        return None
    with _lock:
        if _worker is None:
            libc.mallopt(M_ARENA_MAX, 1)  # the new thread reuses an arena (the main one first) instead of a new one
            _worker = ThreadPoolExecutor(1, thread_name_prefix="flexsr-heap")
            _worker_on_main = _worker.submit(_probe_arena).result()
    return _worker


def heap_thread_on_main_arena() -> Optional[bool]:
    """Whether :func:`run_on_heap`'s thread allocates from glibc's main arena (None: no such thread here)."""
    _heap_worker()
    return _worker_on_main


def run_on_heap(fn: Callable[[], T]) -> T:
    """``fn()`` in FlexSR's heap thread (glibc's main arena, see above), with the caller's context
    variables; its result or exception comes back here. Without glibc, ``fn()`` runs right here.

    Thread-local state (torch's grad/inference mode, autocast, thread count) is the thread's own: ``fn``
    sets what it needs. The caller waits, so the thread runs one call at a time."""
    worker = _heap_worker()
    if worker is None or threading.current_thread().name.startswith("flexsr-heap"):
        return fn()
    return worker.submit(contextvars.copy_context().run, fn).result()

"""Progress and cancellation inside one model call, through forward hooks on the model's modules.

A model call on a large tile can take many seconds on a CPU. While :class:`ModuleWatch` is attached,
every submodule of the model reports when its forward pass finishes; the watch counts those reports,
turns the count into the fraction of the call that is done, reports that fraction at most every
``report_every`` seconds, and runs the cancel check at most every ``check_every`` seconds, so a cancel
raises from inside the model call between two modules.

How many reports a call makes is what the model really fires, not its module count: inference forms run
most of their work in fused functional code (EIMN fires 20 of its 384 modules' hooks). :meth:`ModuleWatch.probe`
counts the fires of two tiny calls before the first real one and fits ``fires = a + b * pixels``; every real
call then records its own count per input shape. Both are kept on the model, so later runs start right.

Plain torch: the engine passes its own ``check_cancel`` and progress callbacks; nothing here knows
ComfyUI.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Callable, Hashable, Iterator, Optional

from torch import nn

log = logging.getLogger("flexsr")

#: Seconds between two progress reports from inside one model call.
REPORT_EVERY = 0.25
#: Seconds between two cancel checks from inside one model call.
CHECK_EVERY = 0.02
#: A fraction inside a call never reaches 1: the call's end is reported by the caller.
MAX_FRACTION = 0.98
#: Where a model keeps what the watch learned of it (an attribute of the nn.Module, not in its state dict).
LEARNED_ATTR = "_flexsr_hook_fires"
FIT_KEY = ("fit",)


class ModuleWatch:
    """Counts finished module forwards of ``module`` during a call; reports progress, checks cancel."""

    def __init__(self, module: nn.Module, check_cancel: Optional[Callable[[], None]] = None,
                 on_fraction: Optional[Callable[[float], None]] = None,
                 report_every: Optional[float] = None, check_every: Optional[float] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.module = module
        self.check_cancel = check_cancel
        self.on_fraction = on_fraction
        self.report_every = REPORT_EVERY if report_every is None else report_every
        self.check_every = CHECK_EVERY if check_every is None else check_every
        self.clock = clock
        self.modules = max(1, sum(1 for _ in module.modules()))
        #: fires per input shape, and ("fit",) -> (a, b) from the probe; kept on the model across runs
        self.learned: dict[Hashable, object] = module.__dict__.setdefault(LEARNED_ATTR, {})
        self.last_count: Optional[int] = None
        self.fires = 0
        self.expected = self.modules
        self.active = False
        self.reports = 0
        self._handles: list = []
        self._last_report = 0.0
        self._last_check = 0.0

    @contextlib.contextmanager
    def attached(self) -> Iterator["ModuleWatch"]:
        """Hooks on every submodule while the block runs (none left behind, whatever happens)."""
        try:
            for m in self.module.modules():
                self._handles.append(m.register_forward_hook(self._hook))
        except Exception as e:  # scripted or otherwise unusual modules: run without hooks
            log.debug("FlexSR: no forward hooks on %s (%s)", type(self.module).__name__, e)
            self._remove()
        try:
            yield self
        finally:
            self._remove()

    @property
    def probed(self) -> bool:
        return FIT_KEY in self.learned

    def probe(self, run: Callable[[int], None], side: int) -> None:
        """Count the hooks the model fires on two tiny inputs (``run(side)`` and ``run(2 * side)`` call it on
        a ``side`` x ``side`` input) and fit ``fires = a + b * pixels`` (:meth:`expected_fires`). Hooks must be
        attached (:meth:`attached`); nothing is reported and no cancel check runs."""
        counts = []
        saved = self.on_fraction, self.check_cancel
        self.on_fraction = self.check_cancel = None
        try:
            for s in (side, 2 * side):
                self.fires, self.active = 0, True
                try:
                    run(s)
                finally:
                    self.active = False
                counts.append((s * s, self.fires))
        finally:
            self.on_fraction, self.check_cancel = saved
        (p1, f1), (p2, f2) = counts
        b = max(0.0, (f2 - f1) / (p2 - p1))
        self.learned[FIT_KEY] = (max(0.0, f1 - b * p1), b)

    def expected_fires(self, key: Hashable) -> int:
        """Fires a call on ``key`` (its input shape ``(B, C, H, W)``) will make: what such a call made before,
        else the probe's fit, else the last call's count, else one per module."""
        known = self.learned.get(key)
        if isinstance(known, int):
            return known
        fit = self.learned.get(FIT_KEY)
        if fit is not None and isinstance(key, tuple) and len(key) == 4:
            a, b = fit
            return max(1, round(a + b * key[0] * key[2] * key[3]))
        return self.last_count or self.modules

    @contextlib.contextmanager
    def call(self, key: Hashable = None) -> Iterator[None]:
        """One model call on an input described by ``key`` (e.g. its shape)."""
        self.fires = 0
        self.expected = self.expected_fires(key)
        self._last_report = self._last_check = self.clock()
        self.active = True
        try:
            yield
        finally:
            self.active = False
        if self.fires:
            self.learned[key] = self.last_count = self.fires

    def _hook(self, _module, _inputs, _output) -> None:
        if not self.active:
            return
        self.fires += 1
        now = self.clock()
        if self.check_cancel is not None and now - self._last_check >= self.check_every:
            self._last_check = now
            self.check_cancel()
        if self.on_fraction is not None and now - self._last_report >= self.report_every:
            self._last_report = now
            self.reports += 1
            self.on_fraction(min(MAX_FRACTION, self.fires / max(self.expected, 1)))

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

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

Between two fires the model can sit in one long module for seconds (EIMN at 768² on a CPU: up to 2 s), and a
hook cannot split it. While a call runs, a ticker thread therefore reports every ``report_every`` seconds an
estimate that moves inside the current step: ``(fires + 1 - exp(-t / per_fire)) / expected``, where ``t`` is
the time since the last fire and ``per_fire`` the call's expected length over its fires (the length this input
shape took before, else the pace of the fires so far, else the probe's time per pixel); a step that outlasts
``per_fire`` keeps creeping on, ever slower (``1 - e⁻¹ · per_fire / t``). The estimate never reaches the next
fire's mark, so the bar only moves forward and never claims work that is not done. The ticker
runs in the caller's context (ComfyUI finds the running node from it); an exception its report raises
(ComfyUI's check for Cancel runs inside every progress report, and clears the flag) is raised again in the
model's thread at the next hook, so a cancel is never lost.

Plain torch: the engine passes its own ``check_cancel`` and progress callbacks; nothing here knows
ComfyUI.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import threading
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
#: seconds per input pixel of the probe's larger call (a first guess of a call's length)
PACE_KEY = ("seconds per pixel",)


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
        self.ticks = 0
        self._handles: list = []
        self._last_report = 0.0
        self._last_check = 0.0
        self._start = 0.0
        self._last_fire = 0.0
        self._pixels = 0
        self._key: Hashable = None
        self._shown = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: Optional[threading.Thread] = None
        self._raised: Optional[BaseException] = None

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
                started = time.perf_counter()
                try:
                    run(s)
                finally:
                    self.active = False
                counts.append((s * s, self.fires))
                self.learned[PACE_KEY] = (time.perf_counter() - started) / (s * s)
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
        self._key = key
        self._pixels = key[0] * key[2] * key[3] if isinstance(key, tuple) and len(key) == 4 else 0
        self._start = self._last_fire = self._last_report = self._last_check = self.clock()
        self._shown = 0.0
        self._raised = None
        self.active = True
        self._start_ticker()
        try:
            yield
        finally:
            self._stop_ticker()
            self.active = False
        if self.fires:
            self.learned[key] = self.last_count = self.fires
        self.learned[("seconds", key)] = self.clock() - self._start
        self._raise_forwarded()

    def _hook(self, _module, _inputs, _output) -> None:
        if not self.active:
            return
        self._raise_forwarded()
        with self._lock:
            self.fires += 1
            now = self._last_fire = self.clock()
            if self.check_cancel is not None and now - self._last_check >= self.check_every:
                self._last_check = now
                self.check_cancel()
            if self.on_fraction is not None and now - self._last_report >= self.report_every:
                self._report(now, self.fires / max(self.expected, 1))

    def _report(self, now: float, fraction: float) -> None:
        """Report ``fraction`` (never less than what was shown); the caller holds the lock."""
        self._last_report = now
        self._shown = max(self._shown, min(MAX_FRACTION, fraction))
        self.reports += 1
        self.on_fraction(self._shown)

    # -- the ticker: progress inside long modules -------------------------------------------------

    def estimate(self, now: float) -> float:
        """The fraction of the running call done by ``now``, moving inside the current step (see the module's
        notes); never the next fire's mark."""
        expected = max(self.expected, 1) if self._handles else 1  # no hooks (a compiled model): one long step
        seconds = self.learned.get(("seconds", self._key))
        if isinstance(seconds, float) and seconds > 0:
            per_fire = seconds / expected
        elif self.fires:
            per_fire = (self._last_fire - self._start) / self.fires
        elif isinstance(self.learned.get(PACE_KEY), float) and self._pixels:
            per_fire = self.learned[PACE_KEY] * self._pixels / expected
        else:
            per_fire = 1.0
        per_fire = max(per_fire, self.report_every)  # fast fires so far say little of a long one to come
        waited = now - self._last_fire
        if waited <= per_fire:
            inside = 1.0 - math.exp(-waited / per_fire)
        else:  # longer than expected: keep moving, ever slower (continuous at per_fire)
            inside = 1.0 - math.exp(-1.0) * per_fire / waited
        inside = min(inside, 0.99)
        fires = self.fires if self._handles else 0
        return (fires + inside) / expected if fires < expected else fires / expected

    def _start_ticker(self) -> None:
        if self.on_fraction is None or self.report_every <= 0 or self.clock is not time.monotonic:
            return  # nothing to report to, reports on every hook, or a caller's own clock (tests): no thread
        self._stop.clear()
        context = contextvars.copy_context()  # ComfyUI finds the running node and prompt in it
        self._ticker = threading.Thread(target=context.run, args=(self._tick,), name="flexsr-progress", daemon=True)
        self._ticker.start()

    def _stop_ticker(self) -> None:
        if self._ticker is not None:
            self._stop.set()
            self._ticker.join()
            self._ticker = None

    def _tick(self) -> None:
        while not self._stop.wait(self.report_every / 2):
            with self._lock:
                now = self.clock()
                if self._stop.is_set() or now - self._last_report < self.report_every:
                    continue
                try:
                    self.ticks += 1
                    self._report(now, self.estimate(now))
                except BaseException as e:  # ComfyUI's cancel check in its progress hook: raise it in the model's thread
                    self._raised = e
                    return

    def _raise_forwarded(self) -> None:
        if self._raised is not None:
            e, self._raised = self._raised, None
            raise e

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

"""``--threads 0``: the number of torch CPU threads chosen by measurement, and chosen again as the machine's load
changes.

On a quiet 2-core machine two threads make an EIMN training step ~1.7x faster than one; with one other busy
process beside the run, two threads make it ~2x *slower* than one (OpenMP's threads wait for each other at every
barrier while one of them is descheduled), and under heavier load 10x slower. No fixed choice is right, so the
run measures: it alternates the candidates (1 and every core) over a few steps, keeps the faster by the median
step time, and measures again every ``recheck_s`` seconds of training.
"""

from __future__ import annotations

import logging
import os
import statistics
import time

import torch

log = logging.getLogger("flexsr")


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class ThreadTuner:
    """Picks the faster of ``candidates`` torch thread counts from measured step times.

    Call :meth:`before_step` before and :meth:`after_step` after every training step. A probe round runs
    ``probe_steps`` steps per candidate, interleaved (1, N, 1, N, ...; the first step of the run is not
    timed); the candidate with the smaller median wins. A new round starts every ``recheck_s`` seconds.
    """

    def __init__(self, candidates: list[int] | None = None, probe_steps: int = 3, recheck_s: float = 600.0,
                 clock=time.perf_counter):
        cores = cpu_cores()
        self.candidates = sorted(set(candidates or ([1, cores] if cores > 1 else [1])))
        self.probe_steps, self.recheck_s, self.clock = probe_steps, recheck_s, clock
        self.chosen = self.candidates[-1]
        self.times: dict[int, list[float]] = {}
        self._queue: list[int] = []
        self._t0: float | None = None
        self._current = self.chosen
        self._next_probe = 0.0
        self._skip = 1  # the first step of a run carries start-up costs
        self.history: list[dict] = []

    @property
    def active(self) -> bool:
        return len(self.candidates) > 1

    def before_step(self) -> None:
        if not self.active:
            return
        now = self.clock()
        if not self._queue and self._skip == 0 and now >= self._next_probe:
            self.times = {c: [] for c in self.candidates}
            self._queue = [c for _ in range(self.probe_steps) for c in self.candidates]
        self._current = self._queue[0] if self._queue else self.chosen
        if torch.get_num_threads() != self._current:
            torch.set_num_threads(self._current)
        self._t0 = now

    def after_step(self) -> None:
        if not self.active or self._t0 is None:
            return
        took = self.clock() - self._t0
        self._t0 = None
        if self._skip:
            self._skip -= 1
            return
        if not self._queue:
            return
        self.times[self._queue.pop(0)].append(took)
        if self._queue:
            return
        medians = {c: statistics.median(v) for c, v in self.times.items() if v}
        best = min(medians, key=lambda c: (medians[c], c))
        changed = best != self.chosen
        self.chosen = best
        self._next_probe = self.clock() + self.recheck_s
        self.history.append({"threads": best, "s_per_step": medians})
        torch.set_num_threads(best)
        text = ", ".join(f"{c} thread{'s' if c > 1 else ''} {m:.2f} s/step" for c, m in sorted(medians.items()))
        log.info("--threads auto: %s: using %d%s.", text, best, "" if changed or len(self.history) == 1 else " (no change)")

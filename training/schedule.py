"""Where a run is in its schedule: the learning rate, when the edge-weighted loss and the GAN start, when the run
ends, and how ``--time-budget`` moves all of these on a machine too slow for ``--steps``."""

from __future__ import annotations

import math
import statistics


class Schedule:
    """Where a run is, and what follows from it: the LR, when the edge-weighted loss and the GAN
    start, and when the run ends.

    Progress after ``k`` steps is ``k / steps`` plus ``extra``. Without ``--time-budget``, ``extra``
    stays 0. With one, each step advances progress by at least its smoothed duration / budget: a
    machine too slow for ``--steps`` in the budget moves through the whole schedule (L1 warm-up,
    GAN start, LR decay) in fewer steps, and the run ends when progress reaches 1. A machine fast
    enough never accumulates ``extra``, so its run is exactly the step-based one. Only the
    training steps count against the budget (validation and checkpoints come on top); the clock
    starts to count once the smoothed step time exceeds the budget's share by ``MARGIN``, so a
    budgeted run may take up to that much longer than its budget.
    """

    #: First steps of each (resumed) segment that are not measured: they carry start-up costs.
    UNTIMED_STEPS = 1
    #: Timed steps whose median is the estimate (refined with each one) before the moving average takes over.
    CALIBRATION_STEPS = 20
    #: Timed steps needed before the clock may move the schedule at all ...
    FIRST_ESTIMATE = 3
    #: ... and how far over the budget's share they must be to act before CALIBRATION_STEPS: a machine that is
    #: clearly too slow is caught at once, one that is about right is judged on more (first steps are slower).
    EARLY_FACTOR = 2.0
    #: Weight of the newest step in the smoothed step time.
    SMOOTHING = 0.05
    #: The smoothed step time must exceed budget / steps by this factor before the clock counts, so
    #: that noise on a machine that is fast enough cannot make its run differ from the step-based one.
    MARGIN = 1.1

    def __init__(self, args, l1_warmup: int, gan_start: int):
        self.args = args
        self.steps = args.steps
        self.budget = args.time_budget * 60.0
        self.l1_warmup, self.gan_start = l1_warmup, gan_start
        self.extra = 0.0
        self.step_seconds: float | None = None  # smoothed duration of a training step
        self.timed = 0
        self._samples: list[float] = []

    def observe(self, seconds: float | None) -> None:
        """Account for a step that took ``seconds`` (None: a start-up step, not counted).

        From the third timed step on, the median of the timed steps so far estimates a step's time; when it is
        more than twice the budget's share (or, from ``CALIBRATION_STEPS`` on, more than ``MARGIN`` times it),
        the clock counts for every timed step (the earlier ones too, so the schedule catches up at once: a
        6-minute budget on a machine that needs 26 s a step acts from step 4, not 25). After
        ``CALIBRATION_STEPS`` a moving average follows the machine's load.
        """
        if self.budget <= 0 or seconds is None:
            return
        self.timed += 1
        allowed = self.budget / self.steps
        if self.timed <= self.CALIBRATION_STEPS:
            self._samples.append(seconds)
            self.step_seconds = float(statistics.median(self._samples))
            early = self.EARLY_FACTOR if self.timed < self.CALIBRATION_STEPS else self.MARGIN
            if self.timed >= self.FIRST_ESTIMATE and (self.step_seconds > early * allowed or self.extra > 0):
                # every timed step so far at the median's excess (never taking back what already counted)
                self.extra = max(self.extra, self.timed * max(0.0, self.step_seconds - allowed) / self.budget)
            return
        # ... then a moving average, each step clipped at twice the estimate (one hiccup is not a trend)
        a = self.SMOOTHING
        self.step_seconds = (1 - a) * self.step_seconds + a * min(seconds, 2 * self.step_seconds)
        if self.step_seconds > self.MARGIN * allowed or self.extra > 0:
            self.extra += max(0.0, (self.step_seconds - allowed) / self.budget)

    def expected_steps(self, done: int) -> int:
        """How many steps the whole schedule will take at the current pace (``--steps`` when step-based)."""
        if self.extra <= 0 or not self.step_seconds:
            return self.steps
        left = max(0.0, 1.0 - self.progress(done))
        per_step = max(1.0 / self.steps, self.step_seconds / self.budget)
        return done + int(math.ceil(left / per_step))

    def progress(self, step: int) -> float:
        """Fraction of the schedule done after ``step`` steps (0..1)."""
        return min(1.0, step / self.steps + self.extra)

    def reached(self, step: int, mark: int) -> bool:
        """Whether the schedule is at or past step ``mark`` of ``--steps`` (exact integers when step-based)."""
        return step >= mark if self.extra == 0.0 else self.progress(step) * self.steps >= mark

    def finished(self, done: int) -> bool:
        return self.reached(done, self.steps)

    def lr_factor(self, step: int) -> float:
        """Multiplier of the base LR for step ``step``: linear warm-up over ``--lr-warmup`` steps, then
        cosine / multistep / constant over the progress."""
        a = self.args
        warm = a.lr_warmup
        p = self.progress(step)
        if warm > 0 and self.extra == 0.0 and step < warm:
            return (step + 1) / warm
        if warm > 0 and self.extra > 0.0 and p < min(warm / self.steps, 0.99):
            # a time-budgeted run: the warm-up is the same share of the (shorter) schedule
            return max((step + 1) / self.steps, p) / min(warm / self.steps, 0.99)
        if a.schedule == "cosine":
            if self.extra == 0.0:  # the step-based schedule, exactly
                t = (step - warm) / max(1, self.steps - warm)
            else:
                pw = min(warm / self.steps, 0.99)
                t = (p - pw) / (1 - pw)
            t = min(1.0, max(0.0, t))
            floor = a.min_lr / a.lr if a.lr > 0 else 0.0
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
        if a.schedule == "multistep":
            return a.gamma ** sum(self.reached(step, m) for m in (a.milestones or []))
        return 1.0

    def edge_on(self, step: int) -> bool:
        return self.reached(step, self.l1_warmup)

    def gan_on(self, step: int) -> bool:
        return self.reached(step, self.gan_start)

    def state_dict(self) -> dict:
        return {"extra": self.extra, "step_seconds": self.step_seconds, "timed": self.timed, "steps": self.steps,
                "budget": self.budget}

    def load_state_dict(self, state: dict) -> None:
        self.extra = float(state["extra"])
        self.step_seconds = state.get("step_seconds")
        self.timed = int(state.get("timed", 0))

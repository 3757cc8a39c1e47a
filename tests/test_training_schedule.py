"""The schedule: LR warm-up and decay, the plain-L1 warm-up, and the time budget that shortens only slow runs."""

from __future__ import annotations

import math

import pytest

from training import finetune
from training.ema import EMA
from training.schedule import Schedule


def make(*extra: str, l1_warmup: int = 50, gan_start: int = 50) -> Schedule:
    args = finetune.parse_args(["--arch", "Compact", "--steps", "100", "--lr", "1e-3", "--lr-warmup", "10",
                                "--min-lr", "0", *extra])
    return Schedule(args, l1_warmup, gan_start)


def test_cosine_after_a_linear_warmup():
    s = make()
    assert [s.lr_factor(k) for k in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert s.lr_factor(10) == 1.0
    assert math.isclose(s.lr_factor(55), 0.5, abs_tol=1e-12)  # half-way through the decay
    assert s.lr_factor(100) == 0.0
    factors = [s.lr_factor(k) for k in range(10, 101)]
    assert all(a >= b for a, b in zip(factors, factors[1:]))


def test_multistep_and_constant():
    s = make("--schedule", "multistep", "--milestones", "30", "60", "--gamma", "0.1")
    assert [s.lr_factor(k) for k in (20, 30, 59, 60, 99)] == pytest.approx([1, 0.1, 0.1, 0.01, 0.01])
    assert make("--schedule", "constant").lr_factor(77) == 1.0


def test_edge_loss_and_gan_start_after_the_warmup():
    s = make(l1_warmup=50, gan_start=70)
    assert not s.edge_on(49) and s.edge_on(50)
    assert not s.gan_on(69) and s.gan_on(70)


def test_a_run_that_fits_its_budget_is_not_touched_by_the_clock():
    s = make("--time-budget", "1")  # 60 s for 100 steps: 0.6 s a step
    for done in range(1, 100):
        # start-up steps are not counted; a few slow steps (noise) and 0.62 s (within the margin) are tolerated
        s.observe(None if done <= Schedule.UNTIMED_STEPS else (3.0 if done in (8, 40) else 0.62 if done > 60 else 0.5))
    assert s.extra == 0.0 and not s.finished(99) and s.finished(100)
    ref = make()
    assert all(s.lr_factor(k) == ref.lr_factor(k) for k in range(100))
    assert s.edge_on(50) and not s.edge_on(49)


def test_a_slow_run_fits_its_whole_schedule_into_the_budget():
    s = make("--time-budget", "1", l1_warmup=50)
    done, seconds, first_edge = 0, 0.0, None
    while not s.finished(done):
        if first_edge is None and s.edge_on(done):
            first_edge = done
        done += 1
        seconds += 1.2  # 1.2 s a step: 100 steps would take 120 s
        s.observe(None if done <= Schedule.UNTIMED_STEPS else 1.2)
    # ends on budget, apart from the untimed start-up steps
    assert 50 <= done <= 55 and seconds <= 60 + Schedule.UNTIMED_STEPS * 1.2 + 1e-6
    assert 25 <= first_edge <= 30  # the plain-L1 warm-up keeps its half of the schedule
    assert s.lr_factor(done) == pytest.approx(0.0, abs=1e-3)  # fully decayed at the end
    assert s.extra > 0
    t = make("--time-budget", "1")
    t.load_state_dict(s.state_dict())
    assert t.extra == s.extra and t.step_seconds == s.step_seconds


def test_the_budget_acts_from_the_first_steps_and_the_warmup_shrinks_with_it():
    """26 s a step against a 6-minute budget for 800 steps: the schedule must notice by the fourth step (not after
    25 steps, 11 minutes), end within the budget, and warm up over the same share of the shorter run."""
    args = finetune.parse_args(["--arch", "Compact", "--steps", "800", "--time-budget", "6", "--lr-warmup", "30"])
    s = Schedule(args, 400, 400)
    done, seconds, lrs = 0, 0.0, []
    while not s.finished(done):
        lrs.append(s.lr_factor(done))
        done += 1
        seconds += 26.0
        s.observe(None if done <= Schedule.UNTIMED_STEPS else 26.0)
        if done == 4:
            assert s.extra > 0, "the budget did not act on the first timed steps"
    assert done <= 16 and seconds <= 6 * 60 + 2 * 26.0
    assert max(lrs) > 0.8  # the warm-up (30 of 800 steps) ends inside the 15-step run ...
    assert lrs[-1] < 0.2  # ... and the LR decays before the end
    assert s.expected_steps(4) <= 20


def test_warmup_defaults_to_a_share_of_the_run():
    assert finetune.parse_args(["--arch", "Compact", "--steps", "100"]).lr_warmup == 5
    assert finetune.parse_args(["--arch", "Compact", "--steps", "100000"]).lr_warmup == 100
    assert finetune.parse_args(["--arch", "Compact", "--steps", "100", "--lr-warmup", "7"]).lr_warmup == 7


def test_ema_ramps_up_and_tracks_the_weights():
    import torch

    model = torch.nn.Linear(2, 2)
    ema = EMA(model, 0.9)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, 0)  # decay min(0.9, 1/10) = 0.1: mostly the new weights
    assert torch.allclose(ema.model.weight, model.weight - 0.1)
    assert not ema.model.weight.requires_grad

"""Shared pytest set-up: the pack root on sys.path, every RNG seeded before each test, paths to shared data, and
the ``slow`` marker.

Tests marked ``@pytest.mark.slow`` (a real torch.compile of every family, whole training runs in subprocesses,
headless Chromium, ...) run when ``FLEXSR_SLOW_TESTS=1`` or ``CI`` is set, as ``bash .ci/run`` does; a plain
``python -m pytest tests -q`` skips them (they are listed as skipped), so the suite a contributor runs often
stays short.
"""

from __future__ import annotations

import os
import random
import tempfile
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# torch.compile's cache and the measured "auto" decisions (decisions.json beside it) of a test session go to a
# folder of its own, never to the user's ~/.cache
os.environ.setdefault("FLEXSR_COMPILE_CACHE", os.path.join(tempfile.mkdtemp(prefix="flexsr-tests-"), "torch_compile"))

SHARED = ROOT.parent / "shared"
WEIGHTS = SHARED / "weights"
SET5 = SHARED / "data" / "Set5"



def seed_everything(seed: int = 0) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.fixture(autouse=True)
def _seed_rngs():
    seed_everything(0)
    yield


@pytest.fixture
def one_thread():
    """One torch intra-op thread for the test, restored after. Modules of tiny models use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``: on a shared, loaded CPU two threads wait on
    each other at every op (convolutions up to ~20x slower), small models gain nothing from a second
    thread, and results do not depend on the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def shared_weights() -> Path:
    if not WEIGHTS.is_dir():
        pytest.skip(f"shared weights not found at {WEIGHTS}")
    return WEIGHTS


@pytest.fixture
def set5() -> Path:
    if not SET5.is_dir():
        pytest.skip(f"Set5 not found at {SET5}")
    return SET5


SLOW_ENV = "FLEXSR_SLOW_TESTS"


def slow_tests_wanted() -> bool:
    return os.environ.get(SLOW_ENV, "") not in ("", "0") or os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a test of a minute or more; runs with FLEXSR_SLOW_TESTS=1 or in CI")


def pytest_collection_modifyitems(config, items):
    if slow_tests_wanted():
        return
    skip = pytest.mark.skip(reason=f"slow: set {SLOW_ENV}=1 to run it (CI does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)

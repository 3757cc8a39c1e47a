"""Shared pytest set-up: the pack root on sys.path, every RNG seeded before each test, paths to shared data."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

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

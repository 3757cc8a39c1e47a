"""Checkpoint files: atomic writes, RNG states as plain data (weights_only loading), the metrics log's truncation."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from training.checkpoint import (
    atomic_write,
    load_checkpoint,
    read_jsonl,
    rng_state,
    save_checkpoint,
    set_rng_state,
    truncate_jsonl,
)


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    target = tmp_path / "checkpoint.pt"
    save_checkpoint(target, {"step": 1, "w": torch.ones(3)})

    def crash(tmp):
        tmp.write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt  # killed mid-write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash)
    assert load_checkpoint(target)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_checkpoint(tmp_path / "c.pt", {"rng": [rng_state()]})
    want = (random.random(), np.random.rand(), torch.rand(1).item(), np.random.randn())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    state = torch.load(tmp_path / "c.pt", weights_only=True)  # plain data only: no code can run
    set_rng_state(state["rng"][0])
    assert (random.random(), np.random.rand(), torch.rand(1).item(), np.random.randn()) == want


def test_load_refuses_files_that_are_not_training_checkpoints(tmp_path):
    torch.save({"w": torch.zeros(1)}, tmp_path / "model.pt")
    with pytest.raises(ValueError, match="not a FlexSR training checkpoint"):
        load_checkpoint(tmp_path / "model.pt")


def test_truncating_the_metrics_log_drops_later_steps_and_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"kind": "train", "step": s, "loss": s / 10}) for s in (1, 2, 3, 4)]
    path.write_text("\n".join(lines) + '\n{"kind": "train", "st')
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3, 4]
    assert truncate_jsonl(path, 2) == 2
    assert path.read_text() == "\n".join(lines[:2]) + "\n"

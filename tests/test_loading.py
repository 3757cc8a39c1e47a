"""archs.load_model on bad input: every kind of failure gets its own clear error, nothing is written."""

import os
import pickle
from pathlib import Path

import pytest
import torch
from spandrel import ArchRegistry

import archs
from archs import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
    UnsupportedModelError,
)
from testutil import spandrel_builtins


class _Payload:
    """Unpickling this would call os.system; a safe loader must refuse before that happens."""

    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


def _listing(path: Path) -> set:
    return {p.relative_to(path) for p in path.rglob("*")}


def test_malicious_pickle_is_refused_without_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "evil.pth"
    with open(bad, "wb") as f:
        pickle.dump({"weight": _Payload()}, f)
    torch_bad = tmp_path / "evil_zip.pth"
    torch.save({"params": {"w": torch.zeros(1)}, "x": _Payload()}, torch_bad)
    before = _listing(tmp_path)
    for path in (bad, torch_bad):
        with pytest.raises(UnsafeCheckpointError, match="Refused"):
            archs.load_model(path)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()
    assert _listing(tmp_path) == before


def test_missing_file():
    with pytest.raises(CheckpointNotFoundError, match="not found"):
        archs.load_model("/nonexistent/model.pth")


def test_empty_file(tmp_path):
    p = tmp_path / "empty.safetensors"
    p.write_bytes(b"")
    with pytest.raises(CorruptCheckpointError, match="empty"):
        archs.load_model(p)


@pytest.mark.parametrize("ext", [".pth", ".safetensors"])
def test_truncated_file(tmp_path, ext):
    import safetensors.torch

    sd = {"a.weight": torch.randn(64, 64), "b.weight": torch.randn(64)}
    full = tmp_path / f"full{ext}"
    if ext == ".pth":
        torch.save(sd, full)
    else:
        safetensors.torch.save_file(sd, full)
    cut = tmp_path / f"cut{ext}"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(CorruptCheckpointError):
        archs.load_model(cut)


def test_not_a_checkpoint(tmp_path):
    p = tmp_path / "notes.pth"
    p.write_text("this is a text file, not weights\n" * 20)
    with pytest.raises(CorruptCheckpointError):
        archs.load_model(p)
    q = tmp_path / "picture.png"
    q.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(CorruptCheckpointError, match="extension"):
        archs.load_model(q)


def test_checkpoint_without_tensors(tmp_path):
    p = tmp_path / "meta.pth"
    torch.save({"epoch": 3, "lr": 0.1}, p)
    with pytest.raises(CorruptCheckpointError, match="no tensors"):
        archs.load_model(p)


def test_unknown_architecture_names_it():
    sd = {"foo.weight": torch.zeros(3, 3), "bar.bias": torch.zeros(3)}
    with pytest.raises(UnsupportedModelError, match="no known architecture") as info:
        archs.load_model(sd)
    # also an instance of spandrel's error, so code catching that keeps working
    import spandrel

    assert isinstance(info.value, spandrel.UnsupportedModelError)


def test_spandrel_builtins_still_load_through_load_model():
    from spandrel.architectures.ESRGAN import ESRGAN as RRDBNet

    net = RRDBNet(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=2)
    desc = archs.load_model({"params_ema": net.state_dict()})
    assert desc.architecture.id == "ESRGAN" and desc.scale == 2


def test_wrappers_and_prefixes_unwrapped(tmp_path):
    from spandrel.architectures.ESRGAN import ESRGAN as RRDBNet

    net = RRDBNet(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=2)
    wrapped = {
        "params": {k: torch.zeros_like(v) for k, v in net.state_dict().items()},
        "params_ema": {f"module.{k}": v for k, v in net.state_dict().items()},
    }
    p = tmp_path / "wrapped.pth"
    torch.save(wrapped, p)
    desc = archs.load_model(p)
    for k, v in net.state_dict().items():
        assert torch.equal(desc.model.state_dict()[k], v), "params_ema must win over params"


def test_install_is_idempotent_and_keeps_existing_entries():
    registry = ArchRegistry()
    registry.add(*spandrel_builtins("insertion"))
    n_builtin = len(registry)
    archs.install(registry)
    archs.install(registry)
    assert len(registry) == n_builtin + len(archs.REGISTRY)
    for support in archs.REGISTRY:
        assert support.architecture.id in registry

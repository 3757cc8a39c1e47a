"""The shipped drawn-art upscalers (models/FlexSR_anime_[real_]x{2,4}.safetensors): they load through
archs.load_model, record how they were made and what they are for, and clearly beat bicubic on Set14 at their
scale. A shipped model is either the published EIMN_A weights themselves (a blend at alpha 0), a blend of them
with a fine-tune of them, or such a fine-tune."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import archs
from conftest import SHARED
from training.metrics import load_image, psnr_y
from training.imresize import imresize

MODELS = Path(__file__).resolve().parents[1] / "models"
SET14 = SHARED / "data" / "Set14"
SHIPPED = {name: scale for name, scale in (("FlexSR_anime_x2.safetensors", 2), ("FlexSR_anime_x4.safetensors", 4),
                                           ("FlexSR_anime_real_x2.safetensors", 2), ("FlexSR_anime_real_x4.safetensors", 4))
           if (MODELS / name).is_file() or "real" not in name}
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_model_loads_and_records_its_making(name):
    path = MODELS / name
    desc = archs.load_model(path)
    assert desc.scale == SHIPPED[name] and type(desc.model).__name__ == "EIMN"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    base = f"EIMN_A_x{SHIPPED[name]}.pth"
    assert meta.get("flexsr_use"), "a shipped model says what it is for (the loader's panel shows it)"
    # a clean model points to the real-world one for JPEG'd images; a real-world one says it is for them
    assert "JPEG" in meta["flexsr_use"] and ("real" in name) == ("use FlexSR_anime_real" not in meta["flexsr_use"])
    tuned = meta
    if meta.get("b") and meta["b"] == meta.get("a") and "alpha = 0" in meta["interpolation"]:
        # the published weights themselves, under the pack's name (no fine-tune passed the guard)
        published = SHARED / "weights" / base
        assert meta["a"].startswith(f"{base} sha256=")
        if published.is_file():
            mine, theirs = archs.load_model(path).model.state_dict(), archs.load_model(published).model.state_dict()
            assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
        return
    if meta["command"].startswith(("python -m training.interpolate", "python bench/interpolation_sweep.py")):
        # a blend of the published checkpoint (A) and a fine-tune of it (B): B's record is kept under b_ names
        assert meta["a"].startswith(f"{base} sha256=") and "alpha" in meta["interpolation"]
        published = SHARED / "weights" / base
        if published.is_file():
            assert meta["a"] == f"{base} sha256={hashlib.sha256(published.read_bytes()).hexdigest()}"
        assert meta["b"].split(" sha256=")[1] and meta["b_command"]
        tuned = {k[2:]: v for k, v in meta.items() if k.startswith("b_")}
    else:
        assert base in meta["command"]
    assert tuned["command"].startswith("python training/finetune.py --pretrained"), tuned["command"]
    assert "--data" in tuned["command"] and "--seed" in tuned["command"]
    for key in ("seed", "steps", "data_manifest_sha256", "machine", "wall_time_s"):
        assert tuned.get(key), key
    assert int(tuned["steps"]) > 0 and "=" in tuned["data_manifest_sha256"]  # folder=sha256 of its manifest


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_model_beats_bicubic_on_set14(name):
    if not SET14.is_dir():
        pytest.skip(f"Set14 not found at {SET14}")
    scale = SHIPPED[name]
    model = archs.load_model(MODELS / name).model.eval()
    gains = []
    for image in ("comic", "baboon"):  # drawn art and fine texture; small enough for one CPU thread
        hr = load_image(SET14 / "GTmod12" / f"{image}.png").unsqueeze(0)
        lr = load_image(SET14 / f"LRbicx{scale}" / f"{image}.png").unsqueeze(0)
        with torch.no_grad():
            sr = model(lr).clamp(0, 1)
        bic = imresize(lr, scale).clamp(0, 1)
        gains.append(psnr_y(sr, hr, scale) - psnr_y(bic, hr, scale))
    assert min(gains) > 0.3 and sum(gains) / len(gains) > (1.0 if scale == 2 else 0.5), gains

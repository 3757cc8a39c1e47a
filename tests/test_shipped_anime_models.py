"""The shipped drawn-art upscalers (models/FlexSR_anime_x{2,4}.safetensors): they load through
archs.load_model, record how they were made, and clearly beat bicubic on Set14 at their scale."""

from __future__ import annotations

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
SHIPPED = {"FlexSR_anime_x2.safetensors": 2, "FlexSR_anime_x4.safetensors": 4}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_model_loads_and_records_its_making(name):
    path = MODELS / name
    desc = archs.load_model(path)
    assert desc.scale == SHIPPED[name] and type(desc.model).__name__ == "EIMN"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["command"].startswith("python training/finetune.py --pretrained")
    assert f"EIMN_A_x{SHIPPED[name]}.pth" in meta["command"] and "--data" in meta["command"]
    for key in ("seed", "steps", "data_manifest_sha256", "machine", "wall_time_s"):
        assert meta.get(key), key
    assert int(meta["steps"]) > 0 and "=" in meta["data_manifest_sha256"]  # folder=sha256 of its manifest


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_model_beats_bicubic_on_set14(name):
    if not SET14.is_dir():
        pytest.skip(f"Set14 not found at {SET14}")
    scale = SHIPPED[name]
    model = archs.load_model(MODELS / name).model.eval()
    torch.set_num_threads(1)
    gains = []
    for image in ("comic", "baboon"):  # drawn art and fine texture; small enough for one CPU thread
        hr = load_image(SET14 / "GTmod12" / f"{image}.png").unsqueeze(0)
        lr = load_image(SET14 / f"LRbicx{scale}" / f"{image}.png").unsqueeze(0)
        with torch.no_grad():
            sr = model(lr).clamp(0, 1)
        bic = imresize(lr, scale).clamp(0, 1)
        gains.append(psnr_y(sr, hr, scale) - psnr_y(bic, hr, scale))
    assert min(gains) > 0.3 and sum(gains) / len(gains) > (1.0 if scale == 2 else 0.5), gains

"""The shipped default model (models/FlexSR_default_x2.safetensors): loads, is the documented FlexNet, and
beats bicubic by >= 2 dB on the generated held-out set the default run validates on."""

from __future__ import annotations

import json
from pathlib import Path

import torch

import archs
from training import finetune
from training.data import val_pairs_from_arrays
from training.metrics import evaluate_pairs
from training.synthetic import make_images

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models" / f"{finetune.DEFAULT_NAME}.safetensors"


def test_default_model_is_shipped_small_and_is_the_documented_flexnet():
    assert DEFAULT_MODEL.is_file(), f"{DEFAULT_MODEL} is missing: make it with `python training/finetune.py`"
    assert DEFAULT_MODEL.stat().st_size < 2 << 20
    desc = archs.load_model(DEFAULT_MODEL)
    assert type(desc.model).__name__ == finetune.DEFAULT_ARCH and desc.scale == 2
    hp = desc.model.hyperparameters
    for k, v in finetune.DEFAULT_ARCH_ARGS.items():
        assert (list(hp[k]) if isinstance(hp[k], tuple) else hp[k]) == v, k
    readme = (ROOT / "models" / "README.md").read_text()
    assert DEFAULT_MODEL.name in readme and "python training/finetune.py" in readme


def test_default_model_beats_bicubic_by_2_db_on_the_held_out_set():
    args = finetune.parse_args([])
    held = make_images(args.synthetic_val_count, (args.synthetic_val_size,) * 2, args.seed, "val")
    pairs = val_pairs_from_arrays([(str(i), a) for i, a in enumerate(held)], 2)
    model = archs.load_model(DEFAULT_MODEL).model.eval()
    with torch.inference_mode():
        res = evaluate_pairs(lambda x: model(x).clamp(0, 1), pairs, 2)
    assert res["n"] == 8
    assert res["psnr"] - res["bicubic_psnr"] >= 2.0, json.dumps({k: res[k] for k in ("psnr", "bicubic_psnr")})
    assert res["ssim"] > res["bicubic_ssim"]

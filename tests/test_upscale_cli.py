"""upscale.py: the command-line upscaler and the five-line library use, from any folder name."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "models" / "FlexSR_default_x2.safetensors"


def run(args: list[str], cwd: Path, root: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(root / "upscale.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


def images(folder: Path) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    made = {
        "rgba.png": (rng.random((20, 14, 4)) * 255).astype(np.uint8),
        "grey.png": (rng.random((12, 16)) * 255).astype(np.uint8),
        "photo.jpg": (rng.random((16, 16, 3)) * 255).astype(np.uint8),
        "art.webp": (rng.random((10, 18, 3)) * 255).astype(np.uint8),
    }
    for name, arr in made.items():
        kw = {"lossless": True} if name.endswith(".webp") else {}
        Image.fromarray(arr).save(folder / name, **kw)
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    return made


@pytest.mark.slow
def test_cli_upscales_files_folders_and_globs_keeping_alpha_and_grey(tmp_path):
    src = tmp_path / "in"
    made = images(src)
    sub = src / "more"
    Image.fromarray(made["rgba.png"][:8, :8, :3]).save(sub.mkdir() or sub / "deep.png")
    out = tmp_path / "out"
    res = run([str(src), str(tmp_path / "in" / "*.webp"), "--model", str(DEFAULT), "--out", str(out), "--threads", "1"],
              tmp_path)
    assert res.returncode == 1, res.stderr  # the broken file is reported; the others are done
    assert "skipped" in res.stderr and "broken.png" in res.stderr and "Traceback" not in res.stderr
    got = {p.name: Image.open(p) for p in out.iterdir()}
    assert set(got) == {f"{Path(n).stem}_FlexSR_default_x2.png" for n in made}  # not recursive by default
    rgba = got["rgba_FlexSR_default_x2.png"]
    assert rgba.mode == "RGBA" and rgba.size == (28, 40)
    assert got["grey_FlexSR_default_x2.png"].mode == "L" and got["grey_FlexSR_default_x2.png"].size == (32, 24)
    # the same result as the engine the node uses
    sys.path.insert(0, str(ROOT))
    import upscale as lib

    model = lib.load(DEFAULT)
    want = lib.upscale(model, Image.open(src / "rgba.png"))
    assert np.array_equal(np.asarray(want), np.asarray(rgba))
    # an existing output is never replaced without --overwrite
    before = (out / "art_FlexSR_default_x2.png").read_bytes()
    res = run([str(src / "art.webp"), "--model", "FlexSR_default_x2", "--out", str(out), "--scale", "4",
               "--threads", "1"], tmp_path)
    assert res.returncode == 1 and "exists (pass --overwrite" in res.stderr
    assert (out / "art_FlexSR_default_x2.png").read_bytes() == before
    res = run([str(src / "art.webp"), "--model", "FlexSR_default_x2", "--out", str(out), "--scale", "4",
               "--threads", "1", "--overwrite", "--ensemble"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert Image.open(out / "art_FlexSR_default_x2.png").size == (72, 40)  # 2 passes of the x2 model


def test_cli_errors_name_the_problem(tmp_path):
    res = run([str(tmp_path / "missing.png"), "--out", str(tmp_path / "o"), "--model", str(DEFAULT)], tmp_path)
    assert res.returncode == 2 and "missing.png: no such file or folder" in res.stderr
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "x.png")
    res = run([str(tmp_path / "x.png"), "--out", str(tmp_path / "o"), "--model", "NoSuchModel"], tmp_path)
    assert res.returncode == 2 and "--model NoSuchModel: no such file" in res.stderr and "FlexSR_default_x2" in res.stderr
    res = run([str(tmp_path / "x.png"), "--out", str(tmp_path / "x.png"), "--model", str(DEFAULT)], tmp_path)
    assert res.returncode == 2 and "argument --out" in res.stderr


@pytest.mark.slow
def test_cli_and_library_work_from_a_folder_with_any_name(tmp_path):
    """A clone named like a ComfyUI pack (a hyphen: not an importable module name) still runs."""
    pack = tmp_path / "ComfyUI-FlexSR"
    pack.mkdir()
    for entry in ("__init__.py", "upscale.py", "archs", "nodes", "training", "web"):
        src = ROOT / entry
        (shutil.copytree if src.is_dir() else shutil.copy)(src, pack / entry)
    (pack / "models").mkdir()
    shutil.copy(DEFAULT, pack / "models" / DEFAULT.name)
    Image.fromarray((np.random.default_rng(1).random((9, 11, 3)) * 255).astype(np.uint8)).save(tmp_path / "in.png")
    res = run([str(tmp_path / "in.png"), "--model", "FlexSR_default_x2", "--out", str(tmp_path / "o"), "--threads", "1"],
              cwd=pack, root=pack)
    assert res.returncode == 0, res.stderr
    assert Image.open(tmp_path / "o" / "in_FlexSR_default_x2.png").size == (22, 18)
    code = ("from PIL import Image\nfrom upscale import load, upscale\nmodel = load('FlexSR_default_x2')\n"
            f"upscale(model, Image.open({str(tmp_path / 'in.png')!r})).save('lib.png')\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=pack, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert Image.open(pack / "lib.png").size == (22, 18)

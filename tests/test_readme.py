"""The README's commands and code are the ones that work: its set-up is two commands, its test command is the one
CI runs, and its Python snippet for upscaling outside ComfyUI runs as printed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def code_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_set_up_is_two_commands_and_the_second_is_what_ci_runs():
    setup = README.split("## Set-up", 1)[1]
    first = re.search(r"```bash\n(.*?)```", setup, flags=re.S).group(1)
    lines = [line for line in first.splitlines() if line.strip()]
    assert len(lines) == 2, lines
    assert "pip install -r requirements.txt" in lines[0] and lines[0].rstrip().endswith("python training/finetune.py")
    assert lines[1].strip() == "python -m pytest tests -q"
    assert "python -m pytest tests -q" in (ROOT / ".ci" / "run").read_text()


def test_the_library_snippet_upscales_an_image_as_printed(tmp_path):
    (snippet,) = [block for block in code_blocks("python") if "from upscale import" in block]
    Image.fromarray((np.random.default_rng(0).random((20, 28, 3)) * 255).astype(np.uint8)).save(tmp_path / "in.png")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    with Image.open(tmp_path / "out.png") as out:
        assert out.size == (56, 40)


def test_every_model_the_readme_recommends_is_shipped():
    section = README.split("## Which model for which image", 1)[1].split("\n## ", 1)[0]
    names = set(re.findall(r"`(FlexSR_[a-z_]+_x\d)`", section))
    assert {"FlexSR_anime_x2", "FlexSR_anime_real_x2"} <= names, names
    for name in names:
        assert (ROOT / "models" / f"{name}.safetensors").is_file(), name

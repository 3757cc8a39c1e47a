"""What the Comfy Registry reads from pyproject.toml (comfy-cli's ``comfy node validate`` / ``publish``)."""

from __future__ import annotations

import re

import pytest
from PIL import Image

from packutil import ROOT

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_project_fields_the_registry_needs():
    project = PYPROJECT["project"]
    # the node id: letters, digits, - _ . ; no leading digit or symbol, no doubled symbols, no "ComfyUI"
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*([-_.][A-Za-z0-9]+)*", project["name"]) and len(project["name"]) < 100
    assert "comfyui" not in project["name"].lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"]), "semantic version X.Y.Z"
    assert project["description"] and set(project["license"]) <= {"text", "file"}
    urls = project["urls"]
    assert urls["Repository"].startswith("https://") and {"Documentation", "Issues"} <= set(urls)
    # the registry's dependency list is the pack's runtime requirements (pytest is for development only,
    # cairosvg renders the training art set: the "train" extra)
    assert "cairosvg" in project["optional-dependencies"]["train"]
    runtime = {re.split(r"[<>=!~ ]", line)[0].lower() for line in (ROOT / "requirements.txt").read_text().splitlines()
               if line.strip() and not line.startswith("#")} - {"pytest", "cairosvg"}
    assert {re.split(r"[<>=!~ ]", d)[0].lower() for d in project["dependencies"]} == runtime


def test_tool_comfy_names_a_publisher_and_a_square_icon_the_repo_ships():
    comfy = PYPROJECT["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] == "FlexSR" and comfy["includes"] == []
    icon = comfy["Icon"]
    repo = PYPROJECT["project"]["urls"]["Repository"].removeprefix("https://github.com/")
    match = re.fullmatch(rf"https://raw\.githubusercontent\.com/{re.escape(repo)}/main/(.+)", icon)
    assert match, f"the icon is served from the repository itself, not {icon}"
    path = ROOT / match.group(1)
    assert path.is_file(), f"{match.group(1)} is not in the repository"
    with Image.open(path) as im:
        assert im.format in ("PNG", "JPEG", "GIF") and im.size[0] == im.size[1] <= 400

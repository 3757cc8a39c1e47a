"""The example workflows: only existing node types and inputs, consistent links, and they run.

ComfyUI lists ``example_workflows/*.json`` as the pack's templates. They are in the UI (LiteGraph)
format; here each is checked against the nodes' declared inputs, converted to the API format the way
ComfyUI's front end does (widget values in input order, links for connected inputs), and executed
with the pack's nodes (ComfyUI's own LoadImage and SaveImage replaced by small stand-ins).
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from PIL import Image as PILImage
from spandrel.architectures.Compact import Compact

from packutil import ROOT, pack  # noqa: F401  (session fixture)

sys.path.insert(0, str(ROOT / "bench"))
from template_thumbnails import feather_mask, solid_mask  # noqa: E402  (ComfyUI's mask nodes, as they compute)

WORKFLOWS = ROOT / "example_workflows"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}

#: ComfyUI's own nodes the workflows use, as ComfyUI declares them (nodes.py).
BUILTIN = {
    "LoadImage": {
        "input": {"required": {"image": (["example.png"], {"image_upload": True})}},
        "output": ("IMAGE", "MASK"),
    },
    "SaveImage": {
        "input": {"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})}},
        "output": (),
    },
    "SolidMask": {
        "input": {"required": {"value": ("FLOAT", {"min": 0.0, "max": 1.0}), "width": ("INT", {"min": 1}),
                               "height": ("INT", {"min": 1})}},
        "output": ("MASK",),
    },
    "FeatherMask": {
        "input": {"required": {"mask": ("MASK",), "left": ("INT", {"min": 0}), "top": ("INT", {"min": 0}),
                               "right": ("INT", {"min": 0}), "bottom": ("INT", {"min": 0})}},
        "output": ("MASK",),
    },
}


def node_specs(pack) -> dict:
    specs = dict(BUILTIN)
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        specs[name] = {"input": cls.INPUT_TYPES(), "output": cls.RETURN_TYPES}
    return specs


def is_widget(spec) -> bool:
    return isinstance(spec[0], (list, tuple)) or spec[0] in WIDGET_TYPES


def to_api(workflow: dict, specs: dict) -> dict:
    """UI-format workflow -> API prompt; asserts that every value and link fits the declared inputs."""
    links = {link[0]: link for link in workflow["links"]}
    nodes = {n["id"]: n for n in workflow["nodes"]}
    prompt = {}
    for node in workflow["nodes"]:
        assert node["type"] in specs, f"unknown node type {node['type']}"
        spec = specs[node["type"]]
        declared = {**spec["input"].get("required", {}), **spec["input"].get("optional", {})}
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        for name, link in linked.items():
            assert name in declared, f"{node['type']} has no input {name!r}"
            _, src, slot, dst, _, kind = link
            assert dst == node["id"] and kind == declared[name][0], f"link {link} does not fit {name}"
            assert specs[nodes[src]["type"]]["output"][slot] == kind, f"link {link} starts at a {kind}-less output"
        values = list(node.get("widgets_values") or [])
        inputs, vi = {}, 0
        for group in ("required", "optional"):
            for name, decl in spec["input"].get(group, {}).items():
                if is_widget(decl):
                    assert vi < len(values), f"{node['type']}: no value for widget {name!r}"
                    value = values[vi]
                    vi += 1 + bool(len(decl) > 1 and decl[1].get("image_upload"))
                    _check_value(node["type"], name, decl, value)
                    inputs[name] = value
                if name in linked:
                    inputs[name] = [str(linked[name][1]), linked[name][2]]
                if group == "required":
                    assert name in inputs, f"{node['type']}: required input {name!r} is missing"
        assert vi == len(values), f"{node['type']}: {len(values)} widget values for {vi} widgets"
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def _check_value(node_type, name, decl, value):
    kind, opts = decl[0], (decl[1] if len(decl) > 1 else {})
    if isinstance(kind, (list, tuple)):
        if name not in ("model_name", "image"):  # file lists depend on the installation
            assert value in kind, f"{node_type}.{name}: {value!r} not in {kind}"
        return
    python = {"INT": int, "FLOAT": (int, float), "STRING": str, "BOOLEAN": bool}[kind]
    assert isinstance(value, python) and not (kind == "INT" and isinstance(value, bool)), f"{node_type}.{name}={value!r}"
    if kind in ("INT", "FLOAT"):
        assert opts.get("min", value) <= value <= opts.get("max", value), f"{node_type}.{name}={value} out of range"


def load(name: str) -> dict:
    return json.loads((WORKFLOWS / name).read_text())


def test_the_three_examples_are_there():
    names = sorted(p.name for p in WORKFLOWS.glob("*.json"))
    assert names == ["fuse_and_save_model.json", "upscale_image.json", "upscale_rgba_with_mask.json"]


@pytest.mark.parametrize("name", ["fuse_and_save_model.json", "upscale_image.json", "upscale_rgba_with_mask.json"])
def test_workflow_uses_only_existing_nodes_and_inputs(pack, name):
    workflow = load(name)
    assert workflow["version"] == 0.4 and workflow["last_node_id"] == max(n["id"] for n in workflow["nodes"])
    to_api(workflow, node_specs(pack))


def test_workflows_name_a_model_the_pack_ships():
    shipped = ROOT / "models"
    names = set()
    for p in WORKFLOWS.glob("*.json"):
        loaders = [n["widgets_values"][0] for n in json.loads(p.read_text())["nodes"] if n["type"] == "FlexSRLoadUpscaleModel"]
        assert len(loaders) == 1, (p.name, loaders)  # each workflow names its model once
        names |= set(loaders)
    if not shipped.is_dir():
        pytest.skip("the pack's models/ folder does not exist yet")
    files = {p.relative_to(shipped).as_posix() for p in shipped.rglob("*") if p.is_file()}
    assert names <= files, f"the workflows load {names}, the pack ships {sorted(files)}"


class Image:
    """Stand-ins for ComfyUI's LoadImage (an RGB image and its 1 - alpha MASK) and SaveImage."""

    saved: list = []

    @staticmethod
    def load(image):
        rgb = torch.rand(1, 24, 20, 3)
        alpha = torch.linspace(0, 1, 20).expand(1, 24, 20)
        return rgb, 1.0 - alpha

    @staticmethod
    def save(images, filename_prefix):
        Image.saved.append((filename_prefix, images))
        return ()


def execute(pack, prompt: dict) -> dict:
    """Run an API prompt with the pack's nodes, in link order."""
    results: dict[str, tuple] = {}
    pending = dict(prompt)
    while pending:
        for node_id, node in list(pending.items()):
            refs = [v for v in node["inputs"].values() if isinstance(v, list)]
            if any(r[0] not in results for r in refs):
                continue
            kwargs = {k: results[v[0]][v[1]] if isinstance(v, list) else v for k, v in node["inputs"].items()}
            kind = node["class_type"]
            if kind == "LoadImage":
                results[node_id] = Image.load(**kwargs)
            elif kind == "SaveImage":
                results[node_id] = Image.save(**kwargs)
            elif kind == "SolidMask":
                results[node_id] = solid_mask(**kwargs)
            elif kind == "FeatherMask":
                results[node_id] = feather_mask(**kwargs)
            else:
                cls = pack.NODE_CLASS_MAPPINGS[kind]
                out = getattr(cls(), cls.FUNCTION)(**kwargs)
                results[node_id] = out["result"] if isinstance(out, dict) else out
            del pending[node_id]
    return results


@pytest.fixture
def model_folder(pack, tmp_path, monkeypatch):
    folder = tmp_path / "upscale_models"
    folder.mkdir()
    monkeypatch.setenv("FLEXSR_UPSCALE_MODELS", str(folder))
    name = load("upscale_image.json")["nodes"][1]["widgets_values"][0]
    module = Compact(num_feat=4, num_conv=1, upscale=2).eval()
    # a tiny stand-in under the template's model name, found first (the Save node refuses shipped names)
    from safetensors.torch import save_file

    save_file(dict(module.state_dict()), str(folder / name))
    Image.saved = []
    return folder


def test_upscale_workflow_runs(pack, model_folder):
    execute(pack, to_api(load("upscale_image.json"), node_specs(pack)))
    (prefix, images), = Image.saved
    assert prefix == "FlexSR" and images.shape == (1, 48, 40, 3)


def test_rgba_workflow_makes_its_alpha_and_keeps_it(pack, model_folder):
    """The alpha comes from masks made inside the workflow (example.png has none): opaque middle, clear edges."""
    execute(pack, to_api(load("upscale_rgba_with_mask.json"), node_specs(pack)))
    (prefix, images), = Image.saved
    assert images.shape == (1, 48, 40, 4)
    alpha = images[0, :, :, 3]
    assert float(alpha[20:28, 16:24].mean()) > 0.95
    assert float(alpha[:, :2].mean()) < 0.15 and float(alpha[:2, :].mean()) < 0.15 and float(alpha[-2:, :].mean()) < 0.15


def test_feather_mask_stand_in_fades_each_edge():
    mask, = feather_mask(solid_mask(1.0, 8, 6)[0], 4, 2, 0, 0)
    assert torch.allclose(mask[0, 5, :4], torch.tensor([0.25, 0.5, 0.75, 1.0]))
    assert torch.allclose(mask[0, :2, 7], torch.tensor([0.5, 1.0])) and float(mask[0, 3:, 4:].min()) == 1.0


#: A laptop's browser window (1280×720) as ComfyUI's front end (1.27) lays it out: the canvas starts below
#: the menu bar and right of the side bar (40 px each); the workflow tabs cover the canvas's top 40 px;
#: the minimap and, below it, the canvas buttons cover the bottom-right corner. Measured in headless Chromium
#: (``bench/comfy_frontend_check.py`` checks the rendered nodes the same way).
WINDOW = {"width": 1280, "height": 720}
CANVAS_ORIGIN = (40, 40)
TOP_BARS = 80
COVERED = ({"left": 985, "top": 452}, {"left": 955, "top": 656})  # the minimap; the canvas buttons
TITLE, BADGE = 30, 14


@pytest.mark.parametrize("name", ["fuse_and_save_model", "upscale_image", "upscale_rgba_with_mask"])
def test_template_opens_inside_a_1280x720_window_with_a_thumbnail(name):
    workflow = load(f"{name}.json")
    ds = workflow["extra"]["ds"]
    scale, (ox, oy) = ds["scale"], ds["offset"]
    for node in workflow["nodes"]:
        (x, y), (w, h) = node["pos"], node["size"]
        left = (x + ox) * scale + CANVAS_ORIGIN[0]
        top = (y - TITLE - BADGE + oy) * scale + CANVAS_ORIGIN[1]  # the pack's badge sits above the title
        right, bottom = left + w * scale, (y + h + oy) * scale + CANVAS_ORIGIN[1]
        assert left >= CANVAS_ORIGIN[0] and top >= TOP_BARS, f"{node['type']} at {node['pos']} is under the bars"
        assert right <= WINDOW["width"] and bottom <= WINDOW["height"], f"{node['type']} ends outside {WINDOW}"
        for corner in COVERED:
            assert not (right > corner["left"] and bottom > corner["top"]), f"{node['type']} is under the minimap"
        if node["type"] == "FlexSRLoadUpscaleModel":
            assert w >= 400, "room for the model_name label and a long file name"
    thumb = WORKFLOWS / f"{name}.jpg"
    assert thumb.is_file(), f"the template browser asks for {thumb.name}"
    with PILImage.open(thumb) as im:
        assert im.format == "JPEG" and im.size[0] >= 256 and im.size[1] >= 192


def test_fuse_workflow_runs_and_saves_a_model(pack, model_folder):
    results = execute(pack, to_api(load("fuse_and_save_model.json"), node_specs(pack)))
    saved = model_folder / "flexsr_fused.safetensors"
    assert saved.is_file() and results["3"] == (str(saved),)
    assert pack.archs.load_model(saved).scale == 2
